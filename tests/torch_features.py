"""What this torch can do, for tests that need a feature not every torch pyproject allows (torch>=2.4) has.
The suite passes on the newest torch with nothing skipped for these; on older ones the tests named here skip."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from torch.distributed.launcher.api import LaunchConfig

from harness import torchcompat
from harness.interop import torchload

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
import _dcp_best  # noqa: E402

FSDP_UNSUPPORTED = torchcompat.fsdp_unsupported()
needs_fsdp = pytest.mark.skipif(FSDP_UNSUPPORTED is not None, reason=str(FSDP_UNSUPPORTED))

DCP_BEST_UNAVAILABLE = _dcp_best.unavailable()  # the benchmarks' own check (they skip DCP's best rows on it)
DCP_BEST = DCP_BEST_UNAVAILABLE is None
needs_dcp_best = pytest.mark.skipif(not DCP_BEST, reason=str(DCP_BEST_UNAVAILABLE))

# Without LaunchConfig.signals_to_handle torch's agent handler takes every signal, SIGHUP under nohup too.
SIGNALS_TO_HANDLE = "signals_to_handle" in {f.name for f in dataclasses.fields(LaunchConfig)}

# An object of a class the importer does not import is stood in for only where torch maps a named global to an
# object of ours (safe_globals with (obj, "module.Name")); older torch refuses such files as before.
needs_stand_ins = pytest.mark.skipif(not torchload.can_stand_in(),
                                     reason="this torch cannot map a global to a stand-in (safe_globals by name)")
