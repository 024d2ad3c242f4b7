"""torch.distributed.checkpoint folders (``dcp.save``, torchtitan) as a source: `harness ckpt import`,
warm_start, load_for_inference and checkpoint.init_from read them, sharded ones put back together, and a
hostile ``.metadata`` (a pickle torch would run) is refused before anything from it runs.

The folders are written by torch's own ``dcp.save`` in the layouts people have: the DCP tutorial's
``{"app": AppState}``, torchtitan's (model keys at the top level, flattened optimizer state, ``train_state``
with a BytesIO, ``dataloader``), and an FSDP2 job's sharded save from two real ranks."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)

import harness
from harness import CheckpointManager, recipe
from harness.checkpoint.discovery import list_checkpoints
from harness.errors import CheckpointFormatError
from harness.interop.importer import import_checkpoint
from harness.storage import Storage

from ckpt_helpers import counting
from export_helpers import QUICKSTART, REPO, cli, quickstart_config, train_plainly
from sharded_helpers import FNet, run_ranks
from torch_features import needs_fsdp, needs_stand_ins

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process


def trained(cfg, steps: int = 6):
    """The quickstart model, optimizer and a LambdaLR (torchtitan's kind) after ``steps`` steps."""
    return train_plainly(cfg, steps, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))


def torchtitan_folder(path, cfg, steps: int = 6):
    """What torchtitan's CheckpointManager saves: the model's keys at the top level, the optimizer flattened
    by parameter name, its LR scheduler, train_state (step as an int32 tensor, losses in a BytesIO) and each
    data-parallel rank's dataloader state as pickled bytes."""
    model, opt, sched = trained(cfg, steps)
    flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    losses = io.BytesIO()
    torch.save([0.5, 0.25], losses)
    dcp.save({**get_model_state_dict(model), "optimizer": flat, "lr_scheduler": sched.state_dict(),
              "train_state": {"step": torch.tensor(steps, dtype=torch.int32), "global_avg_losses": losses},
              "dataloader": {"dp_rank_0": pickle.dumps({"sample": steps * 8})}}, checkpoint_id=str(path))
    return model, opt


def trainer_objects(cfg):
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    opt = recipe.build_optimizer(cfg, w.model.parameters())
    return w.model, opt, recipe.build_scheduler(cfg, opt)


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def assert_same_optimizer(restored: torch.optim.Optimizer, saved: torch.optim.Optimizer) -> None:
    want, got = saved.state_dict()["state"], restored.state_dict()["state"]
    assert set(got) == set(want)
    for pid in want:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[pid][name], want[pid][name]), (pid, name)


# -- the layouts people have -------------------------------------------------------------------------

def test_a_torchtitan_checkpoint_imports_and_harness_train_resumes_from_it(tmp_path, capsys):
    cfg = quickstart_config()
    src, dest = tmp_path / "step-6", tmp_path / "ckpt"
    model, opt = torchtitan_folder(src, cfg)
    assert cli("ckpt", "import", src, dest, "--config", QUICKSTART) == 0
    out = capsys.readouterr().out
    said = ["as step-000000006: step 6 (file's step)", "note: a torch.distributed.checkpoint folder: ",
            "note: model weights: the tensors at the top level (torchtitan keeps the model's keys there)",
            "note: optimizer state flattened by parameter name: 1 param group(s) rebuilt",
            "train_state.global_avg_losses (needs unpickling _io.BytesIO)", "note: DCP state not imported: dataloader"]
    assert [line for line in said if line not in out] == [], out
    assert "config's schedule" not in out  # torchtitan's LambdaLR state loads into the config's (a LambdaLR too)

    m2, o2, s2 = trainer_objects(cfg)
    res = CheckpointManager(dest).restore(models={"model": m2}, optimizers={"optimizer": o2},
                                          schedulers={"scheduler": s2})
    assert res.step == 6 and s2.last_epoch == 6
    assert_same(m2.state_dict(), model.state_dict())
    assert_same_optimizer(o2, opt)
    assert o2.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]

    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "harness", "train", "--config", QUICKSTART,
                           "--set", f"checkpoint.dir={dest}", "--set", "train.max_steps=8",
                           "--set", f"run.output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step-000000006 at step 6" in proc.stderr + proc.stdout
    assert [i.step for i in list_checkpoints(Storage(str(dest)))] == [6, 8]


