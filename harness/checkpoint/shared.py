"""One folder for every rank: a job's ranks must write their checkpoint files into the same storage.

A job on several machines whose ``checkpoint.dir`` is on each machine's own disk (``/scratch``, ``/tmp``, a local
NVMe) puts each rank's files into a different folder of the same name. Rank 0 then commits checkpoints whose
other ranks' files it cannot see (every one damaged, and retention deletes the good ones as they age), and a
restart whose rank 0 lands on another machine finds none there and starts from step 0. So:

* when a writing manager is made (collective), rank 0 writes a marker file and every rank must see it there
  (:func:`check`): otherwise a one-line StorageError on every rank, exit 3, naming the ranks and hosts;
* on local storage, rank 0 also checks each commit (:func:`unseen`): every file the other ranks report must be
  in its view of the step folder at the size they wrote. A network filesystem unmounted under a running job
  leaves its mount point, a folder of the machine's own disk, and the writes go on there. One ``scandir`` of
  the step folder (and a ``stat`` of any file it does not show as written). Not on object stores, where the
  first check settles it (one URL is one bucket for every client) and a listing per save would cost a request.
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any, Iterable

from harness import dist
from harness.errors import StorageError, is_storage_unavailable, storage_failure
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

MARKER_PREFIX = ".harness-shared-"
LOOK_FAILED = "could not look for it: "
ADVICE = ("a job on several machines needs checkpoint.dir on storage they all share (a network filesystem such as "
          "NFS or Lustre, or s3://...), not a folder of each machine's own disk")


def write_marker(storage: Storage) -> str:
    """Rank 0: a new marker file in the folder; its name (its content too, so its size is known)."""
    name = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    storage.write_bytes(name, name.encode())
    return name


def check(storage: Storage, marker: str | None, group: Any, rank: int, world_size: int) -> None:
    """Collective, after rank 0 wrote ``marker`` (broadcast to all): every rank looks for it; rank 0 removes it;
    every rank raises the same StorageError if any rank did not see it. Nothing to do in one process."""
    if world_size == 1 or marker is None:
        return
    seen, unavailable = (None, False) if rank == 0 else _sees(storage, marker)
    views = dist.all_gather((seen, socket.gethostname(), redact_url(storage.url), unavailable), group)
    if rank == 0:
        try:
            storage.remove(marker)
        except Exception as exc:  # noqa: BLE001 - a leftover marker is harmless; say so and go on
            log.warning("could not remove %s from the checkpoint folder: %s: %s", marker, type(exc).__name__, exc)
    problem = verdict(views)
    if problem:
        # A store that stayed unreachable through its retries is retryable (exit 1), as everywhere else.
        raise storage_failure(problem, all(v[3] for v in views if v[0] is not None), otherwise=StorageError)


def _sees(storage: Storage, marker: str) -> tuple[str | None, bool]:
    """(None if this rank sees rank 0's marker whole, else what it sees instead; whether the store was
    unreachable)."""
    try:
        size = storage.size(marker)
    except Exception as exc:  # noqa: BLE001 - reported to every rank, with the rank that could not look
        return f"{LOOK_FAILED}{type(exc).__name__}: {exc}", is_storage_unavailable(exc)
    if size is None:
        return "does not see it", False
    return (None if size == len(marker.encode()) else f"sees it with {size} bytes instead of {len(marker)}"), False


def verdict(views: list[tuple[str | None, str, str, bool]]) -> str | None:
    """The one-line problem from every rank's (what it saw, host, folder URL, store unreachable), or None when all
    saw rank 0's file. The URLs are one string on a real cluster; where a rank's differs, it is named. A rank
    that could not look is named as such, and only ranks that looked and did not see make it "not the same"."""
    bad = [(r, why, host, url) for r, (why, host, url, _) in enumerate(views) if why is not None]
    if not bad:
        return None
    _, host0, url0, _ = views[0]
    shown = "; ".join(f"rank {r} on host {host}" + (f" (folder {url})" if url != url0 else "") + f" {why}"
                      for r, why, host, url in bad[:4])
    more = f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""
    if all(why.startswith(LOOK_FAILED) for _, why, _, _ in bad):
        return (f"checkpoint folder {url0}: checking that every rank sees the file rank 0 on host {host0} wrote "
                f"there failed: {shown}{more}")
    return (f"checkpoint folder {url0} is not the same folder for every rank: rank 0 on host {host0} wrote a file "
            f"there, and {shown}{more}; {ADVICE}")


def unseen(storage: Storage, name: str, frags: Iterable[Any]) -> str | None:
    """Rank 0, before committing ``name`` on local storage: None if every other rank's data file is in its
    view of the folder at the size that rank wrote, else the one-line problem. Free elsewhere (see above)."""
    if storage.local_path() is None:
        return None
    expected = {(fname, info["size"], f.rank) for f in frags if f.rank != 0 for fname, info in f.files.items()}
    if not expected:
        return None
    listed = storage.list_tree(name)
    # Each one the listing does not show as written, again by its name: a network filesystem may answer a listing
    # from a cache older than another client's files (NFS: until the folder's attributes time out), never a
    # lookup of a name it has not seen before.
    wrong = sorted((rank, fname, got) for fname, size, rank in expected
                   if listed.get(fname) != size and (got := storage.size(f"{name}/{fname}")) != size)
    if not wrong:
        return None
    rank, fname, got = wrong[0]
    seen = "is not there" if got is None else f"has {got} bytes"
    return (f"rank {rank} wrote {fname} into {name}, but in rank 0's view of the folder it {seen} "
            f"({len(wrong)} file(s) so): the checkpoint folder is no longer the same folder for every rank (a "
            f"network filesystem unmounted on rank {rank}'s host?); not committed, the checkpoints before it are "
            f"intact; {ADVICE}")
