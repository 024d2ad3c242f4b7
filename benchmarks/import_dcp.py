#!/usr/bin/env python
"""Reading a torch.distributed.checkpoint folder (what torchtitan writes): harness's checked reader against
torch's own, on the same folder in one run.

The folder is ``dcp.save`` of a model's weights and AdamW moments (``get_state_dict``'s layout, ``--size-gb``
of state). Timed, warm (page cache) and cold (``posix_fadvise(DONTNEED)`` on every file first), median of
``--repeat``:

* ``torch_empty_planner``: torch's ``_load_state_dict(..., _EmptyStateDictLoadPlanner(), no_dist=True)``, what
  ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` and Accelerate's ``merge_fsdp_weights`` do:
  every tensor into new memory (its ``.metadata`` read with plain ``pickle.load``);
* ``torch_in_place``: ``dcp.load`` into a state dict of existing tensors, DCP at its best (torchtitan's resume);
* ``harness_read``: :func:`harness.interop.dcp.read_folder`: the metadata unpickled by an unpickler that knows
  only DCP's records, every file name, offset, length and chunk checked, each record read with
  ``torch.load(weights_only=True)``, sharded tensors put back together;
* ``harness_import``: ``harness ckpt import``'s whole job (:func:`import_checkpoint`): that read, plus writing
  the state as a harness checkpoint, durable (fsync'd) and committed.

    python benchmarks/import_dcp.py --size-gb 1 --repeat 3 --out benchmarks/results

Writes ``import_dcp_cpu_<stamp>.json``/``.png`` (and ``_latest``) under ``--out``, the table on stdout.

``--s3``: the same folder in S3 (moto on loopback, started here, unless AWS_ENDPOINT_URL and ``--s3-url`` say
where), read by torch through DCP's own ``FsspecReader`` (both ways above) and by harness, which reads small
records in spans of adjacent ones, several at a time (``harness_read``), and, for comparison in the same run,
record by record through a window on the object as it did before (``harness_read_by_record``). Writes
``import_dcp_s3_<stamp>.json``/``.png``. moto holds objects in memory and answers a ranged GET in time that
grows with the object: fewer, larger requests win there, as more at a time win on S3.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:  # runnable from a checkout without installing
        sys.path.insert(0, str(p))

from _results import pyplot, save_figure, write_results  # noqa: E402
from checkpoint_io import build_state, fadvise_out, list_files  # noqa: E402
from train_overhead import environment  # noqa: E402

from harness.interop import dcp as harness_dcp  # noqa: E402
from harness.interop.importer import import_checkpoint  # noqa: E402
from harness.storage import Storage  # noqa: E402

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402

METHODS = ("torch_empty_planner", "torch_in_place", "harness_read", "harness_import")


def log(msg: str) -> None:
    print(f"[import_dcp] {msg}", file=sys.stderr, flush=True)


def methods(src: Path, template: dict, work: Path) -> dict[str, Callable[[], Any]]:
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    def torch_empty_planner() -> Any:
        out: dict = {}
        _load_state_dict(out, storage_reader=dcp.FileSystemReader(str(src)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        return out

    def torch_in_place() -> Any:
        dcp.load(template, checkpoint_id=str(src))
        return template

    def harness_import() -> Any:
        dest = work / "imported"
        shutil.rmtree(dest, ignore_errors=True)
        return import_checkpoint(src, dest)

    return {"torch_empty_planner": torch_empty_planner, "torch_in_place": torch_in_place,
            "harness_read": lambda: harness_dcp.read_folder(Storage(str(src)), str(src)),
            "harness_import": harness_import}


def run(args: argparse.Namespace, work: Path) -> dict:
    model, opt, desc = build_state("synthetic", args.size_gb, args.layers, torch.device("cpu"))
    msd, osd = get_state_dict(model, opt)
    src = work / "dcp"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(src))
    state_bytes = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    template = {"model": msd, "optim": osd}
    timings: dict[str, dict[str, list[float]]] = {m: {"warm": [], "cold": []} for m in METHODS}
    fns = methods(src, template, work)
    for rnd in range(args.repeat):  # interleaved, so a noisy moment falls on every method alike
        for cache in ("cold", "warm"):
            for name in METHODS:
                if cache == "cold":
                    fadvise_out(list_files(src))
                else:
                    fns[name]()  # warm-up: the page cache holds the folder
                t0 = time.perf_counter()
                fns[name]()
                timings[name][cache].append(time.perf_counter() - t0)
        log(f"round {rnd + 1}/{args.repeat} done")
    rows = [{"method": m, **{f"{c}_s": statistics.median(timings[m][c]) for c in ("cold", "warm")},
             **{f"{c}_gbps": state_bytes / 1e9 / statistics.median(timings[m][c]) for c in ("cold", "warm")},
             "samples": timings[m]} for m in METHODS]
    return {"benchmark": "import_dcp", "state": desc, "state_bytes": state_bytes, "repeat": args.repeat,
            "rows": rows}


S3_METHODS = ("torch_empty_planner", "torch_in_place", "harness_read", "harness_read_by_record")


def s3_methods(url: str, template: dict) -> dict[str, Callable[[], Any]]:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    def torch_empty_planner() -> Any:
        out: dict = {}
        _load_state_dict(out, storage_reader=FsspecReader(url), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        return out

    def torch_in_place() -> Any:
        dcp.load(template, storage_reader=FsspecReader(url))
        return template

    def by_record() -> Any:  # before: no spans, every record through a window on the object
        fetch = harness_dcp._Files.fetch
        harness_dcp._Files.fetch = lambda self, wanted: None
        try:
            return harness_dcp.read_folder(Storage(url), url)
        finally:
            harness_dcp._Files.fetch = fetch

    return {"torch_empty_planner": torch_empty_planner, "torch_in_place": torch_in_place,
            "harness_read": lambda: harness_dcp.read_folder(Storage(url), url), "harness_read_by_record": by_record}


def run_s3(args: argparse.Namespace, work: Path) -> dict:
    model, opt, desc = build_state("synthetic", args.size_gb, args.layers, torch.device("cpu"))
    msd, osd = get_state_dict(model, opt)
    src = work / "dcp"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(src))
    server = None
    url = args.s3_url
    if url is None:
        from s3_io import start_moto
        base, server = start_moto()
        url = f"{base}/dcp"
    try:
        storage = Storage(url)
        for f in src.iterdir():
            storage.write_bytes(f.name, f.read_bytes())
        state_bytes = sum(f.stat().st_size for f in src.iterdir())
        fns = s3_methods(url, {"model": msd, "optim": osd})
        timings: dict[str, list[float]] = {m: [] for m in S3_METHODS}
        for name in S3_METHODS:  # untimed: clients, connections and credentials set up once for each
            fns[name]()
        for rnd in range(args.repeat):  # interleaved
            for name in S3_METHODS:
                t0 = time.perf_counter()
                fns[name]()
                timings[name].append(time.perf_counter() - t0)
            log(f"round {rnd + 1}/{args.repeat} done")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    rows = [{"method": m, "s": statistics.median(timings[m]), "gbps": state_bytes / 1e9 / statistics.median(timings[m]),
             "samples": timings[m]} for m in S3_METHODS]
    return {"benchmark": "import_dcp_s3", "endpoint": "moto on loopback" if server is not None else "given",
            "state": desc, "state_bytes": state_bytes, "records": _records(src), "repeat": args.repeat, "rows": rows}


def _records(src: Path) -> int:
    layout = harness_dcp.read_layout(Storage(str(src)), str(src))
    return sum(len(chunks) for _, _, chunks in layout.tensors.values()) + len(layout.values)


def s3_table(result: dict) -> str:
    base = {r["method"]: r for r in result["rows"]}["torch_empty_planner"]
    head = (f"DCP folder of {result['state_bytes'] / 1e9:.2f} GB ({result['records']} records) on S3 "
            f"({result['endpoint']}), median of {result['repeat']}; ratio: torch_empty_planner's time / this one's")
    lines = [head, f"{'method':26}{'s':>9}{'GB/s':>9}{'ratio':>9}"]
    lines += [f"{r['method']:26}{r['s']:9.3f}{r['gbps']:9.3f}{base['s'] / r['s']:9.2f}" for r in result["rows"]]
    return "\n".join(lines)


def table(result: dict) -> str:
    base = {r["method"]: r for r in result["rows"]}["torch_empty_planner"]
    cells = [["method", "cold s", "GB/s", "ratio", "warm s", "GB/s", "ratio"]]
    cells += [[r["method"], *(f"{v:.{d}f}" for c in ("cold", "warm") for v, d in
                             ((r[f"{c}_s"], 3), (r[f"{c}_gbps"], 2), (base[f"{c}_s"] / r[f"{c}_s"], 2)))]
              for r in result["rows"]]
    head = (f"DCP folder of {result['state_bytes'] / 1e9:.2f} GB (model + AdamW moments), median of "
            f"{result['repeat']}; ratio: torch_empty_planner's time / this one's (>1 is faster)")
    return "\n".join([head, *("".join(c.ljust(22) if i == 0 else c.rjust(9) for i, c in enumerate(row))
                               for row in cells)])


def plot(result: dict, path: Path) -> str | None:
    """Seconds per method: cold and warm bars for a local folder, one bar each from S3."""
    plt, why = pyplot()
    if plt is None:
        return why
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rows = result["rows"]
    series = ("cold_s", "warm_s") if "cold_s" in rows[0] else ("s",)
    width = 0.8 / len(series)
    for i, key in enumerate(series):
        ax.bar([x + width * i for x in range(len(rows))], [r[key] for r in rows], width,
               label=key[:-2] if len(series) > 1 else None)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(rows))], [r["method"] for r in rows],
                  rotation=15)
    ax.set_ylabel("seconds (median)")
    where = f" from S3 ({result['endpoint']})" if "endpoint" in result else ""
    ax.set_title(f"Reading a {result['state_bytes'] / 1e9:.2f} GB DCP folder{where}")
    if len(series) > 1:
        ax.legend()
    save_figure(plt, fig, path)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="state size (weights + AdamW moments)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--s3", action="store_true", help="the folder in S3 (moto on loopback unless --s3-url)")
    p.add_argument("--s3-url", default=None, help="s3://bucket/prefix to use (credentials from the environment)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    work = Path(tempfile.mkdtemp(prefix="import_dcp-", dir=args.dir))
    try:
        result = run_s3(args, work) if args.s3 or args.s3_url else run(args, work)
        result["env"] = environment(args, "cpu", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if result["benchmark"] == "import_dcp_s3":
        write_results(out, "import_dcp_s3", stamp, result, lambda path: plot(result, path))
        print(s3_table(result))
        return 0
    write_results(out, "import_dcp_cpu", stamp, result, lambda path: plot(result, path))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
