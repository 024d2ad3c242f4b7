"""CUDA tests (``pytest -m cuda``; skipped without a GPU): what the CPU suite cannot see. Run on the GPU machine by
benchmarks/gpu_check.sh.

- the async snapshot races the device: ~1 s of queued GPU work, save(), every parameter changed at once, wait():
  the checkpoint holds the values from before the change, on the first save and in the steady state;
- the host snapshot's pinned memory is about the state's size and is given back by close();
- an OOM while restoring is a retryable failure (exit 1), not a damaged checkpoint (exit 3);
- the optimizer state is on the GPU after a restore; GPU-saved loads on CPU and back;
- the CUDA RNG saved is the rank's own device's (a manager's: its models' device, set_device or not);
- fp16 autocast's GradScaler is saved, and a resumed fp16 run is bitwise equal to an uninterrupted one;
- the step loop makes no host sync between log steps (torch.cuda.set_sync_debug_mode);
- a restore into CUDA tensors from several reading threads, each with its pinned ring and stream and its device
  current, is exact (also into another dtype, and a model spread over two GPUs where there are two) and
  names a corrupt entry.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from harness import CheckpointManager, config, state

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]
DEV = torch.device("cuda", 0)


def _model(layers: int = 8, width: int = 1024, odd: int = 0) -> nn.Module:
    torch.manual_seed(0)
    mods = [nn.Linear(width + odd * i, width + odd * (i + 1)) for i in range(layers)]
    return nn.Sequential(*mods).to(DEV)


def _trained(model: nn.Module, steps: int = 2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = next(model.parameters())
    for _ in range(steps):
        x = torch.randn(4, first.shape[1], device=first.device)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return opt


def _host_copy(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    torch.cuda.synchronize()
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "opt": {i: {k: v.detach().cpu().clone() for k, v in s.items() if torch.is_tensor(v)}
                    for i, s in enumerate(opt.state.values())}}


def _busy(seconds: float = 1.0) -> None:
    """Queue about ``seconds`` of GPU work on the current stream without waiting for it."""
    a = torch.randn(8192, 8192, device=DEV)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    b = a @ a
    end.record()
    end.synchronize()
    per = max(start.elapsed_time(end) / 1000, 1e-4)
    for _ in range(max(1, int(seconds / per))):
        b = a @ b
        b.mul_(1e-4)


def _assert_checkpoint_equals(ckdir: Path, step: int, ref: dict, layers: int, width: int, odd: int) -> None:
    model = nn.Sequential(*[nn.Linear(width + odd * i, width + odd * (i + 1)) for i in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(str(ckdir))
    try:
        res = mgr.restore(models=model, optimizers=opt, step=step)
    finally:
        mgr.close()
    assert res is not None and res.step == step
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref["model"][k]), f"step {step}: {k} differs from the state before save()"
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            if torch.is_tensor(v):
                assert torch.equal(v.cpu(), ref["opt"][i][k]), f"step {step}: optimizer state {i}.{k} differs"


@pytest.mark.parametrize("side_stream", [False, True], ids=["same-stream", "side-stream"])
def test_async_snapshot_is_not_raced_by_queued_work(tmp_path, side_stream):
    """First save (buffers allocated) and steady state (buffers reused): the checkpoint equals the state when
    save() was called, although the device was still busy and every parameter changed right after."""
    layers, width, odd = 8, 1024, 0
    model = _model(layers, width, odd)
    opt = _trained(model)
    mgr = CheckpointManager(str(tmp_path / "ck"), keep_last=5, async_save=True)
    params = [p for p in model.parameters()]
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    try:
        for step in (1, 2, 3):
            ref = _host_copy(model, opt)
            with torch.cuda.stream(stream):  # the caller trains on this stream
                _busy(1.0)
                mgr.save(step, models=model, optimizers=opt)
                with torch.no_grad():
                    torch._foreach_add_(params, 1.0)  # every parameter at once, right after save() returned
            mgr.wait()
            _assert_checkpoint_equals(tmp_path / "ck", step, ref, layers, width, odd)
    finally:
        mgr.close()


def test_overlapped_save_holds_pre_step_values_and_refuses_early_changes(tmp_path):
    """Issue 15: save(overlap=True) with ~1 s of GPU work queued returns without waiting for it, and so does
    before_mutation() (the stream waits, not the host); the optimizer step and every parameter changed right
    after it leave the checkpoint with the values of save() time. A change before the wait point fails the save."""
    from harness import CheckpointError
    layers, width, odd = 8, 1024, 0
    model = _model(layers, width, odd)
    opt = _trained(model)
    params = list(model.parameters())
    mgr = CheckpointManager(str(tmp_path / "ck"), keep_last=5, async_save=True)
    try:
        for step in (1, 2):  # first save (buffer allocated and pinned) and the steady state
            ref = _host_copy(model, opt)
            _busy(1.0)
            t0 = time.perf_counter()
            mgr.save(step, models=model, optimizers=opt, overlap=True)
            x = torch.randn(4, width, device=DEV)
            model(x).pow(2).mean().backward()  # the next forward and backward, queued behind the copy
            mgr.before_mutation()
            host_s = time.perf_counter() - t0
            opt.step()
            with torch.no_grad():
                torch._foreach_add_(params, 1.0)
            opt.zero_grad(set_to_none=True)
            mgr.wait()
            assert host_s < 0.5, f"save() + before_mutation() blocked the host {host_s:.3f} s"
            _assert_checkpoint_equals(tmp_path / "ck", step, ref, layers, width, odd)
        mgr.save(3, models=model, optimizers=opt, overlap=True)
        with torch.no_grad():
            torch._foreach_add_(params, 1.0)  # before the wait point: refused
        with pytest.raises(CheckpointError, match="changed in place"):
            mgr.wait()
        assert mgr.latest() == "step-000000002"
    finally:
        mgr.close()


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    ts = list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in ts if t.device.type == "cuda")


def _pinned() -> int:
    """Bytes torch's own pinned-host cache holds (the snapshot must not go through it: it page-locks its own
    buffer with cudaHostRegister, which this cache never sees)."""
    return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))


def test_pinned_snapshot_is_about_the_state_and_freed_by_close(tmp_path):
    """Odd tensor sizes (a power-of-two rounding per tensor would pin ~1.6x): the snapshot pins one buffer of
    <= 1.05x the state's bytes, once, and close() unpins and frees it. (This test first read torch's pinned-cache
    statistics, which never see the snapshot's cudaHostRegister'd buffer: it passed whatever was pinned.)"""
    model = _model(layers=24, width=700, odd=13)
    opt = _trained(model)
    nbytes = _state_bytes(model, opt)
    cache_before = _pinned()
    mgr = CheckpointManager(str(tmp_path / "ck"), keep_last=2, async_save=True)
    snap = mgr.snapshot
    try:
        for step in (1, 2):
            mgr.save(step, models=model, optimizers=opt)
            mgr.wait()
        assert snap.pinned, "the snapshot of GPU state is page-locked"
        assert nbytes <= snap.nbytes <= 1.05 * nbytes, f"pinned {snap.nbytes} bytes for {nbytes} of state"
        assert snap.allocations == 1, "the buffer is reused by the second save"
        assert _pinned() - cache_before < 0.05 * nbytes, "no second copy through torch's pinned cache"
    finally:
        mgr.close()
    assert snap.nbytes == 0 and not snap.pinned, "close() unpins and frees the snapshot"


def test_optimizer_state_is_on_the_gpu_after_restore(tmp_path):
    model = _model(layers=3, width=256)
    opt = _trained(model)
    want = {i: {k: v.device for k, v in s.items() if torch.is_tensor(v)} for i, s in enumerate(opt.state.values())}
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, models=model, optimizers=opt)
    mgr.close()
    fresh = _model(layers=3, width=256)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    assert mgr.restore(models=fresh, optimizers=fopt) is not None
    mgr.close()
    got = {i: {k: v.device for k, v in s.items() if torch.is_tensor(v)} for i, s in enumerate(fopt.state.values())}
    assert got == want
    assert all(v.device.type == "cuda" for s in fopt.state.values() for k, v in s.items()
               if torch.is_tensor(v) and k != "step")


def test_gpu_saved_loads_on_cpu_and_back(tmp_path):
    model = _model(layers=3, width=256)
    opt = _trained(model)
    ref = _host_copy(model, opt)
    mgr = CheckpointManager(str(tmp_path / "gpu"))
    mgr.save(1, models=model, optimizers=opt)
    mgr.close()
    cpu_model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(3)])
    cpu_opt = torch.optim.AdamW(cpu_model.parameters(), lr=1e-3)
    mgr = CheckpointManager(str(tmp_path / "gpu"))
    assert mgr.restore(models=cpu_model, optimizers=cpu_opt) is not None
    mgr.close()
    for k, v in cpu_model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, ref["model"][k])
    mgr = CheckpointManager(str(tmp_path / "cpu"))
    mgr.save(1, models=cpu_model, optimizers=cpu_opt)
    mgr.close()
    back = _model(layers=3, width=256)
    back_opt = torch.optim.AdamW(back.parameters(), lr=1e-3)
    mgr = CheckpointManager(str(tmp_path / "cpu"))
    assert mgr.restore(models=back, optimizers=back_opt) is not None
    mgr.close()
    for k, v in back.state_dict().items():
        assert v.device.type == "cuda" and torch.equal(v.cpu(), ref["model"][k])


def test_cuda_rng_saved_is_this_ranks_device():
    torch.cuda.set_device(DEV)
    torch.cuda.manual_seed(7)
    rng = state.capture_rng()
    assert rng["cuda"]["role"] == "train_device" and rng["cuda"]["index"] == DEV.index
    expected = torch.rand(4, device=DEV)
    state.restore_rng(rng)
    assert torch.equal(torch.rand(4, device=DEV), expected)
    if torch.cuda.device_count() > 1:  # resumed on another device index: restored into the current device
        torch.cuda.set_device(1)
        state.restore_rng(rng)
        assert torch.equal(torch.rand(4, device="cuda:1"), expected.to("cuda:1"))
        torch.cuda.set_device(DEV)


def test_a_managers_cuda_rng_is_the_models_device_without_set_device(tmp_path):
    """A loop of your own that moves its model to cuda:LOCAL_RANK without torch.cuda.set_device: the manager
    saves and restores the generator of the model's device (dropout draws from it), not the current one's."""
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(DEV)  # device 0 current, the model elsewhere where there are several
    model = nn.Linear(8, 8).to(last)
    assert state.models_cuda_device({"m": model}) == last and state.models_cuda_device([nn.Linear(2, 2)]) is None
    torch.cuda.manual_seed_all(3)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, models=model)
    expected = torch.rand(4, device=last)
    torch.cuda.manual_seed_all(99)
    mgr.restore(models=model)
    mgr.close()
    assert torch.equal(torch.rand(4, device=last), expected)


def test_fp16_grad_scaler_is_saved_and_a_resumed_run_is_bitwise(tmp_path):
    """fp16 autocast has a GradScaler (bf16 has none, and every other GPU run here is bf16): its state is in the
    checkpoint, and a run stopped at step 4 and resumed ends bitwise equal to one never stopped."""
    from harness.checkpoint.discovery import list_checkpoints
    from harness.checkpoint.load import read_state
    from harness.storage import Storage

    def run(ck: Path, steps: int) -> None:
        sets = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "data.vocab_size=256",
                "train.batch_size=4", 'train.device="cuda"', "train.amp=true", 'train.amp_dtype="fp16"',
                "train.deterministic=true", "model.dropout=0.1", f"train.max_steps={steps}", "train.log_every=2",
                "checkpoint.every_steps=2", f"checkpoint.dir={ck}"]
        cmd = [sys.executable, "-m", "harness", "train", "--config", str(REPO / "configs" / "gpt_small.toml")]
        out = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=REPO, capture_output=True,
                             text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr[-3000:]

    run(tmp_path / "a", 8)
    run(tmp_path / "b", 4)
    run(tmp_path / "b", 8)
    finals = []
    for ck in ("a", "b"):
        storage = Storage(str(tmp_path / ck))
        _, st, _ = read_state(storage, list_checkpoints(storage)[-1].name)
        finals.append(st)
    scaler = finals[0]["scaler"]
    assert scaler and float(scaler["scale"]) > 0 and int(scaler["_growth_tracker"]) >= 0, scaler
    assert finals[0]["scaler"] == finals[1]["scaler"]
    for k, v in finals[0]["models"]["model"].items():
        assert torch.equal(v, finals[1]["models"]["model"][k]), k


OOM_WORKLOAD = '''
import torch
from harness import faults
from harness.workloads import build_workload


class Model(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)

    def load_state_dict(self, *args, **kwargs):
        faults.point("test.model.load_state_dict")
        return super().load_state_dict(*args, **kwargs)


def build(model_cfg, data_cfg, seed):
    w = build_workload(model_cfg, data_cfg, seed)
    w.model = Model(w.model)
    return w
'''

OOM_DRIVER = '''
import sys
import torch
from harness import cli, faults

def hook(name, info):
    # inside the model's load_state_dict, or (should the restore path not call it) the harness's own seam
    # inside the block that applies the state
    if name == "test.model.load_state_dict" or (name == "restore.apply" and info.get("what") == "model"):
        print(f"injecting OOM at {name}", file=sys.stderr, flush=True)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

faults.install(hook)
sys.exit(cli.main(sys.argv[1:]))
'''


def test_oom_while_restoring_exits_1_not_3(tmp_path):
    """An OOM inside load_state_dict at restore (common while the killed attempt still holds the GPU) is a
    resource failure: exit 1 (retryable) with one line naming it, not 3 (damaged checkpoint)."""
    (tmp_path / "oomwl.py").write_text(textwrap.dedent(OOM_WORKLOAD))
    (tmp_path / "driver.py").write_text(textwrap.dedent(OOM_DRIVER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = ["train", "--config", str(REPO / "configs" / "quickstart.toml"), "--set", 'train.device="cuda"',
            "--set", f"checkpoint.dir={tmp_path / 'ck'}", "--set", 'train.entry="oomwl:build"',
            "--set", "train.max_steps=4", "--set", "checkpoint.every_steps=2"]
    first = subprocess.run([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    args[args.index("train.max_steps=4")] = "train.max_steps=8"
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert "injecting OOM at" in proc.stderr, f"no restore fault point fired:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "out of memory" in proc.stderr.lower() or "OutOfMemoryError" in proc.stderr


def test_step_loop_makes_no_host_sync_between_log_steps(tmp_path):
    """With bf16 autocast (no grad scaler) the only host syncs of the loop are at log steps (and saves)."""
    from harness.trainer import Trainer

    cfg = config.load(str(REPO / "configs" / "gpt_small.toml"), [
        "model.d_model=128", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64", "data.vocab_size=512",
        "train.batch_size=4", 'train.device="cuda"', "train.max_steps=20", "train.log_every=10",
        "checkpoint.every_steps=1000", f"checkpoint.dir={tmp_path / 'ck'}"])
    syncs: list[int] = []
    where: dict[int, list[str]] = {}

    class Watched(Trainer):
        def loop(self) -> int:
            assert self.scaler is None  # bf16: no GradScaler, so none of its per-step .item()
            show = warnings.showwarning

            def record(message, category, *args, **kwargs):
                if "synchronizing" in str(message).lower():
                    if not armed:
                        return
                    syncs.append(self.step)
                    # where, for the failure message: this repo's frames that led to the sync
                    where.setdefault(self.step, [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                                                 for f in traceback.extract_stack()[:-1]
                                                 if "harness" in f.filename or "site-packages" not in f.filename])
                else:
                    show(message, category, *args, **kwargs)

            warnings.showwarning = record
            armed = False
            torch.cuda.set_sync_debug_mode("warn")
            # Seen on the H200 (torch 2.11): the call that turns the check on reports one sync itself (the test's
            # own frame, step 0, before the loop). Only what follows is the loop's.
            armed = True
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = record
                    return super().loop()
            finally:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning = show

    assert Watched(cfg).run() == 0
    assert syncs, "sync debug mode reported nothing: the check did not run"
    extra = {step: where[step][-12:] for step in sorted(set(syncs) - {10, 20})}
    assert not extra, f"host syncs at steps {sorted(set(syncs))}; only log steps 10 and 20 may sync: {extra}"


def _saved_vectors(tmp_path: Path, n: int, length: int, max_file_bytes: int) -> tuple:
    """``n`` odd-sized CPU vectors saved as one model: (the vectors, storage, checkpoint name, their entries)."""
    from harness.checkpoint.discovery import list_checkpoints, open_checkpoint
    from harness.storage import Storage

    torch.manual_seed(0)
    big = nn.ParameterList([nn.Parameter(torch.randn(length + 4099 * i)) for i in range(n)])
    mgr = CheckpointManager(str(tmp_path / "ck"), io_threads=4, max_file_bytes=max_file_bytes)
    mgr.save(1, models={"model": big})
    mgr.close()
    storage = Storage(str(tmp_path / "ck"))
    name = list_checkpoints(storage)[-1].name
    return big, storage, name, [e for e in open_checkpoint(storage, name).tensors.values()
                                if e.key.startswith("state/")]


def test_reading_threads_use_the_destinations_device_and_convert_on_their_stream(tmp_path, monkeypatch):
    """Each reading thread has the destinations' device current (a thread starts on device 0: its stream
    context switched back to device 0 on exit, a CUDA context of ~0.5 GB on GPU 0 per rank of an 8-GPU node),
    and a destination of another dtype (bf16 weights, fp32 saved) is filled through a staging tensor allocated
    on the ring's stream, exactly as copy_() converts."""
    from harness.checkpoint import direct_cuda
    from harness.checkpoint.destinations import destinations
    from harness.checkpoint.direct_read import read_into

    dev = torch.device("cuda", torch.cuda.device_count() - 1)  # not device 0 where there are several
    big, storage, name, entries = _saved_vectors(tmp_path, 4, 1_000_000, 4 << 20)
    seen: list[int] = []
    copy_out = direct_cuda.Ring.copy_out

    def watched(ring, *args, **kwargs):  # the device current in the reading thread as it queues a copy
        seen.append(torch.cuda.current_device())
        return copy_out(ring, *args, **kwargs)

    monkeypatch.setattr(direct_cuda.Ring, "copy_out", watched)
    fresh = nn.ParameterList([nn.Parameter(torch.zeros_like(p, dtype=torch.bfloat16)) for p in big]).to(dev)
    with torch.cuda.device(dev):
        read_into(storage, name, entries, destinations(entries, {"model": fresh}, {}), threads=4)
    torch.cuda.synchronize(dev)
    assert seen and set(seen) == {dev.index}, seen
    assert all(torch.equal(p.cpu(), q.to(torch.bfloat16)) for p, q in zip(fresh, big))
    if torch.cuda.device_count() > 1:  # a model spread over two GPUs of one process: rings on each
        seen.clear()
        spread = nn.ParameterList([nn.Parameter(torch.zeros_like(p).to(f"cuda:{i % 2}")) for i, p in enumerate(big)])
        read_into(storage, name, entries, destinations(entries, {"model": spread}, {}), threads=4)
        torch.cuda.synchronize()
        assert set(seen) == {0, 1}, seen
        assert all(torch.equal(p.cpu(), q) for p, q in zip(spread, big))


