"""The argparse definition of ``harness ckpt``: one small function per subcommand, and the parsing of
``--storage-option KEY=VALUE``. Flags, help texts and defaults are the command's interface: change them here only
on purpose (docs and tests name them)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from harness.errors import HarnessError
from harness.interop.export import FORMATS, QUANTIZE
from harness.interop.formats import format_for, known_suffixes


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
                              metavar="{list,verify,inspect,diff,export,import,prune,rollback}")

    # in this order in `harness ckpt --help`; diff and import take two paths, so no common DIR
    _add_list(sub, common)
    _add_verify(sub, common)
    _add_inspect(sub, common)
    _add_diff(sub, options)
    _add_export(sub, common)
    _add_import(sub, options)
    _add_prune(sub, common)
    _add_rollback(sub, common)
    return ckpt


def _add_list(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ckpt list``: a table (or JSON) of checkpoints with their status."""
    p = sub.add_parser("list", parents=[common], help="committed checkpoints with their status",
                       description="Committed checkpoints, oldest first: step, epoch, loss, size, created, world "
                       "size, sharding and status (valid, or why not). Exit 0 even when some are damaged.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--all", action="store_true", help="also show uncommitted folders (status 'uncommitted')")
    p.add_argument("--verify", action="store_true",
                   help="check every checksum (reads all data) instead of the quick check of commit record, "
                   "manifest and data file sizes")


