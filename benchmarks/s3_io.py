#!/usr/bin/env python
"""S3 I/O benchmark for harness.storage (its s3/ backend): multipart upload and ranged concurrent download throughput,
and the upload's peak Python memory, for several part sizes and concurrencies; then a CheckpointManager
save/restore of one state of the same size.

    python benchmarks/s3_io.py                                   # against moto on loopback (started here)
    AWS_PROFILE=... python benchmarks/s3_io.py --url s3://my-bucket/bench --size-mb 2048 --part-mb 16,64 \\
        --concurrency 4,8,16 --out benchmarks/results

Without --url the endpoint is moto's Python server in a subprocess on loopback: the figures then measure moto and this
machine's CPU, not S3; they show the shape (concurrency helps, memory stays bounded), not real throughput.
Objects written under --url are deleted afterwards. Writes s3_io_<timestamp>.json under --out if given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import CheckpointManager  # noqa: E402
from harness.checkpoint.format import checksum  # noqa: E402
from harness.storage import Storage  # noqa: E402

MIB = 1 << 20


def start_moto() -> tuple[str, subprocess.Popen]:
    """moto's S3 server in a process of its own (its memory must not count as ours), on a free port."""
    import boto3
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(1 << 20)}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    bucket = f"harness-bench-{uuid.uuid4().hex[:8]}"
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    return f"s3://{bucket}/bench", server


def bench_blob(url: str, data: memoryview, part_mb: float, conc: int) -> dict:
    st = Storage(url, {"harness_part_size_mb": part_mb, "harness_max_concurrency": conc})
    st.check_access(write=True)
    tracemalloc.start()
    t0 = time.perf_counter()
    with st.open_write("blob.bin") as f:
        step = 4 * MIB
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
    up = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    buf = bytearray(len(data))
    t0 = time.perf_counter()
    with st.open_read("blob.bin") as f:   # one readinto: concurrent ranged GETs straight into buf
        assert f.readinto(memoryview(buf)) == len(buf)
    down = time.perf_counter() - t0
    ok = checksum(buf) == checksum(data)
    st.remove_tree("")
    return {"part_mb": part_mb, "concurrency": conc, "upload_s": round(up, 3), "upload_MBps": round(len(data) / up / 1e6, 1),
            "download_s": round(down, 3), "download_MBps": round(len(data) / down / 1e6, 1),
            "upload_peak_python_MB": round(peak / 1e6, 1), "bound_MB": round((conc + 1) * part_mb * MIB / 1e6, 1),
            "peak_parts_in_flight": st.backend.client.peak_inflight_parts, "verified": ok}


def bench_manager(url: str, tensor: torch.Tensor, part_mb: float, conc: int) -> dict:
    opts = {"harness_part_size_mb": part_mb, "harness_max_concurrency": conc}
    mgr = CheckpointManager(url, keep_last=1, storage_options=opts)
    t0 = time.perf_counter()
    mgr.save(1, extra={"w": tensor})
    save = time.perf_counter() - t0
    mgr.close()
    t0 = time.perf_counter()
    result = CheckpointManager(url, storage_options=opts).restore()
    restore = time.perf_counter() - t0
    ok = torch.equal(result.extra["w"], tensor)
    Storage(url).remove_tree("")
    n = tensor.numel() * tensor.element_size()
    return {"part_mb": part_mb, "concurrency": conc, "save_s": round(save, 3), "save_MBps": round(n / save / 1e6, 1),
            "restore_s": round(restore, 3), "restore_MBps": round(n / restore / 1e6, 1), "verified": ok}


def bench_plain_s3fs(url: str, tensor: torch.Tensor) -> dict:
    """The baseline: one torch.save blob, s3fs pipe (put) and cat (get), torch.load - s3fs's defaults."""
    import io

    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root.rstrip('/')}/plain/model.pt"
    t0 = time.perf_counter()
    buf = io.BytesIO()
    torch.save({"w": tensor}, buf)
    fs.pipe_file(path, buf.getvalue())
    save = time.perf_counter() - t0
    fs.invalidate_cache()
    t0 = time.perf_counter()
    loaded = torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)
    restore = time.perf_counter() - t0
    fs.rm(f"{root.rstrip('/')}/plain", recursive=True)
    n = tensor.numel() * tensor.element_size()
    return {"save_s": round(save, 3), "save_MBps": round(n / save / 1e6, 1), "restore_s": round(restore, 3),
            "restore_MBps": round(n / restore / 1e6, 1), "verified": torch.equal(loaded["w"], tensor)}


def print_table(ckpt: list[dict], plain: dict) -> None:
    print(f"\n{'method':<34}{'save MB/s':>10}{'restore MB/s':>14}{'save x':>8}{'restore x':>10}")
    print(f"{'s3fs pipe/cat of torch.save blob':<34}{plain['save_MBps']:>10}{plain['restore_MBps']:>14}"
          f"{1.0:>8.2f}{1.0:>10.2f}")
    for r in ckpt:
        name = f"harness part {r['part_mb']:g} MiB x{r['concurrency']}"
        print(f"{name:<34}{r['save_MBps']:>10}{r['restore_MBps']:>14}{r['save_MBps'] / plain['save_MBps']:>8.2f}"
              f"{r['restore_MBps'] / plain['restore_MBps']:>10.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="s3://bucket/prefix (default: moto on loopback)")
    p.add_argument("--size-mb", type=float, default=64)
    p.add_argument("--part-mb", default="5,16")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--out", help="folder for s3_io_<timestamp>.json")
    args = p.parse_args()
    server = None
    url = args.url
    if url is None:
        url, server = start_moto()
    n = int(args.size_mb * MIB) // 4 * 4
    tensor = torch.randn(n // 4)
    data = memoryview(tensor.numpy()).cast("B")
    rows, ckpt = [], []
    try:
        plain = bench_plain_s3fs(f"{url.rstrip('/')}/{uuid.uuid4().hex[:8]}", tensor)
        print(json.dumps({"plain_s3fs": plain}), flush=True)
        for part in [float(x) for x in args.part_mb.split(",")]:
            for conc in [int(x) for x in args.concurrency.split(",")]:
                run = f"{url.rstrip('/')}/{uuid.uuid4().hex[:8]}"
                rows.append(bench_blob(run, data, part, conc))
                print(json.dumps(rows[-1]), flush=True)
                ckpt.append(bench_manager(run, tensor, part, conc))
                print(json.dumps(ckpt[-1]), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print_table(ckpt, plain)
    if server is not None:
        print("endpoint: moto on loopback - moto itself is the ceiling here, not S3")
    report = {"endpoint": "moto (loopback)" if server is not None else "given --url", "size_MB": round(n / 1e6, 1),
              "plain_s3fs_torch_save": plain, "blob": rows, "checkpoint": ckpt, "when": _dt.datetime.now().isoformat(timespec="seconds")}
    if args.out:
        out = Path(args.out) / f"s3_io_{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0 if all(r["verified"] for r in rows + ckpt + [plain]) else 1


if __name__ == "__main__":
    sys.exit(main())
