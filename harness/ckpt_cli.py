"""``harness ckpt``: list, verify, inspect, diff, export and import checkpoints from the command line.

    harness ckpt list DIR [--json] [--all] [--verify]
    harness ckpt verify DIR [--step N | --all]
    harness ckpt inspect DIR [--step N] [--json]
    harness ckpt diff A B [--step-a N] [--step-b M] [--json]
    harness ckpt export DIR [--step N | --best [--metric NAME] [--mode min|max]]
                        [--format pt|safetensors|torchscript|onnx] --out FILE [--model NAME] [--quantize int8]
    harness ckpt import FILE DIR [--step N] [--epoch E] [--config TOML [--set KEY=VALUE ...]] [--fresh-optimizer]
    harness ckpt prune DIR [--dry-run]
    harness ckpt rollback DIR --step N [--dry-run]

DIR is a local path or any fsspec URL (``file://``, ``s3://bucket/run1``, ``memory://``). Every subcommand
takes ``--storage-option KEY=VALUE`` (repeatable): VALUE is parsed as JSON when it is valid JSON (``true``,
``5``, ``{"endpoint_url": "..."}``) and kept as a string otherwise; a dotted KEY nests
(``client_kwargs.endpoint_url=http://...``). Credentials (values of options named key, secret, token,
password or credential; a URL's user:password) are never printed.

Exit status: 0 on success; 1 when verification fails, no checkpoint is found, or on any expected error,
which is printed as one line ``harness: error: ...`` on stderr; 3 when the storage itself is unusable
(missing bucket, rejected credentials, unreachable endpoint), printed as the same line ``harness train``
prints (``harness: checkpoint error: ...``). ``diff``: 0 identical, 1 different,
2 on an error.
"""

from __future__ import annotations

import argparse

from harness.checkpoint.discovery import as_step_of_its_folder
from harness.ckpt_folder import run_list, run_prune, run_rollback, run_verify
from harness.ckpt_interop import run_diff, run_export, run_import, run_inspect
from harness.ckpt_parser import add_ckpt_parser, parse_storage_options
from harness.ckpt_render import error
from harness.errors import HarnessError, StorageError, is_storage_unavailable
from harness.storage import Storage, redact

# The command is split by job: ckpt_parser (argparse, --storage-option), ckpt_folder (list, verify, prune),
# ckpt_interop (export, import, inspect, diff), ckpt_render (text). This module dispatches and owns the exit codes.
__all__ = ["add_ckpt_parser", "parse_storage_options", "run_ckpt"]

EXIT_STORAGE = 3                      # as `harness train`: storage unusable, do not retry
STORAGE_PREFIX = "checkpoint error"   # the words `harness train` puts before a storage problem
EXIT_UNAVAILABLE = 1                  # as `harness train`: the storage out of retries, retryable
UNAVAILABLE_PREFIX = "storage unreachable (retryable, exit 1)"


def _one_checkpoint(storage: Storage, args: argparse.Namespace, options: dict) -> Storage:
    """DIR given as one checkpoint's ``step-N`` folder (as Lightning's ``ckpt_path``) and no ``--step``/``--best``:
    its folder with ``--step N`` (it said "no committed checkpoint in .../step-N", of a committed checkpoint)."""
    if getattr(args, "step", None) is not None or getattr(args, "best", False) or getattr(args, "all", False):
        return storage
    one = as_step_of_its_folder(storage, options)
    if one is None:
        return storage
    (parent, args.step), args.dir = one, one[0].url
    return parent


def run_ckpt(args: argparse.Namespace) -> int:
    """Run a parsed ``ckpt`` command; returns the exit status."""
    options: dict = {}
    urls = [args.a, args.b] if args.ckpt_command == "diff" else [args.dir]
    if args.ckpt_command == "import":
        urls.append(args.file)
    secrets = [s for u in urls for s in redact.url_secrets(u)]
    failed = 2 if args.ckpt_command == "diff" else 1
    try:
        options = parse_storage_options(args.storage_option)
        secrets += redact.secret_values(options)  # the same values Storage scrubs: one message everywhere
        if args.ckpt_command == "diff":
            return run_diff(args, options)
        if args.ckpt_command == "import":
            return run_import(args, options)
        storage = Storage(args.dir, options)
        if args.ckpt_command in ("verify", "inspect", "export"):
            storage = _one_checkpoint(storage, args, options)
        if args.ckpt_command == "list":
            return run_list(storage, args)
        if args.ckpt_command == "verify":
            return run_verify(storage, args)
        if args.ckpt_command == "inspect":
            return run_inspect(storage, args, options)
        if args.ckpt_command == "export":
            return run_export(storage, args, options, secrets)
        if args.ckpt_command == "prune":
            return run_prune(storage, args)
        if args.ckpt_command == "rollback":
            return run_rollback(storage, args)
        raise HarnessError(f"unknown ckpt command {args.ckpt_command!r}")
    except StorageError as exc:  # the line and exit code `harness train` gives: unusable 3, out of retries 1
        if is_storage_unavailable(exc):
            error(str(exc), secrets, UNAVAILABLE_PREFIX)
            return EXIT_UNAVAILABLE
        error(str(exc), secrets, STORAGE_PREFIX)
        return EXIT_STORAGE
    except (HarnessError, OSError, EOFError) as exc:
        msg = str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"
        error(msg, secrets)
        return failed
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - only storage backend failures; anything else is a bug
        if not _is_backend_error(exc):
            raise
        error(f"storage: {type(exc).__name__}: {exc}", secrets, STORAGE_PREFIX)
        return EXIT_STORAGE


_BACKEND_MODULES = ("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "adlfs", "azure")


def _is_backend_error(exc: BaseException) -> bool:
    """Failures raised by the storage backend (missing credentials, unreachable endpoint, ...): expected
    errors for a command-line user, not harness bugs."""
    return any(cls.__module__.split(".")[0] in _BACKEND_MODULES for cls in type(exc).__mro__)
