"""Failures of resources that torch raises as a plain RuntimeError must still read as what they are: retryable
exit 1 in one line (not an unexpected error with a traceback), a resource problem in the checkpoint layer
(never "this checkpoint cannot be loaded", exit 3). A lost or stalled peer under gloo (the checkpoint layer's
group, and the whole job on CPU) names gloo's transport: real gloo ranks produce those errors here. A failed
CUDA call before torch 2.8 starts with "CUDA error: "."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer_helpers import REPO, base_env, free_port


@pytest.fixture(scope="module")
def real_errors():
    procs = {mode: subprocess.Popen([sys.executable, str(REPO / "tests" / "gloo_failure_worker.py"), mode,
                                     str(free_port())], cwd=REPO, env=base_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for mode in ("die", "slow")}
    out = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1, (mode, stdout, stderr[-3000:])
        out[mode] = json.loads(lines[0])
    return out


@pytest.mark.parametrize("mode, words", [("die", ("by peer",)), ("slow", ("Timed out",))])
def test_a_lost_or_stalled_gloo_peer_is_a_retryable_communication_error(real_errors, mode, words):
    got = real_errors[mode]
    assert got["type"] == "RuntimeError" and "gloo/transport/" in got["message"], got
    assert any(w in got["message"] for w in words), got
    assert got["resource"] and got["severity"] == "resource", got
    assert got["code"] == 1 and got["line"].startswith("harness: communication error (retryable, exit 1): "), got
    assert "\n" not in got["line"]


def test_other_runtime_errors_stay_unexpected():
    from harness.checkpoint.errors import is_resource_error
    from harness.exitcodes import classify

    plain = RuntimeError("size mismatch for weight")
    assert classify(plain) is None and not is_resource_error(plain)
    assert classify(ValueError("gloo/transport/ in a ValueError is not gloo's")) is None


def test_peers_rebuild_a_lost_gloo_peer_as_a_dist_error():
    """Rank 1's gloo RuntimeError, reported to rank 0, is re-raised there as DistNetworkError (one line, 1)."""
    import torch

    from harness.checkpoint.errors import problem_of, raise_resource
    from harness.exitcodes import classify

    problem = problem_of(RuntimeError("[x/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"), 1)
    with pytest.raises(torch.distributed.DistNetworkError) as caught:
        raise_resource(problem, None)
    assert classify(caught.value).line.startswith("harness: communication error (retryable, exit 1): ")


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered\nCompile with ...",
                                     "CUDA error: uncorrectable ECC error encountered",
                                     "CUDA driver error: unknown error"])
def test_a_cuda_error_before_torch_2_8_is_an_accelerator_error(message):
    """torch < 2.8 (supported: torch>=2.4) raises a failed CUDA call as a plain RuntimeError with this prefix
    (2.8 on: torch.AcceleratorError). Either way: one line, exit 1, a resource problem, never exit 3."""
    from harness.checkpoint.errors import is_resource_error, problem_of
    from harness.exitcodes import classify

    exc = RuntimeError(message)
    assert classify(exc).line.startswith("harness: accelerator error (retryable, exit 1): RuntimeError: CUDA ")
    assert is_resource_error(exc) and problem_of(exc, 0).severity.value == "resource"
    assert classify(RuntimeError("expected CUDA error: handled")) is None  # the prefix, not the words anywhere
