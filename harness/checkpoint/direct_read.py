"""Reading stored tensors straight into their final memory, checksummed on the same pass.

The plain read path (:func:`harness.checkpoint.blobs.read_tensors`) reads into fresh CPU tensors that
``load_state_dict`` then copies: two copies, and a second copy of the whole state in host memory at the peak.
Here the caller names the destination of every entry (a live parameter, buffer or optimizer-state tensor)
and the bytes land there directly:

- a contiguous CPU destination of the stored dtype is read into in place (``os.preadv`` into its memory for
  local files (:meth:`Storage.local_path`), ``readinto`` of a :meth:`Storage.open_read` handle elsewhere), in blocks, each hashed while it is still in cache;
- neighbouring small tensors of one file are fetched with one read (one ``preadv`` scattering into all of
  them on local disk; one ranged read into a bounded scratch buffer elsewhere);
- local files are read by a few threads (at most one per CPU), each streaming a contiguous share of the
  checkpoint front to back through its own descriptors, so the kernel's readahead sees one sequential reader
  per thread (see :func:`plan_runs`); object stores by ``threads`` tasks, largest read first;
- any other destination (non-contiguous, another dtype, another device type) gets a staging buffer that is
  verified before it is copied in, so a corrupt entry never reaches such a destination;
- CUDA destinations are shared out like the host runs (:func:`plan_cuda_runs`), and each share is filled by
  a thread of its own through a small ring of pinned host buffers: read -> checksum -> host-to-device copy on
  the ring's side stream, an event per slot so a slot is reused only once its copy is done;
- an entry without a destination (optimizer state that does not exist yet) is allocated once, at its saved
  shape and dtype, on the device the caller gives.

Extra host memory at any moment is at most max(largest staged tensor, ``memory_budget``) plus the CUDA rings
(24 MiB of pinned memory per CUDA reading thread).

Contract on failure: a checksum mismatch raises :class:`CheckpointCorruptError` naming file and key; a
truncated file also raises it; storage failures raise what the storage raises. When :func:`read_into` raises,
no read is still running (every worker has stopped), but the destinations it was given hold unspecified bytes
(some entries may be fully or partly written): the caller must not use them, and either reads another
checkpoint into the same destinations (which overwrites every entry it holds) or gives up the restore. On
success, every destination holds bytes whose checksum matched.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch
import xxhash

from harness.checkpoint import direct_cuda
from harness.checkpoint.direct_io import MAX_IOV, Aborted, Budget, Reader, byte_view, check_digest
from harness.checkpoint.format import DTYPES, TensorEntry
from harness.errors import CheckpointCorruptError, CheckpointError
from harness.hostinfo import usable_cpus
from harness.storage import Storage

MIB = 1 << 20
DEFAULT_MEMORY_BUDGET = 256 * MIB   # staging and scratch buffers, all threads together
# Local reads: the kernel's readahead streams ahead of the reader whatever the read size, so a small read only
# lets each MiB be copied and hashed (from L2) while the next arrives; measured, 8 MiB reads were ~25% slower
# cold and ~8% warm than 1 MiB (benchmarks/checkpoint_io.py, 2-core VM).
BLOCK_BYTES = 1 * MIB
REMOTE_BLOCK_BYTES = 64 * MIB       # object stores: one readinto of this size is a set of concurrent ranged GETs
SMALL_BYTES = 1 * MIB               # entries up to this size are coalesced with their neighbours
COALESCE_SPAN = 16 * MIB            # one coalesced read covers at most this many bytes
COALESCE_GAP = 64 * 1024            # read through at most this much padding between neighbours
LOCAL_STREAMS = 0                   # cap on threads reading local files (0: one per CPU, see local_streams)

Destination = Union[torch.Tensor, torch.device, str]


@dataclass
class ReadStats:
    """What a read did; filled in by :func:`read_into` when given one."""

    tensors: int = 0
    bytes: int = 0
    reads: int = 0                  # read calls issued (a coalesced group is one)
    coalesced: int = 0              # entries that shared a read with a neighbour
    staged: int = 0                 # entries that went through a staging buffer
    allocated: int = 0              # entries that had no destination
    peak_extra_bytes: int = 0       # staging + scratch high-water mark, plus the CUDA ring if one was used
    cuda_threads: int = 0           # threads that filled CUDA destinations, and their seconds summed over them:
    cuda_phases: dict[str, float] = field(default_factory=dict)  # read, hash, slot wait (copy), the rest


@dataclass
class _Target:
    entry: TensorEntry
    view: torch.Tensor | None       # where the bytes end up; None: verify only
    direct: bool                    # view is a contiguous CPU tensor of the stored dtype: read into it


@dataclass
class _Job:
    file: str
    offset: int
    end: int
    targets: list[_Target] = field(default_factory=list)


def read_into(storage: Storage, folder: str, entries: Sequence[TensorEntry], dests: Mapping[str, Destination], *,
              default_device: torch.device | str = "cpu", threads: int = 4, verify: bool = True,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, coalesce: bool = True,
              stats: ReadStats | None = None) -> dict[str, torch.Tensor]:
    """Read ``entries`` of checkpoint ``folder`` into ``dests`` and return key -> tensor for every entry.

    ``dests`` maps an entry's key to its destination tensor (filled in place; for the shards of a sharded
    tensor, the whole tensor: each shard fills its box) or to a device (allocate there). A key not in
    ``dests`` is allocated on ``default_device``. A destination must have the saved shape (the global shape
    for shards); another dtype is converted as ``copy_`` does. See the module docstring for the contract when
    this raises."""
    stats = stats if stats is not None else ReadStats()
    targets, out = plan_targets(entries, dests, default_device, stats)
    host = [t for t in targets if t.view is None or t.view.device.type != "cuda"]
    cuda = [t for t in targets if t.view is not None and t.view.device.type == "cuda"]
    budget = Budget(memory_budget)
    with Reader(storage, folder) as reader:
        stop = threading.Event()
        jobs = plan_jobs(host, coalesce=coalesce)
        runs = plan_runs(jobs, threads, reader.local)
        cuda_runs, rings = _cuda_shares(cuda, threads, reader.local)
        phases = [direct_cuda.Phases() for _ in cuda_runs]
        pool = cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(runs)) + len(cuda_runs)),
                                     thread_name_prefix="harness-read")
        futures: list[cf.Future] = []
        try:
            # the CUDA shares first: each gets a thread of its own at once, the host runs share the rest
            futures = [pool.submit(direct_cuda.fill_run, reader, run, ring, verify, stop, ph)
                       for run, ring, ph in zip(cuda_runs, rings, phases)]
            futures += [pool.submit(_run_jobs, reader, run, budget, verify, stop) for run in runs]
        except BaseException as exc:
            _abort(pool, futures, stop, exc)
        try:
            _collect(pool, futures, stop, stats)
        finally:
            pool.shutdown(wait=True)  # every fill_run has drained its ring: no copy to a destination in flight
    stats.tensors += len(targets)
    stats.cuda_threads += len(cuda_runs)
    for ph in phases:
        for name, secs in ph.seconds().items():
            stats.cuda_phases[name] = stats.cuda_phases.get(name, 0.0) + secs
    stats.coalesced += sum(len(j.targets) for j in jobs if len(j.targets) > 1)
    stats.peak_extra_bytes = max(stats.peak_extra_bytes, budget.peak + sum(r.nbytes for r in rings))
    return out


def verify_entries(storage: Storage, folder: str, entries: Sequence[TensorEntry], *, threads: int = 4,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, stats: ReadStats | None = None) -> None:
    """Read and check ``entries`` without keeping them (bounded scratch memory): for a rank that verifies
    bytes other ranks will load. Raises :class:`CheckpointCorruptError` on the first mismatch."""
    stats = stats if stats is not None else ReadStats()
    targets = [_Target(e, None, False) for e in entries]
    budget = Budget(memory_budget)
    with Reader(storage, folder) as reader:
        runs = plan_runs(plan_jobs(targets, coalesce=True), threads, reader.local)
        stop = threading.Event()
        with cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(runs)))) as pool:
            futures = [pool.submit(_run_jobs, reader, run, budget, True, stop) for run in runs]
            _collect(pool, futures, stop, stats)
    stats.tensors += len(targets)
    stats.peak_extra_bytes = max(stats.peak_extra_bytes, budget.peak)


def _collect(pool: cf.ThreadPoolExecutor, futures: list[cf.Future], stop: threading.Event, stats: ReadStats) -> None:
    """Wait for every read job and add up its counts; on the first failure stop the rest (see :func:`_abort`)."""
    try:
        for fut in futures:
            reads, nbytes = fut.result()
            stats.reads += reads
            stats.bytes += nbytes
    except BaseException as exc:
        _abort(pool, futures, stop, exc)


def _abort(pool: cf.ThreadPoolExecutor, futures: list[cf.Future], stop: threading.Event,
           exc: BaseException) -> None:
    """Stop every job and wait for them (nothing may still write into a destination when we raise), then raise
    the error that explains the failure best."""
    stop.set()
    pool.shutdown(wait=True, cancel_futures=True)
    first = _first_error(futures, exc)
    if first is exc:
        raise exc
    raise first from None


def _first_error(futures: list[cf.Future], current: BaseException) -> BaseException:
    """The error to report: a corrupt entry over anything else; never the internal abort."""
    errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
    errors = [e for e in [current, *errors] if not isinstance(e, Aborted)]
    corrupt = [e for e in errors if isinstance(e, CheckpointCorruptError)]
    return (corrupt or errors or [current])[0]


# -- planning --------------------------------------------------------------------------------------------

def plan_targets(entries: Sequence[TensorEntry], dests: Mapping[str, Destination],
                 default_device: torch.device | str, stats: ReadStats) -> tuple[list[_Target], dict]:
    """Where each entry's bytes go; allocates (once per key) what has no destination tensor."""
    out: dict[str, torch.Tensor] = {}
    targets = []
    for e in entries:
        whole = e.key  # the shards of a sharded tensor share one destination: the whole tensor
        full_shape = tuple(e.global_shape if e.global_shape is not None else e.shape)
        dest = out.get(whole)
        if dest is None:
            given = dests.get(e.key, default_device)
            if isinstance(given, torch.Tensor):
                dest = given
                if tuple(dest.shape) != full_shape:
                    raise CheckpointError(f"tensor {e.key!r}: saved shape {list(full_shape)}, destination shape "
                                          f"{list(dest.shape)}")
            else:
                dest = torch.empty(full_shape, dtype=DTYPES[e.dtype], device=torch.device(given))
                stats.allocated += 1
            out[whole] = dest
        view = dest.detach()
        if e.global_offset is not None:
            view = view[tuple(slice(o, o + n) for o, n in zip(e.global_offset, e.shape))]
        direct = (view.device.type == "cpu" and view.dtype == DTYPES[e.dtype] and view.is_contiguous()
                  and type(view) is torch.Tensor and not view.is_conj() and not view.is_neg())
        targets.append(_Target(e, view, direct))
        if not direct and view.device.type != "cuda":
            stats.staged += 1
    return targets, out


