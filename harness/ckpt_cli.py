"""``harness ckpt``: list, verify, inspect, diff, export and import checkpoints from the command line.

    harness ckpt list DIR [--json] [--all] [--verify]
    harness ckpt verify DIR [--step N | --all]
    harness ckpt inspect DIR [--step N] [--json]
    harness ckpt diff A B [--step-a N] [--step-b M] [--json]
    harness ckpt export DIR [--step N | --best [--metric NAME] [--mode min|max]]
                        --format pt|safetensors|torchscript|onnx --out FILE [--model NAME] [--quantize int8]
    harness ckpt import FILE DIR [--step N] [--epoch E] [--config TOML [--set KEY=VALUE ...]] [--fresh-optimizer]

DIR is a local path or any fsspec URL (``file://``, ``s3://bucket/run1``, ``memory://``). Every subcommand
takes ``--storage-option KEY=VALUE`` (repeatable): VALUE is parsed as JSON when it is valid JSON (``true``,
``5``, ``{"endpoint_url": "..."}``) and kept as a string otherwise; a dotted KEY nests
(``client_kwargs.endpoint_url=http://...``). Option values and URL credentials are never printed.

Exit status: 0 on success; 1 when verification fails, no checkpoint is found, or on any expected error,
which is printed as one line ``harness: error: ...`` on stderr. ``diff``: 0 identical, 1 different,
2 on an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
from typing import Any

from harness.checkpoint.discovery import CheckpointInfo, list_checkpoints, open_checkpoint, verify_checkpoint
from harness.checkpoint.export import FORMATS, QUANTIZE, export_checkpoint
from harness.checkpoint.format import MANIFEST_FILE
from harness.checkpoint.importer import import_checkpoint
from harness.checkpoint.inspection import diff_checkpoints, inspect_checkpoint
from harness.errors import CheckpointError, HarnessError
from harness.storage import Storage, redact_url

PROG = "harness"


def add_ckpt_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``ckpt`` command (list/verify/inspect/diff/export/import) to an argparse subparsers object."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--storage-option", metavar="KEY=VALUE", action="append", default=[],
                         dest="storage_option", help="fsspec storage option (repeatable; VALUE parsed as JSON "
                         "if it is JSON; dotted KEY nests)")
    common = argparse.ArgumentParser(add_help=False, parents=[options])
    common.add_argument("dir", metavar="DIR", help="checkpoint folder: local path or fsspec URL (s3://bucket/run1)")

    ckpt = subparsers.add_parser("ckpt", help="list, verify, inspect, diff, export and import checkpoints",
                                 description="List, verify, inspect, diff, export and import checkpoints.")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True,
                              metavar="{list,verify,inspect,diff,export,import}")

    p = sub.add_parser("list", parents=[common], help="committed checkpoints with their status",
                       description="Committed checkpoints, oldest first: step, epoch, loss, size, created, world "
                       "size, sharding and status (valid, or why not). Exit 0 even when some are damaged.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--all", action="store_true", help="also show uncommitted folders (status 'uncommitted')")
    p.add_argument("--verify", action="store_true",
                   help="check every checksum (reads all data) instead of the quick check of commit record, "
                   "manifest and data file sizes")

    p = sub.add_parser("verify", parents=[common], help="full checksum verification",
                       description="Verify every checksum of the newest committed checkpoint (or of the newest "
                       "at step N, or of all). Exit 0 only if every one verified is valid.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, metavar="N", help="verify the checkpoint of step N")
    g.add_argument("--all", action="store_true", help="verify every committed checkpoint")

    p = sub.add_parser("inspect", parents=[common], help="what a checkpoint holds: metadata, sizes, tensors",
                       description="Show the newest checkpoint whose manifest validates (or the one at step N): "
                       "versions, step, epoch, loss, metrics, world size, sharding, the run config, sizes per "
                       "model, optimizer, scheduler and rank, and every tensor with dtype, shape and size. Reads "
                       "only the commit record and the manifest (data file sizes are checked, checksums are not: "
                       "use 'verify').")
    p.add_argument("--step", type=int, metavar="N", help="inspect the checkpoint of step N")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")

    p = sub.add_parser("diff", parents=[options], help="compare two checkpoints tensor by tensor",
                       description="Compare the replicated state (models, optimizers, schedulers, scaler, extra) "
                       "of two checkpoints tensor by tensor: max absolute difference of each tensor that differs, "
                       "keys found on one side only, and other values (hyperparameters, counters) that differ. "
                       "Per-rank state (RNG, data position) is not compared. Every byte read is verified. "
                       "Exit status: 0 if identical, 1 if different, 2 on an error.")
    p.add_argument("a", metavar="A", help="first checkpoint folder (local path or fsspec URL)")
    p.add_argument("b", metavar="B", help="second checkpoint folder (may be the same as A with --step-a/--step-b)")
    p.add_argument("--step-a", type=int, metavar="N", help="use A's checkpoint of step N (default: newest valid)")
    p.add_argument("--step-b", type=int, metavar="M", help="use B's checkpoint of step M (default: newest valid)")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")

    p = sub.add_parser(
        "export", parents=[common], help="write one checkpoint as a single file (pt, safetensors, torchscript, onnx)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the newest valid checkpoint (or the one at step N, or the best by a metric) as files "
        "for inference or plain PyTorch:\n"
        "  pt           torch.save dict with the PyTorch tutorial's keys (epoch, model_state_dict,\n"
        "               optimizer_state_dict, scheduler_state_dict, loss); loads with\n"
        "               torch.load(FILE, weights_only=True)\n"
        "  safetensors  the model weights only\n"
        "  torchscript  the model in eval mode, traced: torch.jit.load(FILE)\n"
        "  onnx         the model in eval mode, dynamic batch dimension (needs: pip install 'harness[onnx]')\n"
        "torchscript and onnx rebuild the model from the run config that `harness train` records in the\n"
        "checkpoint (model/data sections, or train.entry), and trace it on a batch of two dataset items.\n\n"
        "Several models (a GAN): --model NAME exports that one to FILE. Without --model, pt and\n"
        "safetensors put them all in FILE (model_state_dicts / NAME. prefixes), while torchscript and\n"
        "onnx write one file per model with the name inserted before the suffix:\n"
        "  --out gan.onnx  ->  gan.generator.onnx, gan.discriminator.onnx")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, metavar="N", help="export the checkpoint of step N")
    g.add_argument("--best", action="store_true",
                   help="export the best valid checkpoint by --metric/--mode (default: the run config's "
                   "checkpoint.best_metric/best_mode, else loss/min)")
    p.add_argument("--metric", metavar="NAME", help="with --best: 'loss' or a key of the saved metrics")
    p.add_argument("--mode", choices=("min", "max"), help="with --best: whether lower or higher is better")
    p.add_argument("--format", required=True, choices=FORMATS, dest="format")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (local); written atomically")
    p.add_argument("--model", metavar="NAME", help="export only the model of this name")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="dynamic int8 quantization of the Linear layers (torchscript and pt; CPU inference); "
                   "prints the size reduction")

    p = sub.add_parser(
        "import", parents=[options], help="turn a plain torch.save checkpoint into a harness checkpoint",
        description="Write FILE, a torch.save general checkpoint with the PyTorch tutorial's keys (epoch, "
        "model_state_dict, optimizer_state_dict, scheduler_state_dict, loss), a bare state_dict, or a "
        "safetensors file, into DIR as a harness checkpoint (model 'model', optimizer 'optimizer', scheduler "
        "'scheduler'), so `harness train` resumes from it. FILE is read with torch.load(weights_only=True): "
        "a file that needs unpickling arbitrary objects is refused and nothing from it runs. A 'module.' "
        "prefix is stripped. With --config (the run's TOML, plus --set overrides) the model is checked "
        "against the config's model now, a missing optimizer or scheduler state is created from the config, "
        "and the config is recorded; without it the file's state is stored as is.")
    p.add_argument("file", metavar="FILE", help="torch.save or safetensors file (local path or fsspec URL)")
    p.add_argument("dir", metavar="DIR", help="checkpoint folder to write into (created if missing)")
    p.add_argument("--step", type=int, metavar="N",
                   help="global step to record (default: the file's step, else the optimizer's step counter, else 0)")
    p.add_argument("--epoch", type=int, metavar="E", help="epoch to record (default: the file's epoch, else 0)")
    p.add_argument("--config", metavar="TOML", help="the config of the run that will resume from the import")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (as for `harness train`); repeatable")
    p.add_argument("--fresh-optimizer", action="store_true",
                   help="ignore the file's optimizer state (e.g. another optimizer than the config's)")
    return ckpt


def run_ckpt(args: argparse.Namespace) -> int:
    """Run a parsed ``ckpt`` command; returns the exit status."""
    options: dict = {}
    urls = [args.a, args.b] if args.ckpt_command == "diff" else [args.dir]
    if args.ckpt_command == "import":
        urls.append(args.file)
    secrets = [s for u in urls for s in _url_secrets(u)]
    failed = 2 if args.ckpt_command == "diff" else 1
    try:
        options = parse_storage_options(args.storage_option)
        secrets += _leaf_strings(options)
        if args.ckpt_command == "diff":
            return _diff(args, options)
        if args.ckpt_command == "import":
            return _import(args, options)
        storage = Storage(args.dir, options)
        if args.ckpt_command == "list":
            return _list(storage, args)
        if args.ckpt_command == "verify":
            return _verify(storage, args)
        if args.ckpt_command == "inspect":
            return _inspect(storage, args, options)
        if args.ckpt_command == "export":
            return _export(storage, args, options, secrets)
        raise HarnessError(f"unknown ckpt command {args.ckpt_command!r}")
    except (HarnessError, OSError, EOFError) as exc:
        msg = str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"
        _error(msg, secrets)
        return failed
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - only storage backend failures; anything else is a bug
        if not _is_backend_error(exc):
            raise
        _error(f"storage: {type(exc).__name__}: {exc}", secrets)
        return failed


_BACKEND_MODULES = ("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "adlfs", "azure")


def _is_backend_error(exc: BaseException) -> bool:
    """Failures raised by the storage backend (missing credentials, unreachable endpoint, ...): expected
    errors for a command-line user, not harness bugs."""
    return any(cls.__module__.split(".")[0] in _BACKEND_MODULES for cls in type(exc).__mro__)


# -- list -------------------------------------------------------------------------------------------

def _list(storage: Storage, args: argparse.Namespace) -> int:
    _require_folder(storage)
    rows = [_row(storage, info, full=args.verify) for info in list_checkpoints(storage, committed_only=not args.all)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no {'checkpoint folders' if args.all else 'committed checkpoints'} in {redact_url(storage.url)}")
        return 0
    header = ["NAME", "STEP", "EPOCH", "LOSS", "SIZE", "CREATED", "WORLD", "SHARDING", "STATUS"]
    table = [[r["name"], _s(r["step"]), _s(r["epoch"]), _loss(r["loss"]), r["size"] or "-", _short_time(r["created"]),
              _s(r["world_size"]), r["sharding"] or "-", r["status"]] for r in rows]
    right = {1, 2, 3, 4, 6}
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        cells[-1] = row[-1]  # no trailing spaces after the last column
        print("  ".join(cells))
    return 0


def _row(storage: Storage, info: CheckpointInfo, full: bool) -> dict:
    c = info.commit if isinstance(info.commit, dict) else {}
    row: dict[str, Any] = {
        "name": info.name, "step": info.step, "attempt": info.attempt, "epoch": c.get("epoch"),
        "loss": c.get("loss"), "size_bytes": c.get("total_bytes"), "size": None, "created": c.get("created"),
        "world_size": c.get("world_size"), "sharding": c.get("sharding"), "committed": info.committed,
        "valid": False, "status": "",
    }
    if not info.committed:
        row["status"] = "uncommitted"
        row["size_bytes"] = _folder_size(storage, info.name)
    elif info.problem is not None:
        row["status"] = _reason(info.name, info.problem)
    else:
        try:
            (verify_checkpoint if full else open_checkpoint)(storage, info.name)
            row["valid"], row["status"] = True, "valid"
        except (CheckpointError, OSError, EOFError) as exc:
            row["status"] = _reason(info.name, str(exc))
    if isinstance(row["size_bytes"], int):
        row["size"] = human_size(row["size_bytes"])
    return row


def _folder_size(storage: Storage, name: str) -> int | None:
    try:
        return int(storage.fs.du(storage.path(name), total=True))
    except Exception:  # noqa: BLE001 - a size is nice to have for an uncommitted folder, not essential
        return None


# -- verify -----------------------------------------------------------------------------------------

def _verify(storage: Storage, args: argparse.Namespace) -> int:
    _require_folder(storage)
    infos = list_checkpoints(storage)
    where = redact_url(storage.url)
    if args.step is not None:
        infos = [i for i in infos if i.step == args.step][-1:]
        if not infos:
            raise CheckpointError(f"no committed checkpoint at step {args.step} in {where}")
    elif not args.all:
        infos = infos[-1:]
    if not infos:
        raise CheckpointError(f"no committed checkpoint in {where}")
    ok = True
    for info in infos:
        try:
            if info.problem is not None:
                raise CheckpointError(info.problem)
            manifest = verify_checkpoint(storage, info.name)
        except (CheckpointError, OSError, EOFError) as exc:
            print(f"FAILED {info.name}: {_reason(info.name, str(exc))}")
            ok = False
            continue
        total = sum(manifest.files.values()) + (storage.size(f"{info.name}/{MANIFEST_FILE}") or 0)
        print(f"OK {info.name} ({len(manifest.tensors)} tensors, {total / 1e6:.2f} MB)")
    return 0 if ok else 1


# -- export -----------------------------------------------------------------------------------------

def _export(storage: Storage, args: argparse.Namespace, options: dict, secrets: list[str]) -> int:
    _require_folder(storage)
    if (args.metric or args.mode) and not args.best:
        raise HarnessError("--metric and --mode choose the checkpoint with --best; add --best")
    summary = export_checkpoint(args.dir, args.out, fmt=args.format, step=args.step, best=args.best,
                                metric=args.metric, mode=args.mode, model=args.model, quantize=args.quantize,
                                storage_options=options)
    for name, reason in summary["skipped"]:
        print(f"{PROG}: warning: skipped {name}: {_clean(_reason(name, reason), secrets)}", file=sys.stderr)
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


# -- inspect ----------------------------------------------------------------------------------------

def _inspect(storage: Storage, args: argparse.Namespace, options: dict) -> int:
    _require_folder(storage)
    info = inspect_checkpoint(args.dir, step=args.step, storage_options=options)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for name, reason in info["skipped"]:
        print(f"{PROG}: warning: skipped {name}: {_reason(name, reason)}", file=sys.stderr)
    print(f"checkpoint {info['checkpoint']} in {info['url']} ({info['chosen']}; quick check of sizes, "
          "`harness ckpt verify` checks every checksum)")
    metrics = ", ".join(f"{k}={_num(v)}" for k, v in (info["metrics"] or {}).items()) or "-"
    print(f"  step {info['step']}, epoch {info['epoch']}, loss {_loss(info['loss'])}, metrics: {metrics}")
    print(f"  created {info['created']}, world size {info['world_size']}, sharding {info['sharding']}")
    print(f"  format {info['format']} v{info['format_version']}, written by harness {info['harness_version']}, "
          f"torch {info['torch_version']}, python {info['python_version']}; checksums {info['checksum_algorithm']}")
    print(f"  size {human_size(info['total_bytes'])}: {info['tensors']} tensors in {info['data_files']} data "
          f"file(s), {human_size(info['data_bytes'])}, plus the manifest")
    cfg = info["config"]
    if cfg:
        print(f"  run config: {_config_line(cfg)}")
    other = {k: v for k, v in (info["metadata"] or {}).items() if k != "config"}
    if other:
        print(f"  metadata: {json.dumps(other, default=str)[:300]}")
    for g in info["groups"]:
        label = f"{g['kind']} {g['name']!r}" if g["kind"] != "rank" else f"rank {g['name']}"
        extra = []
        if g.get("class"):
            extra.append(g["class"])
        desc = f"{g['count']} tensors, {human_size(g['bytes'])}"
        if g["kind"] == "model":
            desc += f", {g['elements']:,} parameters and buffers"
        hyper = g.get("hyperparameters")
        if hyper:
            desc += "; " + " | ".join(", ".join(f"{k}={_num(v)}" for k, v in h.items()
                                                if k in ("lr", "weight_decay", "momentum", "betas", "eps",
                                                         "initial_lr")) for h in hyper)
        if g.get("summary"):
            desc += "; " + ", ".join(f"{k}={_num(v)}" for k, v in g["summary"].items())
        if g.get("position") is not None:
            desc += f"; data position {json.dumps(g['position'])}"
        print(f"{label}{' (' + ', '.join(extra) + ')' if extra else ''}: {desc}")
        if g["kind"] == "rank":
            continue  # RNG states: sizes only
        rows = [[t["key"], t["dtype"], str(t["shape"]), human_size(t["bytes"])
                 + (f" in {t['shards']} shards" if t["shards"] > 1 else "")] for t in g["tensors"]]
        if rows:
            widths = [max(len(r[i]) for r in rows) for i in range(3)]
            for r in rows:
                print("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def _config_line(cfg: dict) -> str:
    parts = []
    for section in ("model", "data"):
        sec = cfg.get(section)
        if isinstance(sec, dict):
            opts = ", ".join(f"{k}={v}" for k, v in sec.items() if k != "name")
            parts.append(f"{section} {sec.get('name')}" + (f" ({opts})" if opts else ""))
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    if train.get("entry"):
        parts.append(f"entry {train['entry']}")
    optim = cfg.get("optim") if isinstance(cfg.get("optim"), dict) else {}
    if optim:
        parts.append(f"optim {optim.get('name')} lr={optim.get('lr')}")
    if train:
        parts.append(f"seed {train.get('seed')}, max_steps {train.get('max_steps')}, batch {train.get('batch_size')}")
    return "; ".join(parts)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    return str(v)


# -- diff -------------------------------------------------------------------------------------------

def _diff(args: argparse.Namespace, options: dict) -> int:
    for url in (args.a, args.b):
        _require_folder(Storage(url, options))
    result = diff_checkpoints(args.a, args.b, step_a=args.step_a, step_b=args.step_b, storage_options=options)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0 if result["identical"] else 1
    for side, label in (("a", "A"), ("b", "B")):
        s = result[side]
        for name, reason in s["skipped"]:
            print(f"{PROG}: warning: {label}: skipped {name}: {_reason(name, reason)}", file=sys.stderr)
        print(f"{label}: {s['url']} {s['checkpoint']} (step {s['step']})")
    for d in result["different"]:
        if d["what"] == "values":
            print(f"differs     {d['key']}  {d['dtype']} {d['shape']}  max |a-b| {d['max_abs_diff']:.6g} "
                  f"({d['elements_different']} of {d['elements']} elements)")
        elif d["what"] == "value":
            print(f"value       {d['key']}: {_num(d['a'])} -> {_num(d['b'])}")
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


# -- import -----------------------------------------------------------------------------------------

def _import(args: argparse.Namespace, options: dict) -> int:
    cfg = None
    if args.config is not None or args.overrides:
        from harness import config as config_mod

        cfg = config_mod.load(args.config, args.overrides)
    summary = import_checkpoint(args.file, args.dir, step=args.step, epoch=args.epoch, config=cfg,
                                fresh_optimizer=args.fresh_optimizer, storage_options=options)
    kinds = [f"{what} {', '.join(map(repr, summary[key]))}" for what, key in
             (("model", "models"), ("optimizer", "optimizers"), ("scheduler", "schedulers")) if summary[key]]
    print(f"imported {redact_url(args.file)} into {redact_url(args.dir)} as {summary['checkpoint']}: step "
          f"{summary['step']} ({summary['step_source']}), epoch {summary['epoch']}, loss {_loss(summary['loss'])}; "
          f"{'; '.join(kinds)}" + ("; from a bare state_dict" if summary["bare"] else ""))
    for note in summary["notes"]:
        print(f"  note: {note}")
    return 0


# -- helpers ----------------------------------------------------------------------------------------

def parse_storage_options(items: list[str] | None) -> dict:
    """``["key=value", "a.b=1"]`` -> ``{"key": "value", "a": {"b": 1}}``."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HarnessError(f"--storage-option wants KEY=VALUE, got {key or item[:20]!r}=...")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise HarnessError(f"--storage-option {key}: {part} is set both as a value and as a section")
        node[parts[-1]] = parsed
    return out


