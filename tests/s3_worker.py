"""A separate process that saves one checkpoint to S3 (for crash tests): ``python s3_worker.py URL STEP SEED``.

The state is a deterministic function of SEED (``make_state``), big enough for many multipart parts with
the small part size used here, so a fault at ``s3.part`` kills the process in the middle of an upload.
The S3 endpoint and credentials come from the standard AWS environment.
"""

from __future__ import annotations

import sys

import torch

STORAGE_OPTIONS = {"harness_part_size_mb": 1 / 32, "harness_max_concurrency": 2}   # 32 KiB parts


def make_state(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(16, 256)
    model(x).pow(2).mean().backward()
    opt.step()
    return model, opt


def main() -> None:
    url, step, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from harness import CheckpointManager
    model, opt = make_state(seed)
    mgr = CheckpointManager(url, keep_last=0, storage_options=STORAGE_OPTIONS)
    mgr.save(step, models=model, optimizers=opt, loss=float(seed))
    mgr.close()
    print(f"saved step {step}", flush=True)


if __name__ == "__main__":
    main()