def plan_jobs(targets: Sequence[_Target], *, coalesce: bool) -> list[_Job]:
    """One job per large entry; runs of small neighbours in one file (little padding between them) share one."""
    jobs: list[_Job] = []
    by_file: dict[str, list[_Target]] = {}
    for t in targets:
        by_file.setdefault(t.entry.file, []).append(t)
    for fname, ts in by_file.items():
        ts.sort(key=lambda t: t.entry.offset)
        open_job: _Job | None = None
        for t in ts:
            e = t.entry
            small = e.length <= SMALL_BYTES
            if (coalesce and small and open_job is not None and 0 <= e.offset - open_job.end <= COALESCE_GAP
                    and e.offset + e.length - open_job.offset <= COALESCE_SPAN
                    and len(open_job.targets) < MAX_IOV // 2):
                open_job.targets.append(t)
                open_job.end = e.offset + e.length
                continue
            job = _Job(fname, e.offset, e.offset + e.length, [t])
            jobs.append(job)
            open_job = job if small else None
    return sorted(jobs, key=lambda j: (j.file, j.offset))


def local_streams(threads: int) -> int:
    """How many threads read a local checkpoint: ``threads``, but at most one per CPU this process may run on.
    A read is a kernel copy plus a hash, both CPU work, so more threads than CPUs only contend; and each thread
    is one more concurrent stream for the disk, which on the virtual disk measured (benchmarks/checkpoint_io.py)
    cost bandwidth rather than adding it."""
    cpus = usable_cpus()
    return max(1, min(threads, cpus, LOCAL_STREAMS or cpus))


def plan_runs(jobs: Sequence[_Job], threads: int, local: bool) -> list[list[_Job]]:
    """The jobs each thread runs, in order. Local files: contiguous runs of about equal bytes, in file and
    offset order, so each thread streams its share front to back and the kernel's readahead keeps ahead of it.
    Elsewhere (object stores: latency, not seeks) one job per task, largest first, so threads stay busy to the
    end."""
    if not jobs:
        return []
    if not local:
        return [[j] for j in sorted(jobs, key=lambda j: -(j.end - j.offset))]
    n = min(local_streams(threads), len(jobs))
    total = sum(j.end - j.offset for j in jobs)
    runs: list[list[_Job]] = [[]]
    done = 0
    for j in jobs:
        # start the next run once this one holds its share (a job is never split: its hash is sequential)
        if runs[-1] and len(runs) < n and done >= total * len(runs) / n:
            runs.append([])
        runs[-1].append(j)
        done += j.end - j.offset
    return runs


def _cuda_shares(cuda: Sequence[_Target], threads: int,
                 local: bool) -> tuple[list[list[tuple[TensorEntry, torch.Tensor]]], list[direct_cuda.Ring]]:
    """The reading threads' shares of the CUDA destinations and a ring for each, per device (one device: a
    rank's; several: a model spread over the GPUs of one process, the threads divided between them)."""
    by_device: dict[torch.device, list[_Target]] = {}
    for t in cuda:
        by_device.setdefault(t.view.device, []).append(t)
    runs: list[list[tuple[TensorEntry, torch.Tensor]]] = []
    rings: list[direct_cuda.Ring] = []
    for device, targets in by_device.items():
        share = plan_cuda_runs(targets, max(1, threads // len(by_device)), local)
        runs += share
        rings += direct_cuda.open_rings(device, len(share))
    return runs, rings


def plan_cuda_runs(targets: Sequence[_Target], threads: int,
                   local: bool) -> list[list[tuple[TensorEntry, torch.Tensor]]]:
    """The CUDA destinations each reading thread fills, in order (one ring per thread): local files in contiguous
    shares as :func:`plan_runs`; elsewhere at most ``threads`` lists, largest entries first, each to the list
    with the fewest bytes so far."""
    jobs = [_Job(t.entry.file, t.entry.offset, t.entry.offset + t.entry.length, [t]) for t in targets]
    runs = plan_runs(sorted(jobs, key=lambda j: (j.file, j.offset)), threads, local)
    if not local and len(runs) > threads:
        lists: list[list[_Job]] = [[] for _ in range(max(1, threads))]
        for run in runs:  # already largest first
            min(lists, key=lambda js: sum(j.end - j.offset for j in js)).extend(run)
        runs = [js for js in lists if js]
    return [[(t.entry, t.view) for j in run for t in j.targets] for run in runs]


# -- reading ---------------------------------------------------------------------------------------------

def _run_jobs(reader: Reader, jobs: list[_Job], budget: Budget, verify: bool,
              stop: threading.Event) -> tuple[int, int]:
    """Run ``jobs`` in order in this thread; returns (read calls, tensor bytes delivered)."""
    reads = nbytes = 0
    for job in jobs:
        r, n = _run_job(reader, job, budget, verify, stop)
        reads, nbytes = reads + r, nbytes + n
    return reads, nbytes


def _run_job(reader: Reader, job: _Job, budget: Budget, verify: bool, stop: threading.Event) -> tuple[int, int]:
    """Run one job; returns (read calls, tensor bytes delivered)."""
    if stop.is_set():
        raise Aborted()
    payload = sum(t.entry.length for t in job.targets)
    if len(job.targets) == 1:
        return _read_one(reader, job.targets[0], budget, verify, stop), payload
    if reader.local:
        return _read_group_local(reader, job, budget, verify), payload
    return _read_group_remote(reader, job, budget, verify), payload


def _read_one(reader: Reader, t: _Target, budget: Budget, verify: bool, stop: threading.Event) -> int:
    """One entry, block by block into its destination (or a staging buffer), hashed as it arrives."""
    e = t.entry
    block = BLOCK_BYTES if reader.local else REMOTE_BLOCK_BYTES
    if t.direct:
        return _stream(reader, e, byte_view(t.view), block, verify, stop)
    scratch = t.view is None
    nbytes = min(e.length, block) if scratch else e.length  # verify-only needs one block, not the tensor
    with budget.hold(nbytes):
        if scratch:
            return _stream(reader, e, memoryview(bytearray(nbytes)), block, verify, stop, reuse=True)
        staging = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        reads = _stream(reader, e, byte_view(staging), block, verify, stop)
        if t.view is not None:
            with torch.no_grad():
                t.view.copy_(staging)  # verified: only good bytes reach a staged destination
    return reads


def _stream(reader: Reader, e: TensorEntry, buf: memoryview, block: int, verify: bool, stop: threading.Event,
            reuse: bool = False) -> int:
    """Read entry ``e`` into ``buf`` (or, with ``reuse``, through ``buf`` again and again), hashing each block."""
    h = xxhash.xxh3_64()
    reads = 0
    for a in range(0, e.length, block):
        if stop.is_set():
            raise Aborted()
        n = min(block, e.length - a)
        part = buf[:n] if reuse else buf[a:a + n]
        reader.read(e.file, e.offset + a, [part], e.ident)
        reads += 1
        if verify:
            h.update(part)
    if verify:
        check_digest(e, h.hexdigest(), reader.where(e.file))
    return reads


def _read_group_local(reader: Reader, job: _Job, budget: Budget, verify: bool) -> int:
    """Neighbouring small entries with one preadv that scatters straight into their destinations."""
    staged = sum(t.entry.length for t in job.targets if not t.direct)
    padding = (job.end - job.offset) - sum(t.entry.length for t in job.targets)
    with budget.hold(staged + padding):
        bufs: list[memoryview] = []
        views: list[tuple[_Target, memoryview, torch.Tensor | None]] = []
        pos = job.offset
        for t in job.targets:
            e = t.entry
            if e.offset > pos:
                bufs.append(memoryview(bytearray(e.offset - pos)))  # padding between entries: read and dropped
            staging = None if t.direct else torch.empty(e.shape, dtype=DTYPES[e.dtype])
            mv = byte_view(t.view if t.direct else staging)
            bufs.append(mv)
            views.append((t, mv, staging))
            pos = e.offset + e.length
        reader.read(job.file, job.offset, bufs, job.targets[0].entry.ident)
        if verify:
            for t, mv, _ in views:
                check_digest(t.entry, xxhash.xxh3_64_hexdigest(mv), reader.where(job.file))
        with torch.no_grad():
            for t, _, staging in views:
                if staging is not None and t.view is not None:
                    t.view.copy_(staging)
    return 1


def _read_group_remote(reader: Reader, job: _Job, budget: Budget, verify: bool) -> int:
    """Neighbouring small entries of an object store file with one ranged read into a scratch buffer; each
    entry is checked before any of them is copied out."""
    span = job.end - job.offset
    with budget.hold(span):
        mv = memoryview(bytearray(span))
        reader.read(job.file, job.offset, [mv], job.targets[0].entry.ident)
        parts = [(t, mv[t.entry.offset - job.offset:t.entry.offset - job.offset + t.entry.length])
                 for t in job.targets]
        if verify:
            for t, part in parts:
                check_digest(t.entry, xxhash.xxh3_64_hexdigest(part), reader.where(job.file))
        with torch.no_grad():
            for t, part in parts:
                if t.view is None or not t.entry.length:
                    continue
                if t.direct:
                    byte_view(t.view)[:] = part
                else:
                    saved = torch.frombuffer(part, dtype=torch.uint8).view(DTYPES[t.entry.dtype])
                    t.view.copy_(saved.reshape(t.entry.shape))
    return 1


