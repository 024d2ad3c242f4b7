"""The cyclic garbage collector during a start-up's imports, and the heap they leave.

Importing torch and torch._dynamo (which any optimizer's constructor imports) allocates about 350 thousand
objects, nearly all of them for good (modules, functions, classes). Python's collector runs a pass every
few hundred allocations and, now and then, over everything allocated so far: measured on the 2-core
machine, that is 0.4 s of the 1.55 s the two imports take. Afterwards, every full pass traverses those
objects again: the first S3 request of a process that imported them (botocore parses its endpoint rules,
a large JSON document) took 0.25 s instead of 0.08 s.

So harness's own processes (``harness train``, the launcher, its workers' preloaded forkserver, and the
``ckpt`` commands: ``ckpt list`` took 1.55 s, 1.1 s paused) import with the collector paused, then move what the imports built into the permanent generation
(``gc.freeze``: never traversed again; in a forked worker, never written to either, so those pages stay
shared with the forkserver) and turn the collector back on. What the process allocates afterwards is
collected as usual. A cycle of garbage made during the imports is kept for good: a few objects.

Standard library only: the launcher imports this before torch.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

_paused_by_us = False


def pause() -> None:
    """Pause the collector for the imports to come (a no-op where something else paused it)."""
    global _paused_by_us
    if gc.isenabled():
        gc.disable()
        _paused_by_us = True


def freeze_and_resume() -> None:
    """After the imports: freeze what they built and turn the collector back on, if :func:`pause` turned it
    off (in a process that did not pause it, e.g. a test calling the CLI in process, nothing happens)."""
    global _paused_by_us
    if _paused_by_us:
        gc.freeze()
        gc.enable()
        _paused_by_us = False


@contextlib.contextmanager
def imports() -> Iterator[None]:
    """``pause()`` for the block, ``freeze_and_resume()`` after it (also when it raises)."""
    pause()
    try:
        yield
    finally:
        freeze_and_resume()
