"""``train.deterministic = true``: everything GPU kernels need to give the same bits on every run.

On CPU the harness's runs are bitwise reproducible as they are; on GPU several kernels are not unless asked:
cuBLAS picks split-K reductions with atomics, cuDNN autotunes (a different algorithm per run) and has
nondeterministic algorithms, index_add/scatter backward use atomics, and flash attention's backward accumulates
with atomics. This module asks for the deterministic choice of each; ops that have none then raise
(``torch.use_deterministic_algorithms``) instead of silently differing.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager

import torch

# cuBLAS reads this when it creates its handle (the first matmul on a device), so it must be in the
# environment before then; ":4096:8" is one of the two values torch accepts for deterministic cuBLAS.
CUBLAS_WORKSPACE = ":4096:8"


def enable() -> None:
    """Process-wide: call before the first CUDA matmul (the trainer calls it before CUDA is initialized)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def attention_kernels(deterministic: bool, device: torch.device) -> Callable[[], ContextManager]:
    """A context for the forward pass that keeps scaled_dot_product_attention off flash attention, whose
    backward is nondeterministic; the memory-efficient kernel (deterministic backward under
    use_deterministic_algorithms) and the math one stay allowed. Backward uses the kernel its forward chose,
    so wrapping the forward suffices."""
    if not (deterministic and device.type == "cuda"):
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return lambda: sdpa_kernel(backends)
