"""Reading what another tool wrote, for the importer and for ``warm_start``/``load_for_inference``: one file
(``torch.save``, safetensors) or a folder: a torch.distributed.checkpoint folder (:mod:`~harness.interop.dcp`),
a Hugging Face Trainer checkpoint (:mod:`~harness.interop.hf_trainer`), an Accelerate ``save_state`` folder
(:mod:`~harness.interop.accelerate`), a Hugging Face model folder (:mod:`~harness.interop.hf`), or a folder of
torchtitan's ``step-N`` folders or Lightning's ``.ckpt`` checkpoints (its newest).

torch files only through :func:`harness.interop.torchload.load` (``weights_only=True``; see the importer's
documentation for what is refused and what is stood in for).
"""

from __future__ import annotations

from typing import Any

from harness.checkpoint.discovery import list_checkpoints
from harness.errors import CheckpointFormatError
from harness.interop import torchload
from harness.interop.safetensors import looks_like_safetensors, read_safetensors
from harness.storage import Storage, open_url, redact_url


def load_file(src: str) -> Any:
    """The contents of a torch.save file (weights only) or a safetensors file (a dict of tensors).

    Raises CheckpointFormatError for a file that needs arbitrary unpickling (nothing from it runs), or
    that is neither format; FileNotFoundError when it does not exist."""
    shown = redact_url(src)
    with open_url(src) as f:
        head = f.read(9)
        f.seek(0)
        if looks_like_safetensors(head):
            tensors, _ = read_safetensors(f, shown)
            return tensors
        try:
            return torchload.load(f, stand_in_classes=True)
        except torchload.NeedsObjects as exc:
            raise CheckpointFormatError(
                f"{shown} is refused: loading it would need unpickling arbitrary Python objects ({exc}); only "
                "tensors and plain containers are accepted (torch.load weights_only=True) and nothing from the "
                "file was run") from None
        except torchload.NotReadable as exc:
            raise CheckpointFormatError(f"{shown} is not a readable torch.save or safetensors file ({exc}); "
                                        "nothing from it was run") from None


def read_source(src: str, shown: str, storage_options: dict | None) -> tuple[Any, list[str]]:
    """A file's contents, or those of a folder another tool wrote (:func:`foreign_folder`); notes."""
    folder = Storage(src, storage_options)
    if not folder.is_dir():
        return load_file(src), []
    found = foreign_folder(folder, src, shown)
    if found is None:
        reads = ("import reads one file, or a folder: a Hugging Face model folder (model.safetensors, "
                 "pytorch_model.bin or their index.json) or Trainer checkpoint-N, an Accelerate save_state folder, "
                 "a DeepSpeed checkpoint, a torch.distributed.checkpoint folder (.metadata), or a folder of them")
        if list_checkpoints(folder):
            raise CheckpointFormatError(f"{shown} is a harness checkpoint folder already: use it as checkpoint.dir "
                                        f"or checkpoint.init_from ({reads})")
        raise CheckpointFormatError(f"{shown} is a folder without model weights: {reads}")
    return found[0], found[1]


def foreign_folder(folder: Storage, src: str, shown: str,
                   models_only: bool = False) -> tuple[Any, list[str], str] | None:
    """A folder another tool wrote, read: its contents, notes, and which files were read. A DCP checkpoint
    (``.metadata``), a DeepSpeed checkpoint (its tag folder, or the folder whose ``latest`` names it), a Hugging
    Face Trainer checkpoint, an Accelerate ``save_state`` folder, a Hugging Face model folder, or a folder of
    such checkpoints (its newest); None for anything else (a harness run folder). ``models_only``: only what
    holds model weights is read."""
    from harness.interop import accelerate, dcp, dcp_general, deepspeed, hf, hf_trainer
    names = set(folder.listdir(""))
    if dcp.is_dcp(names):
        return dcp_general.read(folder, shown, models_only)
    if deepspeed.is_deepspeed(names):
        return deepspeed.read(src, names, load_file, shown, models_only)
    latest = deepspeed.latest_tag(folder, names)  # a Trainer's or Accelerate's folder under DeepSpeed has one too
    if hf_trainer.is_trainer(names) and (latest is None or hf.weight_files(folder, names) is not None):
        return hf_trainer.read(folder, src, names, load_file, shown, models_only)  # (before Accelerate: scaler.pt)
    if latest is not None:
        tag, inner = latest
        obj, notes, what = deepspeed.read(f"{src.rstrip('/')}/{tag}", inner, load_file, f"{shown.rstrip('/')}/{tag}",
                                          models_only)
        return obj, [f"DeepSpeed's latest checkpoint: {tag}", *notes], f"{tag}/{what}"
    if accelerate.is_accelerate(names):
        return accelerate.read(folder, names, load_file, shown, models_only)
    files = hf.weight_files(folder, names)
    if files is None:
        return _newest_inside(folder, names, src, shown, models_only)
    return hf.read_folder(src, files, load_file), [], ", ".join(files) if len(files) < 4 else f"{len(files)} shards"


def _newest_inside(folder: Storage, names: set[str], src: str, shown: str,
                   models_only: bool) -> tuple[Any, list[str], str] | None:
    """A folder of another tool's checkpoints, as torchtitan, the Trainer, Accelerate and Lightning keep them:
    the newest ``step-N``/``checkpoint-N``/``checkpoint_N`` folder, else Lightning's ``last.ckpt`` (or its only
    ``.ckpt``), with a note saying which; None if there are none."""
    from harness.checkpoint.foreign import LIGHTNING_SUFFIX, foreign_checkpoints
    found = [f for f in foreign_checkpoints(folder, names) if f != "."]
    nested = [f for f in found if not f.endswith(LIGHTNING_SUFFIX)]
    files = [f for f in found if f.endswith(LIGHTNING_SUFFIX)]
    if not nested and len(files) > 1 and "last.ckpt" not in files:
        raise CheckpointFormatError(f"{shown} holds {len(files)} Lightning checkpoints and no last.ckpt "
                                    f"({', '.join(files[:4])}): name the file to read")
    if not found:
        return None
    newest = nested[-1] if nested else files[-1]
    note = f"the newest of {len(found)} checkpoints in {shown}: {newest}"
    inner = folder.child(newest)
    if newest.endswith(LIGHTNING_SUFFIX) and not inner.is_dir():
        return load_file(f"{src.rstrip('/')}/{newest}"), [note], newest
    # a DCP, Trainer or Accelerate folder, or a Lightning .ckpt that is one (its sharded strategies save folders)
    got = foreign_folder(inner, f"{src.rstrip('/')}/{newest}", f"{shown.rstrip('/')}/{newest}", models_only)
    if got is None:
        raise CheckpointFormatError(f"{shown}/{newest} holds no checkpoint harness can read")
    obj, notes, what = got
    return obj, [note, *notes], f"{newest}: {what}"
