"""Finding committed checkpoints and opening them with full validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.checkpoint import blobs
from harness.checkpoint.format import (COMMIT_FILE, COMMIT_SUMMARY_KEYS, MANIFEST_FILE, MAX_COMMIT_BYTES,
                                       MAX_MANIFEST_BYTES, Manifest, parse_commit, parse_manifest, parse_name)
from harness.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError
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


def list_checkpoints(storage: Storage, committed_only: bool = True) -> list[CheckpointInfo]:
    """Checkpoint folders, oldest first. Only folders with a commit record exist for readers."""
    storage.refresh()
    out = []
    for name in storage.listdir():
        parsed = parse_name(name)
        if parsed is None:
            continue
        info = CheckpointInfo(name=name, step=parsed[0], attempt=parsed[1], committed=False)
        try:
            info.commit = read_commit(storage, name)
            info.committed = True
        except FileNotFoundError:
            pass
        except CheckpointError as exc:
            info.committed, info.problem = True, str(exc)  # a commit record exists but is damaged
        if info.committed or not committed_only:
            out.append(info)
    return sorted(out, key=lambda i: (i.step, i.attempt))


def read_commit(storage: Storage, name: str) -> dict:
    """The parsed commit record of ``name``; FileNotFoundError if it has none."""
    rel = f"{name}/{COMMIT_FILE}"
    size = storage.size(rel)
    if size is None:
        raise FileNotFoundError(rel)
    if size > MAX_COMMIT_BYTES:
        raise CheckpointFormatError(f"{name}: commit record is {size} bytes, over the {MAX_COMMIT_BYTES} limit")
    return parse_commit(storage.read_bytes(rel))


def open_checkpoint(storage: Storage, name: str) -> Manifest:
    """Read and validate commit record and manifest, and check every data file's size."""
    try:
        commit = read_commit(storage, name)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no commit record (the save never completed)") from None
    parsed = parse_name(name)
    if parsed is not None and parsed[0] != commit["step"]:
        raise CheckpointFormatError(f"{name}: commit record says step {commit['step']}, the folder name says "
                                    f"{parsed[0]}")
    rel = f"{name}/{MANIFEST_FILE}"
    size = storage.size(rel)
    if size is None:
        raise CheckpointCorruptError(f"{name}: manifest.json is missing")
    if size != commit["manifest"]["size"] or size > MAX_MANIFEST_BYTES:
        raise CheckpointCorruptError(f"{name}: manifest.json is {size} bytes, commit record says "
                                     f"{commit['manifest']['size']}")
    try:
        manifest = parse_manifest(storage.read_bytes(rel), commit)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{name}: {exc}") from None
    for key in COMMIT_SUMMARY_KEYS:  # listing and retention read these from the commit record alone
        if key in manifest.raw and key in commit and commit[key] != manifest.raw[key]:
            raise CheckpointFormatError(f"{name}: commit record disagrees with the manifest on {key!r}")
    for fname, want in manifest.files.items():
        got = storage.size(f"{name}/{fname}")
        if got is None:
            raise CheckpointCorruptError(f"{name}: data file {fname} is missing")
        if got != want:
            raise CheckpointCorruptError(f"{name}: data file {fname} is {got} bytes, manifest says {want}"
                                         + (" (truncated)" if got < want else ""))
    return manifest


def verify_checkpoint(storage: Storage, name: str, threads: int = 4) -> Manifest:
    """Open ``name`` and check the checksum of every stored tensor; raises on the first problem."""
    manifest = open_checkpoint(storage, name)
    blobs.read_tensors(storage, name, list(manifest.tensors.values()), threads=threads, verify=True)
    return manifest