def test_the_dcp_tutorial_layout_warm_starts_and_loads_for_inference(tmp_path):
    """{"app": AppState} with get_state_dict's name-keyed optimizer state; warm_start, load_for_inference
    and an import without a config all read it."""
    cfg = quickstart_config()
    model, opt, _ = trained(cfg, steps=4)
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    src = tmp_path / "dcp"
    dcp.save({"app": {"model": msd, "optim": osd}}, checkpoint_id=str(src))

    fresh = trainer_objects(cfg)[0]
    report = harness.warm_start(fresh, src)
    assert report.loaded == len(model.state_dict()) and not report.missing and not report.unexpected
    assert_same(fresh.state_dict(), model.state_dict())
    again = harness.load_for_inference(str(src), trainer_objects(cfg)[0])
    assert not again.training and torch.equal(again(torch.ones(2, 32)), model.eval()(torch.ones(2, 32)))

    summary = import_checkpoint(src, tmp_path / "ckpt")  # no config: the state as stored
    assert summary["step"] == 4 and summary["step_source"] == "optimizer's step counter"
    assert "the state saved under 'app'" in summary["notes"]
    m2, o2, _ = trainer_objects(cfg)
    CheckpointManager(tmp_path / "ckpt").restore(models={"model": m2}, optimizers={"optimizer": o2})
    assert_same_optimizer(o2, opt)


def test_a_plain_optimizer_state_dict_keeps_its_numbering(tmp_path):
    """``opt.state_dict()`` saved through DCP: its integer state keys come back as strings."""
    cfg = quickstart_config()
    model, opt, sched = trained(cfg, steps=3)
    src = tmp_path / "dcp"
    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}, checkpoint_id=str(src))
    summary = import_checkpoint(src, tmp_path / "ckpt", config=cfg)
    assert (summary["step"], summary["epoch"]) == (3, 2)
    m2, o2, _ = trainer_objects(cfg)
    CheckpointManager(tmp_path / "ckpt").restore(models={"model": m2}, optimizers={"optimizer": o2})
    assert_same(m2.state_dict(), model.state_dict())
    assert_same_optimizer(o2, opt)