def _require_folder(storage: Storage) -> None:
    """DIR must exist and be a folder; a missing one is an error, not an empty listing."""
    if not storage.fs.isdir(storage.root):
        what = "is not a folder" if storage.fs.exists(storage.root) else "does not exist"
        raise HarnessError(f"checkpoint folder {redact_url(storage.url)} {what}")


def _reason(name: str, reason: str) -> str:
    """A reason without the checkpoint's name repeated in front of it."""
    for prefix in (f"{name}: ", f"{name}/"):
        if reason.startswith(prefix):
            return reason[len(prefix):]
    return reason


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


def _loss(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _short_time(created: Any) -> str:
    if not isinstance(created, str):
        return "-"
    try:
        t = datetime.fromisoformat(created)
    except ValueError:
        return created[:25]
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%SZ" if t.tzinfo is not None else "%Y-%m-%d %H:%M:%S")


_CRED_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def _clean(msg: str, secrets: list[str]) -> str:
    """One line, with URL credentials and the given secrets (storage option values, the URL's
    user:password) blanked out."""
    msg = " ".join(str(msg).split())
    for value in sorted(set(secrets), key=len, reverse=True):
        if len(value) >= 4:
            msg = msg.replace(value, "***")
    return _CRED_RE.sub(r"\1***@", msg)


def _url_secrets(url: str) -> list[str]:
    """The user:password part of a URL and its pieces: backends may echo them (e.g. in a bucket name)."""
    if "://" not in url:
        return []
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" not in netloc:
        return []
    userinfo = netloc.rsplit("@", 1)[0]
    return [userinfo, *userinfo.split(":", 1)]


def _leaf_strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _leaf_strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _leaf_strings(v)]
    return [str(obj)] if isinstance(obj, (str, int, float)) and not isinstance(obj, bool) else []


def _error(msg: str, secrets: list[str]) -> None:
    print(f"{PROG}: error: {_clean(msg, secrets)}", file=sys.stderr)
