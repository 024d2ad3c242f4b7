"""The cost of a save in a folder that keeps many checkpoints (a large keep_last/keep_best).

    python benchmarks/many_checkpoints.py --counts 10,100,1000 --s3-counts 10,100,300

After every save the saving job applies retention, which lists the folder and needs every checkpoint's commit
record (its step, loss and metrics rank them). It used to read all of them at every save: one GET per
checkpoint on S3, so a run keeping hundreds of checkpoints spent seconds per save there, on the training's
time when saves are synchronous. The job now reads each record once in its life (they never change), and
with ``keep_last = 0`` (keep every checkpoint) none: nothing is ranked.

For each folder size N (keep_last = 10**6: everything kept, every record needed) this fills a folder with N tiny
checkpoints (an 8x8 Linear: the data is negligible, the
folder's size is what is measured), then times ``--saves`` more saves two ways in the same run, one after the other:
``now`` (the job's own CheckpointManager, records read once) and ``every record`` (a manager that forgets
what it read: what each save cost before). Median seconds per save and commit records read per save
(counted at the fault seam's ``discovery.read_commit`` point). Local disk (a temp folder) and S3 (moto on
loopback, started here; moto's latency is ~1 ms where S3's is tens: there the gap is wider). JSON and PNG
under benchmarks/results/ (many_checkpoints_<stamp>.json, _latest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent):  # runnable from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
from _results import pyplot, save_figure, write_results  # noqa: E402

from harness import CheckpointManager, faults  # noqa: E402
from harness.checkpoint.discovery import CommitCache  # noqa: E402


KEEP = 10**6  # ranks every checkpoint (keep_last=0 would read no record at all) and deletes none


class Forgetful(CommitCache):
    """A cache that never hits: every retention pass reads every record, as before."""

    def get(self, name: str, size: int | None) -> dict | None:
        return None


def fill(url: str, n: int, model: torch.nn.Module) -> None:
    mgr = CheckpointManager(url, keep_last=KEEP)
    for step in range(1, n + 1):
        mgr.save(step, models=model, loss=1.0 / step)
    mgr.close()


def time_saves(url: str, first: int, saves: int, model: torch.nn.Module) -> dict:
    """``saves`` saves with each manager in turn (the folder grows by one each time): median s, reads/save."""
    mgrs = {"now": CheckpointManager(url, keep_last=KEEP), "every record": CheckpointManager(url, keep_last=KEEP)}
    mgrs["every record"]._ctx.commits = Forgetful()
    times: dict[str, list[float]] = {k: [] for k in mgrs}
    reads: dict[str, int] = {k: 0 for k in mgrs}
    for how, mgr in mgrs.items():  # one after the other: a manager reads the other's records, as news
        first += 1  # the first save of a job reads every record once: not what is compared here
        mgr.save(first, models=model, loss=1.0 / first)
        for _ in range(saves):
            first += 1
            counted = []
            faults.install(lambda point, info: counted.append(point) if point == "discovery.read_commit" else None)
            t0 = time.perf_counter()
            mgr.save(first, models=model, loss=1.0 / first)
            times[how].append(time.perf_counter() - t0)
            faults.install(None)
            reads[how] += len(counted)
    for mgr in mgrs.values():
        mgr.close()
    return {how: {"save_s": round(statistics.median(t), 4), "records_read_per_save": reads[how] / saves}
            for how, t in times.items()}


def run_backend(label: str, make_url, counts: list[int], saves: int) -> list[dict]:
    rows = []
    model = torch.nn.Linear(8, 8)
    for n in counts:
        url = make_url(n)
        t0 = time.perf_counter()
        fill(url, n, model)
        res = time_saves(url, n, saves, model)
        rows.append({"backend": label, "checkpoints": n, **{f"{k}": v for k, v in res.items()},
                     "fill_s": round(time.perf_counter() - t0, 1)})
        now, before = res["now"], res["every record"]
        print(f"{label:6} {n:6d}  {now['save_s']:8.4f} s  {before['save_s']:8.4f} s  "
              f"{before['save_s'] / now['save_s']:6.1f}x  {now['records_read_per_save']:5.1f}  "
              f"{before['records_read_per_save']:7.1f}", flush=True)
    return rows


def plot(rows: list[dict]):
    def draw(path: Path) -> str | None:
        plt, why = pyplot()
        if plt is None:
            return why
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for backend in sorted({r["backend"] for r in rows}):
            mine = [r for r in rows if r["backend"] == backend]
            xs = [r["checkpoints"] for r in mine]
            ax.plot(xs, [r["now"]["save_s"] for r in mine], "o-", label=f"{backend}: now (records read once)")
            ax.plot(xs, [r["every record"]["save_s"] for r in mine], "x--",
                    label=f"{backend}: every record, every save")
        ax.set_xscale("log")
        ax.set_xlabel("checkpoints in the folder")
        ax.set_ylabel("seconds per save (median)")
        ax.set_title("A save in a folder that keeps its checkpoints")
        ax.legend(fontsize=8)
        return save_figure(plt, fig, path)
    return draw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,100,1000", help="folder sizes on local disk ('' for none)")
    ap.add_argument("--s3-counts", default="10,100,300", help="folder sizes on S3 (moto; '' for none)")
    ap.add_argument("--saves", type=int, default=5, help="timed saves per manager and size")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    s3_counts = [int(c) for c in args.s3_counts.split(",") if c]
    print(f"{'where':6} {'ckpts':>6}  {'now':>10}  {'before':>10}  {'ratio':>7}  reads/save now, before")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="many_ckpts_") as tmp:
        rows += run_backend("local", lambda n: str(Path(tmp) / f"n{n}"), counts, args.saves)
    if s3_counts:
        from s3_io import start_moto
        base, server = start_moto()
        try:
            rows += run_backend("s3", lambda n: f"{base}/n{n}", s3_counts, args.saves)
        finally:
            server.terminate()
            server.wait(timeout=30)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    given = argv if argv is not None else sys.argv[1:]
    result = {"command": "python benchmarks/many_checkpoints.py " + " ".join(given),
              "s3_endpoint": "moto on loopback" if s3_counts else None, "saves": args.saves, "rows": rows}
    write_results(out, "many_checkpoints", stamp, result, plot(rows))
    print(f"results: {out}/many_checkpoints_{stamp}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
