"""``harness ckpt export``, ``import``, ``inspect`` and ``diff``: the commands in front of harness.interop. The
work (choosing the checkpoint, reading and verifying it, writing files) is interop's; what is here is turning its
summaries into the lines a user reads."""

from __future__ import annotations

import argparse
import json

from harness.ckpt_folder import require_folder
from harness.ckpt_render import config_line, human_size, loss_text, num_text, print_table, warn_skipped
from harness.errors import HarnessError
from harness.interop import dcp
from harness.interop.export import export_checkpoint
from harness.interop.importer import import_checkpoint
from harness.interop.inspection import diff_checkpoints, inspect_checkpoint
from harness.storage import Storage, redact_url

# optimizer hyperparameters worth a line in `inspect` (the rest are in --json)
_HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "betas", "eps", "initial_lr")


# -- export -----------------------------------------------------------------------------------------

def run_export(storage: Storage, args: argparse.Namespace, options: dict, secrets: list[str]) -> int:
    require_folder(storage)
    if (args.metric or args.mode) and not args.best:
        raise HarnessError("--metric and --mode choose the checkpoint with --best; add --best")
    summary = export_checkpoint(args.dir, args.out, fmt=args.format, step=args.step, best=args.best,
                                metric=args.metric, mode=args.mode, model=args.model, quantize=args.quantize,
                                storage_options=options)
    warn_skipped(summary["skipped"], secrets)
    chosen = "" if summary["chosen"] in ("newest", f"step {summary['step']}") else f", {summary['chosen']}"
    head = f"exported {summary['checkpoint']} (step {summary['step']}, epoch {summary['epoch']}{chosen})"
    if args.format in ("pt", "safetensors"):
        only = f" model {args.model!r}" if args.model else ""
        print(f"{head}{only} to {summary['out']}: {summary['format']}, {summary['tensors']} tensors, "
              f"{human_size(summary['bytes'])}")
    else:
        for o in summary["outputs"]:
            check = o.get("check") or {}
            how = check.get("method") or check.get("exporter")
            diff = check.get("max_abs_diff")
            checked = (f"checked: max abs diff {diff:.2g} vs the model" if diff is not None
                       else "not checked (onnxruntime not installed)")
            print(f"{head} model {o['model']!r} to {o['out']}: {summary['format']} ({how}), "
                  f"{human_size(o['bytes'])}; {checked}")
    q = summary.get("quantized")
    if q:
        ratio = q["float_bytes"] / q["int8_bytes"] if q["int8_bytes"] else float("inf")
        print(f"int8 dynamic quantization (torch.nn.Linear): weights {human_size(q['float_bytes'])} float -> "
              f"{human_size(q['int8_bytes'])} quantized ({ratio:.1f}x smaller, "
              f"{100 * (1 - q['int8_bytes'] / q['float_bytes']):.0f}% less); file {human_size(q['file_bytes'])}")
    return 0


# -- import -----------------------------------------------------------------------------------------

def run_import(args: argparse.Namespace, options: dict) -> int:
    cfg = None
    if args.config is not None or args.overrides:
        from harness import config as config_mod

        cfg = config_mod.load(args.config, args.overrides)
    summary = import_checkpoint(args.file, args.dir, step=args.step, epoch=args.epoch, config=cfg,
                                fresh_optimizer=args.fresh_optimizer, dry_run=args.dry_run, storage_options=options,
                                lease_timeout_s=args.lease_timeout)
    kinds = [f"{what} {', '.join(map(repr, summary[key]))}" for what, key in
             (("model", "models"), ("optimizer", "optimizers"), ("scheduler", "schedulers")) if summary[key]]
    done = "dry run: would import" if args.dry_run else "imported"
    print(f"{done} {redact_url(args.file)} into {redact_url(args.dir)} as {summary['checkpoint']}: step "
          f"{summary['step']} ({summary['step_source']}), epoch {summary['epoch']}, loss "
          f"{loss_text(summary['loss'])}; {'; '.join(kinds)}" + ("; from a bare state_dict" if summary["bare"] else ""))
    for note in summary["notes"]:
        print(f"  note: {note}")
    return 0


# -- inspect ----------------------------------------------------------------------------------------

