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
    plt, why = pyplot()
    if plt is None:
        return why
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["method"] for r in result["rows"]]
    for i, cache in enumerate(("cold", "warm")):
        ax.bar([x + 0.4 * i for x in range(len(names))], [r[f"{cache}_s"] for r in result["rows"]], 0.4,
               label=cache)
    ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=15)
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Reading a {result['state_bytes'] / 1e9:.2f} GB DCP folder")
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
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    work = Path(tempfile.mkdtemp(prefix="import_dcp-", dir=args.dir))
    try:
        result = run(args, work)
        result["env"] = environment(args, "cpu", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_results(out, "import_dcp_cpu", stamp, result, lambda path: plot(result, path))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