def _add_verify(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ckpt verify``: every checksum of one, the newest or all committed checkpoints."""
    p = sub.add_parser("verify", parents=[common], help="full checksum verification",
                       description="Verify every checksum of the newest committed checkpoint (or of the newest "
                       "at step N, or of all). Exit 0 only if every one verified is valid.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, metavar="N", help="verify the checkpoint of step N")
    g.add_argument("--all", action="store_true", help="verify every committed checkpoint")


def _add_inspect(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ckpt inspect``: metadata, sizes and tensors of one checkpoint."""
    p = sub.add_parser("inspect", parents=[common], help="what a checkpoint holds: metadata, sizes, tensors",
                       description="Show the newest checkpoint whose manifest validates (or the one at step N): "
                       "versions, step, epoch, loss, metrics, world size, sharding, the run config, sizes per "
                       "model, optimizer, scheduler and rank, and every tensor with dtype, shape and size. Reads "
                       "only the commit record and the manifest (data file sizes are checked, checksums are not: "
                       "use 'verify'). DIR may also be a torch.distributed.checkpoint folder (torchtitan's step-N): "
                       "its tensors and other values from its .metadata, read without running its pickle.")
    p.add_argument("--step", type=int, metavar="N", help="inspect the checkpoint of step N")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")


def _add_diff(sub: Any, options: argparse.ArgumentParser) -> None:
    """``ckpt diff``: two checkpoints compared tensor by tensor (two folders: no common DIR)."""
    p = sub.add_parser("diff", parents=[options], help="compare two checkpoints tensor by tensor",
                       description="Compare the replicated state (models, optimizers, schedulers, scaler, extra) "
                       "of two checkpoints tensor by tensor: max absolute difference of each tensor that differs, "
                       "keys found on one side only, and other values (hyperparameters, counters, and the epoch, "
                       "loss and metrics) that differ. Per-rank state (RNG, data position) is compared with "
                       "--ranks (a resumed run against an uninterrupted one). Every byte read is verified. "
                       "Exit status: 0 if identical, 1 if different, 2 on an error.")
    p.add_argument("a", metavar="A", help="first checkpoint folder (local path or fsspec URL)")
    p.add_argument("b", metavar="B", help="second checkpoint folder (may be the same as A with --step-a/--step-b)")
    p.add_argument("--step-a", type=int, metavar="N", help="use A's checkpoint of step N (default: newest valid)")
    p.add_argument("--step-b", type=int, metavar="M", help="use B's checkpoint of step M (default: newest valid)")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.add_argument("--ranks", action="store_true", help="also every rank's RNG states and data position")


def _add_export(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ckpt export``: one checkpoint as a pt, safetensors, torchscript or onnx file."""
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
    p.add_argument("--format", choices=FORMATS, dest="format",
                   help="default: the one FILE's name ending names (.pt/.pth/.tar pt, .safetensors, .ts "
                   "torchscript, .onnx)")
    p.set_defaults(export_parser=p)  # finish_export's usage errors are export's own (exit 2)
    p.add_argument("--out", required=True, metavar="FILE", help="output file (local); written atomically")
    p.add_argument("--model", metavar="NAME", help="export only the model of this name")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="dynamic int8 quantization of the Linear layers (torchscript and pt; CPU inference); "
                   "prints the size reduction")


def finish_export(args: argparse.Namespace) -> None:
    """``--format`` left out: the format ``--out``'s file name ending names; a usage error (exit 2) when it
    names none. (``harness ckpt export DIR --out model.pt`` was refused for the missing --format.)"""
    if args.format is None:
        args.format = format_for(args.out)
        if args.format is None:
            args.export_parser.error(f"--format is needed: the name {os.path.basename(args.out)!r} ends in none of "
                                     f"{', '.join(known_suffixes())}")


def _add_import(sub: Any, options: argparse.ArgumentParser) -> None:
    """``ckpt import``: a plain torch.save or safetensors file into a harness checkpoint (FILE before DIR)."""
    p = sub.add_parser(
        "import", parents=[options], help="turn a plain torch.save checkpoint into a harness checkpoint",
        description="Write FILE, a torch.save general checkpoint with the PyTorch tutorial's keys (epoch, "
        "model_state_dict, optimizer_state_dict, scheduler_state_dict, loss), a bare state_dict, a Lightning "
        ".ckpt, a safetensors file, a Hugging Face model folder or Trainer checkpoint-N, a DeepSpeed checkpoint, an "
        "Accelerate save_state folder or a "
        "torch.distributed.checkpoint folder "
        "(dcp.save, torchtitan; sharded ones put back together), into DIR as a harness checkpoint (model "
        "'model', optimizer 'optimizer', scheduler 'scheduler'), so `harness train` resumes from it. torch.save "
        "bytes are read with torch.load(weights_only=True) and a DCP .metadata by an unpickler that knows only "
        "DCP's records: a pickle that would call a function is refused and nothing from it runs; an object of a "
        "class harness does not import is not built (a note names it). A 'module.' prefix is stripped. With "
        "--config (the run's TOML, plus --set overrides) the model is checked against the config's model now, "
        "a missing optimizer or scheduler state is created from the config, "
        "and the config is recorded; without it the file's state is stored as is. Refuses (exit 3) while a live "
        "job holds DIR's RUN_LEASE.")
    p.add_argument("file", metavar="FILE", help="torch.save or safetensors file, Hugging Face or DCP folder (local "
                   "path or fsspec URL)")
    p.add_argument("dir", metavar="DIR", help="checkpoint folder to write into (created if missing)")
    p.add_argument("--step", type=int, metavar="N",
                   help="global step to record (default: the file's step, else the optimizer's step counter, else 0)")
    p.add_argument("--epoch", type=int, metavar="E", help="epoch to record (default: the file's epoch, else 0)")
    p.add_argument("--config", metavar="TOML", help="the config of the run that will resume from the import")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (as for `harness train`); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="read and check everything (with --config: the model, optimizer and schedule against it), "
                   "write nothing, and say what the import would write")
    p.add_argument("--fresh-optimizer", action="store_true",
                   help="ignore the file's optimizer state (e.g. another optimizer than the config's)")
    _lease_timeout(p)


def _add_prune(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ckpt prune``: leftovers of killed saves."""
    _folder_change(sub, common, "prune", "remove what killed saves left behind (uncommitted folders, S3 uploads)",
                   "Remove every uncommitted step-* folder (a save killed before its COMMIT record) and, on S3, "
                   "abort the unfinished multipart uploads under DIR. Committed checkpoints, damaged ones included, "
                   "are never touched. `harness train` does the same on every start. Exit 0 when done, 1 if "
                   "something could not be removed.", "only say what would be removed")


def _add_rollback(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ckpt rollback``: continue from an earlier step for good."""
    p = _folder_change(sub, common, "rollback", "continue from an earlier step: set the newer checkpoints aside",
                       "Make the checkpoint of step N the newest (a loss spike: go back and continue from there): "
                       "every newer committed checkpoint is set aside, its COMMIT record renamed ROLLED_BACK, so "
                       "that a job started on DIR, and every restart of it, resumes from step N. Nothing is deleted "
                       "(retention and prune keep set-aside folders; rename ROLLED_BACK to COMMIT to undo).",
                       "only say what would be set aside")
    p.add_argument("--step", type=int, required=True, metavar="N", help="the step to continue from")


def _folder_change(sub: Any, common: argparse.ArgumentParser, name: str, help: str, description: str,
                   dry_run: str) -> argparse.ArgumentParser:
    """A command that changes a checkpoint folder (prune, rollback): --dry-run, and a refusal while a live job
    holds it."""
    p = sub.add_parser(name, parents=[common], help=help, description=f"{description} Refuses (exit 3) while a "
                       "live job holds the folder's RUN_LEASE.")
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    _lease_timeout(p)
    return p


def _lease_timeout(p: argparse.ArgumentParser) -> None:
    """``--lease-timeout`` of the commands that refuse a folder a live job holds (prune, rollback, import)."""
    p.add_argument("--lease-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a lease whose heartbeat is younger than this belongs to a live job (the run's "
                   "checkpoint.lease_timeout_s; default 60)")


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