def run_inspect(storage: Storage, args: argparse.Namespace, options: dict) -> int:
    require_folder(storage)
    if args.step is None and dcp.is_dcp(set(storage.listdir(""))):
        return _inspect_dcp(dcp.describe(storage, redact_url(storage.url)), args.json)
    info = inspect_checkpoint(args.dir, step=args.step, storage_options=options)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    warn_skipped(info["skipped"])
    print(f"checkpoint {info['checkpoint']} in {info['url']} ({info['chosen']}; quick check of sizes, "
          "`harness ckpt verify` checks every checksum)")
    metrics = ", ".join(f"{k}={num_text(v)}" for k, v in (info["metrics"] or {}).items()) or "-"
    print(f"  step {info['step']}, epoch {info['epoch']}, loss {loss_text(info['loss'])}, metrics: {metrics}")
    print(f"  created {info['created']}, world size {info['world_size']}, sharding {info['sharding']}")
    print(f"  format {info['format']} v{info['format_version']}, written by harness {info['harness_version']}, "
          f"torch {info['torch_version']}, python {info['python_version']}; checksums {info['checksum_algorithm']}")
    print(f"  size {human_size(info['total_bytes'])}: {info['tensors']} tensors in {info['data_files']} data "
          f"file(s), {human_size(info['data_bytes'])}, plus the manifest")
    cfg = info["config"]
    if cfg:
        print(f"  run config: {config_line(cfg)}")
    other = {k: v for k, v in (info["metadata"] or {}).items() if k != "config"}
    if other:
        print(f"  metadata: {json.dumps(other, default=str)[:300]}")
    for g in info["groups"]:
        _print_group(g)
    return 0


def _inspect_dcp(info: dict, as_json: bool) -> int:
    """A torch.distributed.checkpoint folder (torchtitan's step-N), from its metadata."""
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    files = ", ".join(info["files"][:3]) + (f" and {len(info['files']) - 3} more" if len(info["files"]) > 3 else "")
    print(f"torch.distributed.checkpoint folder {info['url']} (from its .metadata alone; `harness ckpt import` "
          "reads and checks the data)")
    values = ", ".join(info["values"][:3]) + (", ..." if len(info["values"]) > 3 else "")
    print(f"  {len(info['tensors'])} tensors, {human_size(info['bytes'])}, in {files}; "
          f"{len(info['values'])} other values{': ' + values if values else ''}")
    rows = [[t["key"], t["dtype"], str(t["shape"]), human_size(t["bytes"])
             + (f" in {t['chunks']} chunks" if t["chunks"] > 1 else "")] for t in info["tensors"]]
    if rows:
        print_table(["KEY", "DTYPE", "SHAPE", "SIZE"], rows, right=set())
    return 0


def _print_group(g: dict) -> None:
    """One model, optimizer, scheduler, ... of `inspect`: a summary line, then its tensors in columns."""
    label = f"{g['kind']} {g['name']!r}" if g["kind"] != "rank" else f"rank {g['name']}"
    extra = []
    if g.get("class"):
        extra.append(g["class"])
    desc = f"{g['count']} tensors, {human_size(g['bytes'])}"
    if g["kind"] == "model":
        desc += f", {g['elements']:,} parameters and buffers"
    hyper = g.get("hyperparameters")
    if hyper:
        desc += "; " + " | ".join(", ".join(f"{k}={num_text(v)}" for k, v in h.items() if k in _HYPERPARAMETERS)
                                  for h in hyper)
    if g.get("summary"):
        desc += "; " + ", ".join(f"{k}={num_text(v)}" for k, v in g["summary"].items())
    if g.get("position") is not None:
        desc += f"; data position {json.dumps(g['position'])}"
    print(f"{label}{' (' + ', '.join(extra) + ')' if extra else ''}: {desc}")
    if g["kind"] == "rank":
        return  # RNG states: sizes only
    rows = [[t["key"], t["dtype"], str(t["shape"]), human_size(t["bytes"])
             + (f" in {t['shards']} shards" if t["shards"] > 1 else "")] for t in g["tensors"]]
    if rows:
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])


# -- diff -------------------------------------------------------------------------------------------

def run_diff(args: argparse.Namespace, options: dict) -> int:
    for url in (args.a, args.b):
        require_folder(Storage(url, options))
    result = diff_checkpoints(args.a, args.b, step_a=args.step_a, step_b=args.step_b, storage_options=options,
                              ranks=args.ranks)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0 if result["identical"] else 1
    for side, label in (("a", "A"), ("b", "B")):
        s = result[side]
        warn_skipped(s["skipped"], label=f"{label}: ")
        print(f"{label}: {s['url']} {s['checkpoint']} (step {s['step']})")
    for d in result["different"]:
        if d["what"] == "values":
            print(f"differs     {d['key']}  {d['dtype']} {d['shape']}  max |a-b| {d['max_abs_diff']:.6g} "
                  f"({d['elements_different']} of {d['elements']} elements)")
        elif d["what"] == "value":
            print(f"value       {d['key']}: {num_text(d['a'])} -> {num_text(d['b'])}")
        else:
            print(f"{d['what']:<11} {d['key']}: {d['a']} -> {d['b']}")
    for k in result["only_a"]:
        print(f"only in A   {k}")
    for k in result["only_b"]:
        print(f"only in B   {k}")
    n_values = sum(1 for d in result["different"] if d["what"] == "value")
    n_tensors = len(result["different"]) - n_values
    print(f"{result['tensors_compared']} tensors in both: {result['tensors_identical']} identical, {n_tensors} "
          f"different; {len(result['only_a'])} keys only in A, {len(result['only_b'])} only in B; "
          f"{n_values} other values differ")
    print("identical" if result["identical"] else "different")
    return 0 if result["identical"] else 1
