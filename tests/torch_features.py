"""What this torch can do, for tests that need a feature not every torch pyproject allows (torch>=2.4) has.
The suite passes on the newest torch with nothing skipped for these; on older ones the tests named here skip."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from torch.distributed.launcher.api import LaunchConfig

from harness import torchcompat

FSDP_UNSUPPORTED = torchcompat.fsdp_unsupported()
needs_fsdp = pytest.mark.skipif(FSDP_UNSUPPORTED is not None, reason=str(FSDP_UNSUPPORTED))

DCP_BEST = hasattr(importlib.import_module("torch.distributed.checkpoint.staging"), "DefaultStager")
needs_dcp_best = pytest.mark.skipif(not DCP_BEST, reason="this torch has no DCP DefaultStager (torch 2.4)")

# Without LaunchConfig.signals_to_handle torch's agent handler takes every signal, SIGHUP under nohup too.
SIGNALS_TO_HANDLE = "signals_to_handle" in {f.name for f in dataclasses.fields(LaunchConfig)}