@needs_fsdp
def test_an_fsdp2_sharded_save_from_two_ranks_is_put_back_together(tmp_path):
    src, ref = tmp_path / "dcp", tmp_path / "full.pt"
    results = run_ranks(tmp_path, "dcp_fsdp_save", 2, url=str(src), ref=str(ref))
    assert results[0]["sharded"]  # the model state really was DTensors, one chunk per rank
    assert {n for n in os.listdir(src) if n.endswith(".distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    full = torch.load(ref, weights_only=True)

    torch.manual_seed(123)
    fresh = FNet(13)
    assert harness.warm_start(fresh, src).loaded == len(full["model"])
    assert_same(fresh.state_dict(), full["model"])

    summary = import_checkpoint(src, tmp_path / "ckpt")
    assert summary["step"] == 3 and summary["step_source"] == "file's step"
    plain = FNet(13)
    opt = torch.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=0.01)
    CheckpointManager(tmp_path / "ckpt").restore(models={"model": plain}, optimizers={"optimizer": opt})
    names = [n for n, _ in plain.named_parameters()]
    for i, name in enumerate(names):
        assert torch.equal(opt.state[opt.param_groups[0]["params"][i]]["exp_avg"], full["optim"][name]["exp_avg"])


def test_checkpoint_init_from_a_dcp_folder(tmp_path):
    """torchtitan's model-only final save (the model's keys alone) as a new run's initial weights."""
    cfg = quickstart_config()
    model = trained(cfg, steps=2)[0]
    src = tmp_path / "final"
    dcp.save(get_model_state_dict(model), checkpoint_id=str(src))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "harness", "train", "--config", QUICKSTART,
                           "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", "--set", "train.max_steps=1",
                           "--set", f"checkpoint.init_from={src}", "--set", f"run.output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["init_from"] == str(src)
    assert f"warm start of model from {src} (__0_0.distcp): {len(model.state_dict())} tensors loaded" in proc.stderr


# -- hostile and damaged folders ---------------------------------------------------------------------

class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def small_dcp(tmp_path):
    src = tmp_path / "dcp"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    dcp.save({"model": model.state_dict(), "step": 5}, checkpoint_id=str(src))
    return src, model


def rewrite_metadata(src, change) -> None:
    """Change torch's own Metadata object (read with the trusted pickle here, in the test) and write it back."""
    path = src / ".metadata"
    meta = pickle.loads(path.read_bytes())
    change(meta)
    path.write_bytes(pickle.dumps(meta))


def storage_entry(meta, fqn):
    return next((k, v) for k, v in meta.storage_data.items() if k.fqn == fqn)


def test_a_metadata_pickle_that_would_run_code_is_refused_and_nothing_runs(small_dcp, tmp_path, capsys):
    src, _ = small_dcp
    marker = tmp_path / "ran"
    (src / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for attempt in (lambda: harness.warm_start(model, src), lambda: import_checkpoint(src, tmp_path / "ckpt")):
        with pytest.raises(CheckpointFormatError, match=r"\.metadata is refused: global (posix|os)\.system is not "
                                                        r"part of DCP's metadata; nothing from it was run"):
            attempt()
    assert not marker.exists()
    assert cli("ckpt", "import", src, tmp_path / "ckpt") == 1 and not marker.exists()  # as for a refused .pt
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "posix.system is not part of DCP's metadata" in err


@pytest.mark.parametrize("module", [b"pathlib", b"pathlib._local"])
def test_a_metadata_written_by_any_python_names_its_path_class_its_way(small_dcp, module):
    """DCP pickles its checkpoint_id, a pathlib path: ``pathlib.PosixPath`` up to Python 3.12, and
    ``pathlib._local.PosixPath`` from 3.13 (pathlib became a package), which the reader refused on every Python:
    no torchtitan checkpoint saved on 3.13 imported."""
    src, model = small_dcp
    data = pickle.dumps(pickle.loads((src / ".metadata").read_bytes()), protocol=2)  # GLOBAL opcodes, no frames
    path_class = next(g for g in (b"cpathlib\nPosixPath\n", b"cpathlib._local\nPosixPath\n") if g in data)
    (src / ".metadata").write_bytes(data.replace(path_class, b"c" + module + b"\nPosixPath\n"))
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    harness.warm_start(fresh, src)
    assert_same(fresh.state_dict(), model.state_dict())


def plant_payload(src, fqn: str, marker, data: bytes) -> None:
    """``fqn``'s record replaced by a torch.save pickle that would run ``touch marker``, appended to the
    folder's data file as it was (``data``), and the metadata pointed at it."""
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    meta = pickle.loads((src / ".metadata").read_bytes())
    key, info = storage_entry(meta, fqn)
    info.offset, info.length = len(data), len(evil.getvalue())
    (src / ".metadata").write_bytes(pickle.dumps(meta))
    (src / "__0_0.distcp").write_bytes(data + evil.getvalue())


def test_a_value_record_that_would_run_code_is_left_out_and_a_tensor_chunk_refused(small_dcp, tmp_path):
    """The records in the .distcp files are torch.save pickles too: read with weights_only=True only."""
    src, model = small_dcp
    marker = tmp_path / "ran"
    data = (src / "__0_0.distcp").read_bytes()
    plant_payload(src, "step", marker, data)
    summary = import_checkpoint(src, tmp_path / "ckpt")
    assert summary["step"] == 0 and "step (needs unpickling posix.system)" in " ".join(summary["notes"])
    plant_payload(src, "model.0.weight", marker, data)
    with pytest.raises(CheckpointFormatError, match=r"model\.0\.weight's chunk .* is refused: it needs unpickling "
                                                    r"posix\.system; nothing from it was run"):
        harness.warm_start(model, src)
    assert not marker.exists()


@pytest.mark.parametrize("change, error", [
    (lambda m: setattr(storage_entry(m, "model.0.weight")[1], "relative_path", "../elsewhere.distcp"),
     r"model\.0\.weight is stored in '\.\./elsewhere\.distcp', not a plain file name in the folder"),
    (lambda m: setattr(storage_entry(m, "model.0.weight")[1], "relative_path", "__9_0.distcp"),
     r"stored in __9_0\.distcp, which is not in the folder"),
    (lambda m: setattr(storage_entry(m, "model.0.weight")[1], "offset", 1 << 40),
     r"model\.0\.weight: bytes 1099511627776\+\d+ are not inside __0_0\.distcp"),
    (lambda m: setattr(m.state_dict_metadata["model.0.weight"], "size", torch.Size([1 << 20, 1 << 20])),
     r"model\.0\.weight: its chunks hold 12 elements, its shape \[1048576, 1048576\] needs"),
    (lambda m: setattr(m.state_dict_metadata["model.0.weight"].chunks[0], "sizes", torch.Size([3, 1 << 30])),
     r"chunk at \[0, 0\] of size \[3, 1073741824\] is outside shape \[3, 4\]"),
    (lambda m: storage_entry(m, "model.0.weight")[1].__setattr__("transform_descriptors", ["zstd"]),
     r"stored through transforms \['zstd'\]"),
])
def test_a_metadata_that_lies_is_refused_before_any_data_is_read(small_dcp, change, error):
    src, model = small_dcp
    rewrite_metadata(src, change)
    with pytest.raises(CheckpointFormatError, match=error):
        harness.warm_start(model, src)


def test_overlapping_chunks_and_a_huge_chunk_in_few_bytes_are_refused(small_dcp):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    src, model = small_dcp

    def two_halves_overlapping(meta):
        item = meta.state_dict_metadata["model.0.weight"]
        item.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 4])),
                       ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([2, 4]))]
        _, info = storage_entry(meta, "model.0.weight")
        meta.storage_data[MetadataIndex("model.0.weight", torch.Size([1, 0]))] = info
        item.size = torch.Size([4, 4])  # 16 elements, as many as the chunks hold: only the overlap is wrong

    rewrite_metadata(src, two_halves_overlapping)
    with pytest.raises(CheckpointFormatError, match=r"chunks at \[0, 0\] and \[1, 0\] overlap"):
        harness.warm_start(model, src)

    def huge(meta):
        item = meta.state_dict_metadata["model.0.weight"]
        item.size = torch.Size([1 << 16, 1 << 16])
        item.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), item.size)]
        key, info = storage_entry(meta, "model.0.weight")
        del meta.storage_data[key]
        meta.storage_data[MetadataIndex("model.0.weight", torch.Size([0, 0]))] = info

    rewrite_metadata(src, huge)
    with pytest.raises(CheckpointFormatError, match=r"chunk of \[65536, 65536\] torch\.float32 is stored in only "
                                                    r"\d+ bytes"):
        harness.warm_start(model, src)


