"""Finding committed checkpoints and opening them with full validation."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from harness import faults
from harness.checkpoint import blobs
from harness.checkpoint.format import (COMMIT_FILE, COMMIT_SUMMARY_KEYS, MANIFEST_FILE, MAX_COMMIT_BYTES,
                                       MAX_MANIFEST_BYTES, NAME_PREFIX, Manifest, parse_commit, parse_manifest,
                                       parse_name)
from harness.errors import (CheckpointCorruptError, CheckpointError, CheckpointFormatError, NewerFormatError,
                            StorageError)
from harness.layout import ROLLED_BACK_FILE
from harness.storage import Storage


@dataclass
class CheckpointInfo:
    """One checkpoint folder as listed: committed or not, and its commit summary."""

    name: str
    step: int
    attempt: int
    committed: bool
    commit: dict = field(default_factory=dict)
    problem: str | None = None  # why the commit record itself is unreadable, if it is
    newer: bool = False         # ``problem`` is a format version newer than this harness reads (not damage)
    files: dict[str, int] | None = None  # the folder's files and their sizes, from the listing
    commit_read: bool = False   # whether ``commit``/``problem`` say what the record holds (it is read lazily)
    rolled_back: bool = False   # set aside by a rollback (its ROLLED_BACK record): kept, never a leftover

    @property
    def leftover(self) -> bool:
        """What a killed save left: no commit record, and not set aside on purpose by a rollback (rollback.py).
        Restore passes over it with a warning, retention and prune remove it."""
        return not self.committed and not self.rolled_back


def scan(storage: Storage) -> list[CheckpointInfo]:
    """Every checkpoint folder, oldest first, from one listing of the folder (on S3 one paginated
    ListObjectsV2 of the prefix, not a HEAD per checkpoint): committed or not (whether its commit record
    exists) and the size of each of its files. Commit records are not read: :func:`read_commits` does
    that, lazily."""
    storage.refresh()
    folders: dict[str, dict[str, int]] = {}
    for rel, size in storage.list_tree(prefix=NAME_PREFIX).items():
        top, _, inner = rel.partition("/")
        if parse_name(top) is None:
            continue
        files = folders.setdefault(top, {})
        if inner and size is not None:
            files[inner] = size
    out = []
    for name, files in folders.items():
        step, attempt = parse_name(name)  # type: ignore[misc]
        out.append(CheckpointInfo(name=name, step=step, attempt=attempt, committed=COMMIT_FILE in files,
                                  files=files, rolled_back=ROLLED_BACK_FILE in files))
    return sorted(out, key=lambda i: (i.step, i.attempt))


class CommitCache:
    """Commit records already read, by folder name and record size. A committed record never changes (a
    checkpoint is never rewritten in place), so the job writing a folder reads each one once, not at every
    retention pass (a run keeping its 300 checkpoints read 300 records after each save: seconds on S3). Only
    that job keeps one: it alone creates and deletes folders there (the lease), and it forgets a name it
    deletes, so a later checkpoint of that name is read afresh."""

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[int, dict]] = {}

    def get(self, name: str, size: int | None) -> dict | None:
        hit = self._by_name.get(name)
        return hit[1] if hit is not None and size is not None and hit[0] == size else None

    def put(self, name: str, size: int | None, commit: dict) -> None:
        if size is not None:
            self._by_name[name] = (size, commit)

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget every name not in ``names`` (the folders that exist): deleted ones, so the cache stays
        as small as the folder."""
        keep = set(names)
        for name in [n for n in self._by_name if n not in keep]:
            del self._by_name[name]


# Commit records are a few hundred bytes: reading them is all latency on S3, so a listing that needs every one
# (retention's first pass in a job, `harness ckpt list`) reads them this many at a time from a remote store.
READ_THREADS = 16


def read_commits(storage: Storage, infos: Iterable[CheckpointInfo],
                 cache: CommitCache | None = None) -> Iterator[CheckpointInfo]:
    """``infos`` in their order, each committed one's commit record read as it is reached (once): a caller
    that stops early (restore's walk back stops at the first checkpoint that verifies) reads no older
    record. A damaged record sets ``problem``; one gone since the listing makes the folder uncommitted;
    a failing store (StorageError, OSError) raises: it is not a damaged checkpoint. ``cache``: records
    read before, taken from it (and records read now put in it) when the listed size matches."""
    for info in infos:
        _read_one(storage, info, cache)
        yield info


def _read_one(storage: Storage, info: CheckpointInfo, cache: CommitCache | None) -> None:
    """Fill ``info``'s commit record (see :func:`read_commits`)."""
    if not info.committed or info.commit_read:
        return
    size = _listed_size(info)
    cached = cache.get(info.name, size) if cache is not None else None
    try:
        info.commit = cached if cached is not None else read_commit(storage, info.name, size)
    except FileNotFoundError:
        info.committed = False
    except StorageError:
        raise  # the store failed (a StorageError is a CheckpointError too): not a damaged record
    except CheckpointError as exc:
        info.problem = str(exc)  # a commit record exists but is damaged (or newer than this harness reads)
        info.newer = isinstance(exc, NewerFormatError)
    else:
        if cache is not None and cached is None:
            cache.put(info.name, size, info.commit)
    info.commit_read = True


def _listed_size(info: CheckpointInfo) -> int | None:
    return None if info.files is None else info.files.get(COMMIT_FILE)