def test_cuda_destinations_from_several_threads(tmp_path):
    """Four reading threads, each with its ring and stream, fill one device: every byte, and a corrupt entry in
    the middle is named with no copy still running."""
    from harness.checkpoint import direct_cuda
    from harness.checkpoint.destinations import destinations
    from harness.checkpoint.direct_read import ReadStats, local_streams, read_into
    from harness.errors import CheckpointCorruptError

    big, storage, name, entries = _saved_vectors(tmp_path, 6, 3_000_000, 8 << 20)
    fresh = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in big]).to(DEV)
    stats = ReadStats()
    read_into(storage, name, entries, destinations(entries, {"model": fresh}, {}), threads=4, stats=stats)
    assert all(torch.equal(p.cpu(), q) for p, q in zip(fresh, big))
    rings = min(local_streams(4), len(entries))  # one ring per reading thread
    assert stats.peak_extra_bytes == rings * direct_cuda.RING_SLOTS * direct_cuda.RING_SLOT_BYTES
    assert stats.cuda_threads == rings and stats.cuda_phases["read"] > 0 and stats.cuda_phases["hash"] > 0
    victim = max(entries, key=lambda e: e.length)
    data = bytearray(storage.read_bytes(f"{name}/{victim.file}"))
    data[victim.offset + victim.length // 2] ^= 0x5A
    storage.write_bytes(f"{name}/{victim.file}", bytes(data))
    with pytest.raises(CheckpointCorruptError, match=re.escape(repr(victim.key))):
        read_into(storage, name, entries, destinations(entries, {"model": fresh}, {}), threads=4)
    torch.cuda.synchronize()