def test_truncated_garbled_and_partial_folders_get_one_clear_error(small_dcp, tmp_path):
    src, model = small_dcp
    data = (src / "__0_0.distcp").read_bytes()
    (src / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"are not inside __0_0\.distcp \(\d+ bytes\)"):
        harness.warm_start(model, src)
    (src / "__0_0.distcp").write_bytes(data[:100] + bytes(len(data) - 100))  # right size, zeros inside
    with pytest.raises(CheckpointFormatError, match=r"model\.0\.weight at byte \d+ is not a torch.save record "
                                                    r"\((Unsupported operand|RuntimeError)") as caught:
        harness.warm_start(model, src)
    assert "weights_only" not in str(caught.value)  # torch's advice to unpickle anyway is not passed on
    (src / "__0_0.distcp").write_bytes(data)
    meta = (src / ".metadata").read_bytes()
    for garbled in (meta[: len(meta) // 2], b"\x00" * 64, b""):
        (src / ".metadata").write_bytes(garbled)
        with pytest.raises(CheckpointFormatError, match=r"\.metadata is not a readable DCP metadata file"):
            harness.warm_start(model, src)
    (src / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointFormatError, match=r"does not describe a DCP checkpoint: it holds a dict"):
        harness.warm_start(model, src)


def test_a_dcp_folder_in_s3_written_by_dcps_fsspec_writer(s3_url, tmp_path):
    """DCP's own FsspecWriter to a real S3 endpoint (moto over HTTP): harness reads it in place."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    cfg = quickstart_config()
    model, opt, _ = trained(cfg, steps=2)
    src = f"{s3_url}/dcp"
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 2}, storage_writer=FsspecWriter(src))
    fresh = trainer_objects(cfg)[0]
    assert harness.warm_start(fresh, src).loaded == len(model.state_dict())
    assert_same(fresh.state_dict(), model.state_dict())
    summary = import_checkpoint(src, f"{s3_url}/ckpt", config=cfg)
    assert summary["step"] == 2


# -- fuzzing: any bytes in .metadata or a .distcp file load or are refused, nothing else ------------------

@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory):
    src = tmp_path_factory.mktemp("dcp-fuzz") / "dcp"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    dcp.save({"model": model.state_dict(), "optim": {"lr": 0.1, "betas": (0.9, 0.99)}, "step": 5},
             checkpoint_id=str(src))
    return {name: (src / name).read_bytes() for name in os.listdir(src)}


def _mutations():
    from hypothesis import strategies as st
    edit = st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=8))
    return st.tuples(st.sampled_from([".metadata", "__0_0.distcp"]), st.lists(edit, min_size=1, max_size=4))


def _mutate(data: bytes, edits) -> bytes:
    for kind, where, chunk in edits:
        at = int(where * len(data))
        if kind == "flip":
            data = data[:at] + bytes(b ^ c for b, c in zip(data[at:at + len(chunk)], chunk)) + data[at + len(chunk):]
        elif kind == "cut":
            data = data[:at]
        else:
            data = data[:at] + chunk + data[at:]
    return data


def test_fuzzed_dcp_folders_load_or_are_refused(fuzz_source, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings

    marker = tmp_path_factory.mktemp("marker") / "ran"
    payload = pickle.dumps(Payload(marker))

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_mutations())
    def prop(mutation):
        target, edits = mutation
        folder = tmp_path_factory.mktemp("fuzz")
        for name, data in fuzz_source.items():
            data = _mutate(data, edits) if name == target else data
            (folder / name).write_bytes(data)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        try:
            harness.warm_start(model, folder)
        except CheckpointFormatError:
            pass
        assert not marker.exists()

    prop()
    bad = tmp_path_factory.mktemp("planted")
    for name, data in fuzz_source.items():
        (bad / name).write_bytes(data if name != ".metadata" else data[:40] + payload + data[40:])
    with pytest.raises(CheckpointFormatError):
        harness.warm_start(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), bad)
    assert not marker.exists()


@needs_stand_ins
def test_a_lightning_sharded_checkpoint_folder(tmp_path):
    """What Lightning's FSDPStrategy(state_dict_type="sharded") saves: a DCP folder of {"model", "optimizer_0"}
    (the optimizer keyed by parameter name) and meta.pt beside it with epoch, global_step, the LR schedulers,
    loops, callbacks and hyperparameters (an argparse.Namespace among them)."""
    import argparse
    cfg = quickstart_config()
    model, opt, sched = train_plainly(cfg, 4)
    src = tmp_path / "epoch=0-step=4.ckpt"
    dcp.save({"model": model.state_dict(), "optimizer_0": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(src))
    torch.save({"epoch": 0, "global_step": 4, "pytorch-lightning_version": "2.5.0",
                "lr_schedulers": [sched.state_dict()], "loops": {"fit_loop": {}}, "callbacks": {},
                "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}}, src / "meta.pt")
    summary = import_checkpoint(src, tmp_path / "ckpt", config=cfg)
    assert (summary["step"], summary["step_source"], summary["epoch"]) == (4, "file's step", 0)
    assert summary["optimizers"] == ["optimizer"]
    assert ("a PyTorch Lightning sharded checkpoint (Lightning 2.5.0): epoch, step and LR schedulers from meta.pt"
            in summary["notes"]), summary["notes"]
    m2, o2, _ = trainer_objects(cfg)
    CheckpointManager(tmp_path / "ckpt").restore(models={"model": m2}, optimizers={"optimizer": o2})
    assert_same(m2.state_dict(), model.state_dict())
    assert_same_optimizer(o2, opt)
    fresh = trainer_objects(cfg)[0]
    assert harness.warm_start(fresh, src).loaded == len(model.state_dict())
    fresh = trainer_objects(cfg)[0]  # the folder Lightning's ModelCheckpoint keeps them in: its last one
    assert harness.warm_start(fresh, tmp_path).source == f"{tmp_path} (epoch=0-step=4.ckpt: __0_0.distcp)"


# -- from a remote store: small records read in spans, several at a time --------------------------------

def _on_remote_store(src) -> Storage:
    """``src``'s files in a memory:// folder: a store without a local path, read as S3 is."""
    import uuid
    storage = Storage(f"memory://dcp-{uuid.uuid4().hex}/dcp")
    for name in os.listdir(src):
        storage.write_bytes(name, (src / name).read_bytes())
    return storage


def test_a_dcp_folder_on_a_remote_store_is_read_in_spans_of_records(tmp_path, monkeypatch):
    """Through a window on an S3 object, torch.load's reads at both ends of every record fetched a 16 MiB
    block each, one record after the other (moto, 128 records of 2 MB: 8 s; in spans: 2.6 s). Small records
    are read in spans of adjacent ones, one ranged read per span; a record over SPAN_BYTES is read alone
    through a window (its bytes straight into the tensor). The same tensors as from a local folder."""
    from harness.interop import dcp as hdcp
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)], torch.nn.Linear(8, 64))
    src = tmp_path / "dcp"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(src))
    local = hdcp.read_folder(Storage(str(src)), "local").state["model"]
    storage = _on_remote_store(src)
    layout = hdcp.read_layout(storage, "remote")
    records = [(fqn, c) for fqn, (_, _, chunks) in layout.tensors.items() for c in chunks]
    big = next(c.length for fqn, c in records if fqn == "model.6.weight")  # 64x8: the largest record
    monkeypatch.setattr(hdcp, "SPAN_BYTES", big - 1)
    small = [(f, c) for f, c in records if c.length <= hdcp.SPAN_BYTES]
    spans = hdcp._spans(small)
    assert 1 < len(spans) < len(small) < len(records)  # some records share a span; the 64x8 weight is alone
    calls = counting(storage)
    remote = hdcp.read_folder(storage, "remote").state["model"]
    n = calls.count()
    assert n["read"] == 1 + len(spans) and n["open_read"] == 1, calls.calls  # 1: .metadata
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    assert all(torch.equal(remote[k], v) for k, v in model.state_dict().items())


