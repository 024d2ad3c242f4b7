"""Resumable distributed sampling and single-process batch loading.

The point of this module is *exact* resumption: a checkpoint taken after
``k`` batches of an epoch records ``{"epoch", "position"}``, and a fresh
sampler + loader restored from it yields exactly the batches an uninterrupted
run would have yielded next.  Everything here is deterministic and runs in the
calling process (no worker processes), because worker prefetching makes "how
far did we get" ambiguous and determinism matters more than throughput here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "BatchLoader", "collate_tuples"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ValueError.

    bools are rejected explicitly: ``True`` is an int in Python, and a stray
    flag passed as a size is almost certainly a bug.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class ResumableSampler(Sampler[int]):
    """Distributed sampler that remembers how far into the epoch it is.

    Index order matches ``torch.utils.data.DistributedSampler``: each epoch a
    permutation is drawn with ``torch.Generator().manual_seed(seed + epoch)``
    (or ``arange`` without shuffling), optionally padded/truncated to a
    multiple of ``num_replicas``, and rank ``r`` takes every
    ``num_replicas``-th element starting at ``r``.  So rank slices are
    disjoint (up to padding when ``drop_last=False``) and equally long.

    ``position`` counts this rank's samples already consumed in the current
    epoch; the loader moves it with :meth:`advance`.  ``set_epoch`` resets it
    only when the epoch actually changes, so a training loop that calls
    ``set_epoch(e)`` at the top of every epoch still resumes mid-epoch after
    ``load_state_dict``.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.dataset_len = _check_int("dataset_len", dataset_len, 1)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}] for num_replicas={num_replicas}, got {rank}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(
                f"dataset_len={dataset_len} < num_replicas={num_replicas} with drop_last=True "
                "would give every rank zero samples"
            )
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        if self.drop_last:
            self.num_samples = dataset_len // num_replicas
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.position = 0
        # Cache of (epoch, this rank's indices); recomputing a large randperm
        # on every __iter__ would be wasted work.
        self._cache: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Per-rank number of samples in a full epoch (not the remaining ones)."""
        return self.num_samples

    @property
    def remaining(self) -> int:
        """Samples this rank has left in the current epoch."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        """Switch to ``epoch``; the position resets only if the epoch changes."""
        _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def advance(self, n: int) -> None:
        """Mark ``n`` more samples of the current epoch as consumed."""
        _check_int("n", n, 0)
        if self.position + n > self.num_samples:
            raise ValueError(
                f"cannot advance by {n}: position {self.position} + {n} exceeds "
                f"{self.num_samples} samples per epoch"
            )
        self.position += n

    def epoch_indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._compute_indices(self.epoch))
        return self._cache[1]

    def _compute_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            # Pad by wrapping around (repeatedly if the dataset is tiny) so
            # every rank runs the same number of steps; DDP hangs otherwise.
            padding = self.total_size - len(indices)
            if padding > 0:
                reps = math.ceil(padding / len(indices))
                indices += (indices * reps)[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's indices from the current position to epoch end.

        Iterating does not move the position; consumers call :meth:`advance`
        when a sample has really been used, so a checkpoint never counts
        samples that were only prefetched.
        """
        return iter(self.epoch_indices()[self.position :])

    def state_dict(self) -> dict[str, int]:
        """JSON-able progress: ``{"epoch": int, "position": int, "dataset_len": int}`` (the length tells a
        resume whether the data changed since; :meth:`load_state_dict` needs only the first two)."""
        return {"epoch": int(self.epoch), "position": int(self.position), "dataset_len": int(self.dataset_len)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict` (validated first)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"sampler state must be a mapping, got {type(state).__name__}")
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing key(s): {', '.join(sorted(missing))}")
        epoch = _check_int("state['epoch']", state["epoch"], 0)
        position = _check_int("state['position']", state["position"], 0)
        if position > self.num_samples:
            raise ValueError(
                f"state['position']={position} exceeds {self.num_samples} samples per epoch "
                "(was the state saved with a different dataset_len/num_replicas?)"
            )
        self.epoch = epoch
        self.position = position


def collate_tuples(items: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Stack a list of equal-arity tuples of tensors field by field."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    arity = len(items[0])
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != arity:
            raise ValueError(f"dataset items must be tuples of {arity} tensors, got {type(item).__name__}")
    return tuple(torch.stack([item[f] for item in items]) for f in range(arity))


class BatchLoader:
    """Single-process loader over one epoch, starting at the sampler's position.

    Each ``iter()`` covers the rest of the sampler's current epoch; call
    ``sampler.set_epoch(e)`` before each epoch.  A final partial batch is
    dropped so every step has the same shape (and every rank the same count).
    """

    def __init__(self, dataset: Any, sampler: ResumableSampler, batch_size: int) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise ValueError(f"sampler must be a ResumableSampler, got {type(sampler).__name__}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if batch_size > len(sampler):
            raise ValueError(
                f"batch_size={batch_size} exceeds the {len(sampler)} samples per rank per epoch; "
                "every batch would be dropped"
            )
        if hasattr(dataset, "__len__") and len(dataset) != sampler.dataset_len:
            raise ValueError(f"len(dataset)={len(dataset)} does not match sampler.dataset_len={sampler.dataset_len}")
        self.dataset = dataset
        self.sampler = sampler

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per rank in a whole epoch."""
        return len(self.sampler) // self.batch_size

    @property
    def remaining_batches(self) -> int:
        """Full batches left in the current epoch from the sampler's position."""
        return self.sampler.remaining // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        indices = list(self.sampler)
        epoch, expected = self.sampler.epoch, self.sampler.position
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            chunk = indices[start : start + self.batch_size]
            batch = collate_tuples([self.dataset[i] for i in chunk])
            if (self.sampler.epoch, self.sampler.position) != (epoch, expected):
                # Someone moved the sampler (set_epoch/load_state_dict) mid-epoch;
                # continuing would silently desynchronise data and progress.
                raise RuntimeError("sampler state changed while a BatchLoader iteration was in progress")
            # Advance *before* handing the batch out: while the consumer holds
            # batch k (and may checkpoint), the state must already count it.
            self.sampler.advance(len(chunk))
            expected += len(chunk)
            yield batch
