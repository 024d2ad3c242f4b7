"""A separate process that saves one checkpoint to S3 (for crash tests): ``python s3_worker.py URL STEP SEED``.

The state is a deterministic function of SEED (``make_state``), big enough for many multipart parts with
the small part size used here, so a fault at ``s3.part`` kills the process in the middle of an upload.
The S3 endpoint and credentials come from the standard AWS environment.
"""

from __future__ import annotations

import sys

import torch

STORAGE_OPTIONS = {"harness_part_size_mb": 1 / 32, "harness_max_concurrency": 2}   # 32 KiB parts


def make_state(seed: int) -> tuple[torch.nn.Module, dict]:
    """A model and a large extra tensor (~1.3 MB in all: about 40 parts of 32 KiB). No optimizer step:
    torch's first one costs seconds of imports in a fresh process."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    return model, {"big": torch.randn(250_000)}


def main() -> None:
    url, step, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from harness import CheckpointManager
    model, extra = make_state(seed)
    mgr = CheckpointManager(url, keep_last=0, storage_options=STORAGE_OPTIONS)
    mgr.save(step, models=model, extra=extra, loss=float(seed))
    mgr.close()
    print(f"saved step {step}", flush=True)


if __name__ == "__main__":
    main()