def test_a_tensor_chunk_that_would_run_code_is_refused_from_a_remote_store(small_dcp, tmp_path):
    src, model = small_dcp
    marker = tmp_path / "ran"
    plant_payload(src, "model.0.weight", marker, (src / "__0_0.distcp").read_bytes())
    storage = _on_remote_store(src)
    with pytest.raises(CheckpointFormatError, match=r"model\.0\.weight's chunk .* is refused: it needs unpickling "
                                                    r"posix\.system; nothing from it was run"):
        harness.warm_start(model, storage.url)
    assert not marker.exists()


def test_an_oversized_metadata_is_refused_from_its_listed_size(small_dcp, monkeypatch):
    """The size limit is checked against the listing before a byte is read (it was a ranged read of the limit
    plus one: on S3 a 256 MiB buffer for every metadata file); over it, nothing is read."""
    from harness.interop import dcp as hdcp
    src, model = small_dcp
    storage = _on_remote_store(src)
    calls = counting(storage)
    assert hdcp.read_layout(storage, "remote").tensors  # fits
    assert ("read", ".metadata") in calls.calls
    monkeypatch.setattr(hdcp, "MAX_METADATA_BYTES", (src / ".metadata").stat().st_size - 1)
    calls.calls.clear()
    with pytest.raises(CheckpointFormatError, match=r"\.metadata is larger than"):
        harness.warm_start(model, storage.url)
    with pytest.raises(CheckpointFormatError, match=r"\.metadata is larger than"):
        hdcp.read_layout(storage, "remote")
    assert not [c for c in calls.calls if c[0] == "read"]
