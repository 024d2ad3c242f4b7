"""What the ranks share during the step loop without stalling the device.

A CUDA step is queued, not run: the host returns from ``optimizer.step()`` long before the GPU has finished, and
stays ahead as long as nothing reads a device value. Reading one (``float(loss)``, ``.item()``, a blocking
all-reduce on the device) makes the host wait for every queued kernel, so the next step's launches start only
after the GPU has drained. Two things the loop needs every step would do that:

- agreeing on a pending signal (any rank's SIGTERM stops all ranks at the same step): ``StopVote`` votes on a
  gloo (CPU) group with a non-blocking all-reduce issued at step k and read at step k+1, so it waits only for
  the other ranks' hosts, never for a device;
- the loss: ``StepStats`` keeps it on the device (the last step's value and a running sum) and reads it with
  one all-reduce and one copy only at log and checkpoint steps, as the global mean over ranks that the
  progress line, metrics.jsonl and the checkpoint all report.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist

from harness import dist


class StopVote:
    """MAX over ranks of each rank's pending signal number, one step late.

    ``poll(signum)`` returns the agreement reached on the votes cast at the previous call (0: nobody has a
    signal) and casts this step's vote. Every rank calls it once per step, so every rank sees the same
    result at the same step and they all stop together. A signal thus stops the run at most two step
    boundaries after it arrives (the step it arrives in, plus the one the vote travels in): the grace period
    must cover one step more than with a blocking vote.

    ``restart``: this rank's signal is its agent stopping the workers to restart them (harness/launch_folder.py),
    not a stop of the job. Such a vote counts below any other signal (a preemption at the same time wins), and
    ``agent_restart`` says whether the agreed stop is one."""

    REAL = 1000  # a vote for a stop of the job: signum + REAL; for an agent's restart: signum

    def __init__(self, group: Any) -> None:
        self.group = group
        self.agent_restart = False
        self._work: Any = None
        self._vote: torch.Tensor | None = None

    def poll(self, signum: int, restart: bool = False) -> int:
        vote = signum if restart or not signum else signum + self.REAL
        if self.group is None:  # one process: nothing to agree on
            return self._agreed(vote)
        agreed = self._collect()
        if agreed:
            return self._agreed(agreed)  # every rank stops here, so no further vote is cast
        self._vote = torch.tensor([vote], dtype=torch.int64)
        self._work = torch_dist.all_reduce(self._vote, op=torch_dist.ReduceOp.MAX, group=self.group,
                                           async_op=True)
        return 0

    def _agreed(self, vote: int) -> int:
        self.agent_restart = 0 < vote < self.REAL
        return vote - self.REAL if vote > self.REAL else vote

    def _collect(self) -> int:
        if self._work is None:
            return 0
        self._work.wait()  # host-side only: a gloo all-reduce of a CPU tensor
        self._work = None
        return int(self._vote.item())

    def drain(self) -> int:
        """Finish the vote in flight (before the group goes away); its result, 0 if none."""
        return self._agreed(self._collect()) if self.group is not None else 0


class StepStats:
    """The loss kept on the device between reads; global means computed only when someone looks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last: torch.Tensor | None = None   # this rank's loss of the latest step
        self.total: torch.Tensor | None = None  # sum of this rank's losses since the last log step
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().to(torch.float64)  # on the device: no sync
        self.last = loss
        self.total = loss if self.total is None else self.total + loss
        self.count += 1

    def reduce(self, metrics: dict[str, Any] | None = None) -> tuple[float, float, dict[str, float]]:
        """(global mean of the latest step's loss, global mean over the steps since the last ``reduce`` with
        metrics, global mean of each metric): one all-reduce and one device-to-host copy. With metrics given
        (a log step) the running sum starts over. Collective: every rank calls it at the same step."""
        assert self.last is not None and self.total is not None
        names = sorted(metrics or {})
        values = [self.last, self.total / self.count]
        values += [torch.as_tensor(metrics[k], dtype=torch.float64, device=self.device).reshape(()) for k in names]
        packed = torch.stack([v.to(self.device) for v in values])
        if dist.initialized():
            torch_dist.all_reduce(packed)
            packed = packed / dist.world_size()
        out = packed.tolist()  # the one read of device values
        if metrics is not None:
            self.total, self.count = None, 0
        return out[0], out[1], dict(zip(names, out[2:]))