def list_checkpoints(storage: Storage, committed_only: bool = True,
                     cache: CommitCache | None = None) -> list[CheckpointInfo]:
    """Checkpoint folders, oldest first, every commit record read (retention, ``harness ckpt list`` and
    prune need them all), those not in ``cache`` READ_THREADS at a time (from a remote store). Only folders
    with a commit record exist for readers."""
    infos = scan(storage)
    todo = [i for i in infos if i.committed and (cache is None or cache.get(i.name, _listed_size(i)) is None)]
    if len(todo) > 1 and storage.local_path() is None:  # a local disk answers at once: threads only cost
        with cf.ThreadPoolExecutor(min(READ_THREADS, len(todo)), thread_name_prefix="harness-commits") as pool:
            for _ in pool.map(lambda i: _read_one(storage, i, cache), todo):
                pass  # the first failing store raises here
    return [i for i in read_commits(storage, infos, cache) if i.committed or not committed_only]


def read_commit(storage: Storage, name: str, size: int | None = None) -> dict:
    """The parsed commit record of ``name``; FileNotFoundError if it has none. ``size``: the record's size
    as a listing gave it (saves a HEAD)."""
    rel = f"{name}/{COMMIT_FILE}"
    if size is None:
        size = storage.size(rel)
    if size is None:
        raise FileNotFoundError(rel)
    if size > MAX_COMMIT_BYTES:
        raise CheckpointFormatError(f"{name}: commit record is {size} bytes, over the {MAX_COMMIT_BYTES} limit")
    faults.point("discovery.read_commit", name=name)
    return parse_commit(storage.read_bytes(rel))


def open_checkpoint(storage: Storage, name: str, listed: CheckpointInfo | None = None) -> Manifest:
    """Read and validate commit record and manifest, and check every data file's size. ``listed``: what
    :func:`scan` (and :func:`read_commits`) found for ``name``: its commit record and file sizes are used
    instead of reading them again (no HEAD per file)."""
    files = listed.files if listed is not None else None
    if listed is not None and listed.commit_read and listed.committed:
        if listed.problem is not None:
            raise (NewerFormatError if listed.newer else CheckpointError)(listed.problem)
        commit = listed.commit
    else:
        try:
            commit = read_commit(storage, name, None if files is None else files.get(COMMIT_FILE))
        except FileNotFoundError:
            raise CheckpointError(f"{name}: no commit record (the save never completed)") from None
    parsed = parse_name(name)
    if parsed is not None and parsed[0] != commit["step"]:
        raise CheckpointFormatError(f"{name}: commit record says step {commit['step']}, the folder name says "
                                    f"{parsed[0]}")
    rel = f"{name}/{MANIFEST_FILE}"
    size = storage.size(rel) if files is None else files.get(MANIFEST_FILE)
    if size is None:
        raise CheckpointCorruptError(f"{name}: manifest.json is missing")
    if size != commit["manifest"]["size"] or size > MAX_MANIFEST_BYTES:
        raise CheckpointCorruptError(f"{name}: manifest.json is {size} bytes, commit record says "
                                     f"{commit['manifest']['size']}")
    try:
        manifest = parse_manifest(storage.read_bytes(rel), commit)
    except CheckpointFormatError as exc:
        raise type(exc)(f"{name}: {exc}") from None  # (a NewerFormatError stays one)
    for key in COMMIT_SUMMARY_KEYS:  # listing and retention read these from the commit record alone
        if key in manifest.raw and key in commit and commit[key] != manifest.raw[key]:
            raise CheckpointFormatError(f"{name}: commit record disagrees with the manifest on {key!r}")
    for fname, want in manifest.files.items():
        got = storage.size(f"{name}/{fname}") if files is None else files.get(fname)
        if got is None:
            raise CheckpointCorruptError(f"{name}: data file {fname} is missing")
        if got != want:
            raise CheckpointCorruptError(f"{name}: data file {fname} is {got} bytes, manifest says {want}"
                                         + (" (truncated)" if got < want else ""))
    return manifest


def one_checkpoint(storage: Storage, committed: bool = False) -> tuple[str, str] | None:
    """(parent folder's URL, checkpoint name) when ``storage``'s folder is itself one harness checkpoint (a
    ``step-N`` folder holding its commit record, or unless ``committed`` a set-aside one), as Lightning's
    ``ckpt_path`` habit gives it, else None. One HEAD on an object store (two for a folder that is neither)."""
    parent, _, name = storage.url.rstrip("/").rpartition("/")
    if parse_name(name) is None:
        return None
    parent = parent or "."  # a relative "step-000000100"
    if storage.exists(COMMIT_FILE) or (not committed and storage.exists(ROLLED_BACK_FILE)):
        return parent, name
    return None


def as_step_of_its_folder(storage: Storage, storage_options: dict | None) -> tuple[Storage, int] | None:
    """For a reader given one committed checkpoint's folder: its parent folder and step, so that reading that
    step there reads this very checkpoint; a CheckpointError when a later save of the same step is the one a
    step selects there (``step-000000100`` beside ``step-000000100-a1``). None for anything else."""
    one = one_checkpoint(storage, committed=True)
    if one is None:
        return None
    parent, name = Storage(one[0], storage_options), one[1]
    step = parse_name(name)[0]  # type: ignore[index]
    same = [i.name for i in scan(parent) if i.committed and i.step == step]  # one listing, no record read
    if same[-1:] != [name]:
        raise CheckpointError(f"{name} is an earlier save of step {step} than {same[-1] if same else 'none'}, the "
                              f"one a step selects in {one[0]}: export or import it under another name to read it")
    return parent, step


def verify_checkpoint(storage: Storage, name: str, threads: int = 4) -> Manifest:
    """Open ``name`` and check the checksum of every stored tensor; raises on the first problem."""
    manifest = open_checkpoint(storage, name)
    blobs.read_tensors(storage, name, list(manifest.tensors.values()), threads=threads, verify=True)
    return manifest
