"""Round trips through CheckpointManager are bitwise exact for every kind of state, wrapped models load
into bare ones and back, partial loading reports what it skipped, and version metadata is enforced."""

from __future__ import annotations

import json
import logging
import math
import random
import threading

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from torch import nn

from ckpt_helpers import (Net, OtherNet, Wrapper, assert_bitwise, ckpt_names, data_files, draws, read_manifest,
                          simple_run, snapshot, train_step, write_manifest)
from harness import CheckpointManager, faults
from harness.checkpoint.discovery import verify_checkpoint
from harness.checkpoint.format import FORMAT_VERSION, dumps
from harness.errors import CheckpointError, NewerFormatError, StateMismatchError
from harness.storage import Storage


class Counter:
    """A user object following the Stateful protocol, with tensor and JSON state."""

    def __init__(self, n: int = 0) -> None:
        self.n = n
        self.history: list = []
        self.table = torch.zeros(3)

    def state_dict(self) -> dict:
        return {"n": self.n, "history": list(self.history), "table": self.table.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.n, self.history, self.table = sd["n"], sd["history"], sd["table"]


def make_scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    except Exception as exc:  # noqa: BLE001 - older torch without CPU grad scaling
        pytest.skip(f"torch.amp.GradScaler('cpu') unsupported: {exc}")


def gan(seed: int):
    """Two models, two optimizers, two schedulers (the GAN case) and a grad scaler."""
    torch.manual_seed(seed)
    g, d = Net(8), Net(6)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.SGD(d.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=2, gamma=0.5)
    sched_d = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_d, patience=0)  # holds inf in its state
    return g, d, opt_g, opt_d, sched_g, sched_d


def plain_extras() -> dict:
    return {
        "config": {"lr": 0.1, "name": "gän", "layers": (1, 2, (3, "x")), "flags": [True, False, None],
                   "empty": ((), {}, [])},
        "int_keys": {1: "a", 2: {3: 4.5}, (1, 2): "tuple key", "__dunder": 1, None: 0, 2.5: "float key"},
        "specials": [math.nan, math.inf, -math.inf, -0.0, 5e-324, 2 ** 62, -(2 ** 63)],
        "tensors": {
            "bf16": torch.randn(3, 2).to(torch.bfloat16),
            "f16": torch.randn(4).half(),
            "f64": torch.randn(2, 2, dtype=torch.float64),
            "bool": torch.tensor([True, False, True]),
            "i64": torch.tensor([-(2 ** 63), 2 ** 63 - 1]),
            "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
            "u8": torch.arange(256, dtype=torch.uint8),
            "c64": torch.randn(3, dtype=torch.complex64),
            "c64_conj_view": torch.randn(3, dtype=torch.complex64).conj(),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 3),
            "non_finite": torch.tensor([math.nan, math.inf, -math.inf, -0.0]),
            "non_contiguous": torch.arange(12.0).reshape(3, 4).t(),
            "slice_of_storage": torch.arange(100, dtype=torch.int32)[37:41],
        },
        "a/b": torch.ones(2), "a": {"b": torch.zeros(2)},  # tensor paths that collide
        "ndarray": np.arange(6, dtype=np.float32).reshape(2, 3),
        "dtype": torch.bfloat16,
    }


def test_every_state_kind_round_trips_bitwise(ckpt_url):
    g, d, opt_g, opt_d, sched_g, sched_d = gan(0)
    scaler = make_scaler()
    for i in range(3):
        loss_g = g(torch.randn(5, 4)).pow(2).mean()
        opt_g.zero_grad()
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)
        scaler.update()
        sched_g.step()
        train_step(d, opt_d, seed=i)
        sched_d.step(1.0 / (i + 1))
    counter = Counter(7)
    counter.history = [1, (2, 3)]
    counter.table = torch.tensor([1.0, math.nan, 3.0])
    extras = plain_extras()
    position = {"epoch": 2, "batch": 5, "order_seed": 1234, "consumed": (10, 11)}
    rank_state = {"worker": torch.tensor([4, 5]), "note": "rank-local"}

    expected = snapshot({
        "g": g.state_dict(), "d": d.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
        "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(), "scaler": scaler.state_dict(),
        "counter": counter.state_dict(), "extras": extras, "position": position, "rank_state": rank_state})
    assert expected["scaler"]["scale"] != 2.0 ** 10  # the scaler has moved: its state is worth checking

    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    mgr = CheckpointManager(ckpt_url)
    mgr.save(7, models={"G": g, "D": d}, optimizers={"G": opt_g, "D": opt_d},
             schedulers={"G": sched_g, "D": sched_d}, scaler=scaler, epoch=2, position=position,
             loss=0.25, metrics={"acc": 0.5, "best": math.inf, "per_class": [0.1, 0.2]},
             extra={"counter": counter, **extras}, rank_state=rank_state, metadata={"run": "r1", "host": (1, 2)})
    mgr.close()
    uninterrupted = draws()

    # A new process: other objects in other states, other RNG states.
    g2, d2, opt_g2, opt_d2, sched_g2, sched_d2 = gan(99)
    scaler2 = make_scaler()
    counter2 = Counter()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    res = CheckpointManager(ckpt_url).restore(
        models={"G": g2, "D": d2}, optimizers={"G": opt_g2, "D": opt_d2}, schedulers={"G": sched_g2, "D": sched_d2},
        scaler=scaler2, extra={"counter": counter2})
    resumed = draws()

    assert_bitwise(uninterrupted, resumed, "rng draws")
    assert_bitwise(expected["g"], g2.state_dict(), "G")
    assert_bitwise(expected["d"], d2.state_dict(), "D")
    assert_bitwise(expected["opt_g"], opt_g2.state_dict(), "opt G")
    assert_bitwise(expected["opt_d"], opt_d2.state_dict(), "opt D")
    assert_bitwise(expected["sched_g"], sched_g2.state_dict(), "sched G")
    assert_bitwise(expected["sched_d"], sched_d2.state_dict(), "sched D")
    assert_bitwise(expected["scaler"], scaler2.state_dict(), "scaler")
    assert_bitwise(expected["counter"], counter2.state_dict(), "counter")
    assert_bitwise(expected["extras"], res.extra, "extra")
    assert "counter" not in res.extra  # given as a Stateful object: loaded into it, not returned
    assert_bitwise(expected["position"], res.position, "position")
    assert_bitwise(expected["rank_state"], res.rank_state, "rank_state")
    assert (res.step, res.epoch, res.loss, res.world_size) == (7, 2, 0.25, 1)
    assert_bitwise({"acc": 0.5, "best": math.inf, "per_class": [0.1, 0.2]}, res.metrics, "metrics")
    assert_bitwise({"run": "r1", "host": (1, 2)}, res.metadata, "metadata")
    assert res.name == "step-000000007" and res.skipped == []

    # Resumed training continues exactly like the uninterrupted one would have.
    assert_bitwise(opt_g.param_groups[0]["lr"], opt_g2.param_groups[0]["lr"])
    x = torch.randn(5, 4)
    assert torch.equal(g(x), g2(x))


def test_nan_loss_is_saved_and_restored(ckpt_url):
    model, opt, _ = simple_run()
    mgr = CheckpointManager(ckpt_url, keep_best=1)
    mgr.save(1, models=model, loss=math.nan, metrics={"ppl": math.inf})  # a diverged run still checkpoints
    mgr.save(2, models=model, loss=1.0)
    res = CheckpointManager(ckpt_url).restore(models=Net(), step=1)
    assert math.isnan(res.loss) and res.metrics == {"ppl": math.inf}


def test_tensors_in_metrics_are_refused_at_save_time(ckpt_url):
    """A metric that is a whole tensor (per-class scores) is refused; a one-element one is a number."""
    model, _, _ = simple_run()
    with pytest.raises(TypeError, match="metrics"):
        CheckpointManager(ckpt_url).save(1, models=model, metrics={"acc": torch.tensor([0.5, 0.25])})


def test_checkpoint_over_several_data_files(ckpt_url):
    model, opt, sched = simple_run()
    expected = snapshot((model.state_dict(), opt.state_dict(), sched.state_dict()))
    mgr = CheckpointManager(ckpt_url, max_file_bytes=96)
    mgr.save(3, models=model, optimizers=opt, schedulers=sched)
    files = data_files(ckpt_url, "step-000000003")
    assert len(files) >= 4, files
    man = read_manifest(ckpt_url, "step-000000003")
    assert len({e["file"] for e in man["tensors"]}) == len(files)
    verify_checkpoint(Storage(ckpt_url), "step-000000003")
    m2 = Net()
    o2 = torch.optim.AdamW(m2.parameters())
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=1)
    CheckpointManager(ckpt_url).restore(models=m2, optimizers=o2, schedulers=s2)
    assert_bitwise(expected, (m2.state_dict(), o2.state_dict(), s2.state_dict()))


def test_single_objects_use_default_names(ckpt_url):
    model, opt, sched = simple_run()
    CheckpointManager(ckpt_url).save(4, models=model, optimizers=opt, schedulers=sched)
    man = read_manifest(ckpt_url, "step-000000004")
    assert set(man["state"]["models"]) == {"model"}
    keys = {e["key"] for e in man["tensors"]}
    assert "state/models/model/fc1.weight" in keys
    m2 = Net()
    with pytest.raises(CheckpointError, match="no model named 'G'"):
        CheckpointManager(ckpt_url).restore(models={"G": m2})


# -- wrapped models -----------------------------------------------------------------------------------

def _assert_no_prefix(url: str, name: str) -> None:
    man = read_manifest(url, name)
    keys = list(man["state"]["models"]["model"])
    assert keys and not any(k.startswith("module.") for k in keys), keys


def test_wrapped_model_saves_bare_keys_and_loads_into_either(ckpt_url):
    model, opt, _ = simple_run()
    expected = snapshot(model.state_dict())
    CheckpointManager(ckpt_url).save(1, models=Wrapper(model), optimizers=opt)
    _assert_no_prefix(ckpt_url, "step-000000001")
    bare, wrapped = Net(), Wrapper(Net())
    CheckpointManager(ckpt_url).restore(models=bare)
    CheckpointManager(ckpt_url).restore(models=wrapped)
    assert_bitwise(expected, bare.state_dict())
    assert_bitwise(expected, wrapped.module.state_dict())
    # A bare model's checkpoint loads into a wrapped one too.
    CheckpointManager(ckpt_url).save(2, models=bare)
    wrapped2 = Wrapper(Net())
    CheckpointManager(ckpt_url).restore(models=wrapped2)
    assert_bitwise(expected, wrapped2.module.state_dict())


def test_wrapper_with_state_of_its_own_is_not_unwrapped(ckpt_url):
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = Net()
            self.scale = nn.Parameter(torch.tensor(2.0))

    head = Head()
    CheckpointManager(ckpt_url).save(1, models=head)
    man = read_manifest(ckpt_url, "step-000000001")
    assert "scale" in man["state"]["models"]["model"]  # its own parameter is not lost
    head2 = Head()
    CheckpointManager(ckpt_url).restore(models=head2)
    assert_bitwise(head.state_dict(), head2.state_dict())


def test_real_ddp_one_process_gloo(tmp_path):
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, opt, _ = simple_run()
        ddp = nn.parallel.DistributedDataParallel(model)
        url = str(tmp_path / "ckpt")
        mgr = CheckpointManager(url, timeout_s=30)
        mgr.save(1, models=ddp, optimizers=opt)
        _assert_no_prefix(url, "step-000000001")
        bare, wrapped = Net(), nn.parallel.DistributedDataParallel(Net())
        CheckpointManager(url, timeout_s=30).restore(models=bare)
        CheckpointManager(url, timeout_s=30).restore(models=wrapped)
        assert_bitwise(model.state_dict(), bare.state_dict())
        assert_bitwise(model.state_dict(), wrapped.module.state_dict())
    finally:
        tdist.destroy_process_group()


def test_foreign_module_prefix_is_stripped_on_load(ckpt_url):
    """A state dict saved by another tool from a DDP model ("module." keys) still loads."""
    model, _, _ = simple_run()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    CheckpointManager(ckpt_url).save(1, extra={"foreign": prefixed})
    url = ckpt_url
    man = read_manifest(url, "step-000000001")
    man["state"]["models"]["model"] = man["state"]["extra"]["foreign"]
    man["model_classes"] = {}
    write_manifest(url, "step-000000001", man)
    bare = Net()
    CheckpointManager(url).restore(models=bare)
    assert_bitwise(model.state_dict(), bare.state_dict())


# -- partial loading ---------------------------------------------------------------------------------

class Bigger(Net):
    def __init__(self):
        super().__init__(width=8)
        self.extra_head = nn.Linear(2, 2)


class Resized(Net):
    def __init__(self):
        super().__init__(width=8)
        self.fc2 = nn.Linear(8, 3)  # another number of classes: fine-tuning


def test_partial_load_reports_missing_and_unexpected(ckpt_url, caplog):
    model, _, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models={"a": model, "b": Bigger()})
    bigger, smaller = Bigger(), Net()
    with pytest.raises(CheckpointError, match="extra_head.weight"):
        CheckpointManager(ckpt_url).restore(models={"a": bigger})
    with caplog.at_level(logging.WARNING, logger="harness"):
        res = CheckpointManager(ckpt_url).restore(models={"a": bigger, "b": smaller}, strict=False)
    rep_a, rep_b = res.load_report["a"], res.load_report["b"]
    assert sorted(rep_a.missing) == ["extra_head.bias", "extra_head.weight"] and rep_a.unexpected == []
    assert sorted(rep_b.unexpected) == ["extra_head.bias", "extra_head.weight"] and rep_b.missing == []
    assert rep_a.loaded == len(model.state_dict())
    assert_bitwise(model.fc1.weight, bigger.fc1.weight)
    assert "partial load" in caplog.text and "extra_head.weight" in caplog.text


def test_shape_mismatch(ckpt_url):
    model, _, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model)
    with pytest.raises(StateMismatchError, match=r"fc2\.weight.*; pass strict=False for partial loading") as got:
        CheckpointManager(ckpt_url).restore(models=Resized())
    assert "fc2.weight" in got.value.reason and "strict=False" not in got.value.reason  # the hint apart
    with pytest.raises(StateMismatchError, match=r"fc2\.weight.*skip_mismatched"):
        CheckpointManager(ckpt_url).restore(models=Resized(), strict=False)
    target = Resized()
    fc2_before = snapshot(target.fc2.state_dict())
    res = CheckpointManager(ckpt_url).restore(models=target, strict=False, skip_mismatched=True)
    rep = res.load_report["model"]
    assert sorted(k for k, _, _ in rep.mismatched) == ["fc2.bias", "fc2.weight"]
    assert ("fc2.weight", (2, 8), (3, 8)) in rep.mismatched
    assert_bitwise(model.fc1.state_dict(), target.fc1.state_dict())
    assert_bitwise(fc2_before, target.fc2.state_dict())  # untouched


def test_fine_tuning_a_resized_head_leaves_its_optimizer_state_out(ckpt_url, caplog):
    """restore(strict=False, skip_mismatched=True) skipped the resized head in the model but loaded AdamW's
    moments of the old shape for it: the next opt.step() failed ("The size of tensor a (2) must match...").
    Now their state is left out (it starts fresh, as the head does) and said so; without skip_mismatched the
    optimizer's mismatch is refused like the model's, also when no model is given."""
    model, opt, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model, optimizers=opt)
    target = Resized()
    target_opt = torch.optim.AdamW(target.parameters(), lr=1e-2)
    with pytest.raises(StateMismatchError, match=r"optimizer 'optimizer': the saved state does not fit the "
                       r"parameters \(parameter 2: exp_avg.* saved \[2, 8\] vs parameter \[3, 8\]"):
        CheckpointManager(ckpt_url).restore(optimizers=target_opt)
    with caplog.at_level(logging.WARNING, logger="harness"):
        CheckpointManager(ckpt_url).restore(models=target, optimizers=target_opt, strict=False,
                                            skip_mismatched=True)
    assert "state of 2 parameter(s) of another shape left out, they start fresh" in caplog.text
    assert_bitwise(opt.state_dict()["state"][0], target_opt.state_dict()["state"][0])  # fc1: loaded
    assert 2 not in target_opt.state_dict()["state"] and 3 not in target_opt.state_dict()["state"]
    train_step(target, target_opt)  # it failed here
    assert target_opt.state_dict()["state"][2]["exp_avg"].shape == (3, 8)


# -- version metadata ------------------------------------------------------------------------------

def test_newer_format_version_in_commit_is_refused(ckpt_url):
    model, _, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model)
    st = Storage(ckpt_url)
    commit = json.loads(st.read_bytes("step-000000001/COMMIT"))
    commit["format_version"] = FORMAT_VERSION + 1
    st.write_bytes("step-000000001/COMMIT", dumps(commit))
    with pytest.raises(CheckpointError, match="newer harness"):
        verify_checkpoint(st, "step-000000001")
    with pytest.raises(CheckpointError, match="newer harness"):
        CheckpointManager(ckpt_url).restore(models=Net())


def test_newer_format_version_in_manifest_is_refused(ckpt_url):
    model, _, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model)
    man = read_manifest(ckpt_url, "step-000000001")
    man["format_version"] = FORMAT_VERSION + 1
    write_manifest(ckpt_url, "step-000000001", man)  # commit record (version 1) matches its checksum
    with pytest.raises(CheckpointError, match="newer harness"):
        verify_checkpoint(Storage(ckpt_url), "step-000000001")
    with pytest.raises(CheckpointError, match="newer harness"):
        CheckpointManager(ckpt_url).restore(models=Net())


@pytest.mark.parametrize("where", ["COMMIT", "manifest"])
def test_a_newer_format_checkpoint_is_not_passed_over_for_an_older_one(ckpt_url, where):
    """A harness rolled back under a job whose newest checkpoints a newer one wrote: restore walked back to an
    older checkpoint of its own format (an error line each) and trained on from there, undoing the steps
    since. It stops instead, naming the checkpoint; nothing is loaded; an older one is a deliberate move."""
    model, _, _ = simple_run()
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, models=model)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    mgr.save(2, models=model)
    st = Storage(ckpt_url)
    if where == "COMMIT":
        commit = json.loads(st.read_bytes("step-000000002/COMMIT"))
        st.write_bytes("step-000000002/COMMIT", dumps({**commit, "format_version": FORMAT_VERSION + 1}))
    else:
        man = read_manifest(ckpt_url, "step-000000002")
        write_manifest(ckpt_url, "step-000000002", {**man, "format_version": FORMAT_VERSION + 1})
    target = Net()
    before = snapshot(target.state_dict())
    with pytest.raises(NewerFormatError, match=r"^checkpoint step-000000002: (commit record|manifest) was written "
                       r"in format version 2 by a newer harness .*move step-000000002 out of the folder"):
        CheckpointManager(ckpt_url).restore(models=target)
    assert_bitwise(before, target.state_dict())  # step 1 was not loaded in its place
    st.remove_tree("step-000000002")  # moved out of the folder: the older one is then what a restore uses
    assert CheckpointManager(ckpt_url).restore(models=target).name == "step-000000001"


def test_model_class_is_recorded_and_mismatch_warned(ckpt_url, caplog):
    model, _, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model)
    assert read_manifest(ckpt_url, "step-000000001")["model_classes"]["model"].endswith("ckpt_helpers.Net")
    with caplog.at_level(logging.WARNING, logger="harness"):
        CheckpointManager(ckpt_url).restore(models=Net())
    assert "saved from" not in caplog.text
    other = OtherNet()
    with caplog.at_level(logging.WARNING, logger="harness"):
        CheckpointManager(ckpt_url).restore(models=other)
    assert "saved from ckpt_helpers.Net" in caplog.text and "OtherNet" in caplog.text
    assert_bitwise(model.state_dict(), other.state_dict())


def test_another_optimizer_class_is_refused_by_its_hyperparameters_or_warned(ckpt_url, caplog):
    """torch's load_state_dict takes AdamW's state into SGD without a word (and the first step raises
    KeyError 'momentum'): restore refuses it, naming what SGD lacks and the class it was saved from. Adam
    takes AdamW's hyperparameters (torch's choice): loaded, with a warning naming both classes. A manifest
    that does not record the class (older checkpoints, or a hostile value) still refuses, without naming it."""
    model, opt, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model, optimizers=opt)
    manifest = read_manifest(ckpt_url, "step-000000001")
    assert manifest["optimizer_classes"] == {"optimizer": "torch.optim.adamw.AdamW"}
    sgd = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(StateMismatchError, match=r"optimizer 'optimizer' cannot take the saved state: .*'dampening', "
                                                 r"'momentum', which SGD needs \(saved by torch.optim.adamw.AdamW;"):
        CheckpointManager(ckpt_url).restore(models=Net(), optimizers=sgd)
    adam = torch.optim.Adam(Net().parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="harness"):
        CheckpointManager(ckpt_url).restore(models=Net(), optimizers=adam)
    assert "saved from torch.optim.adamw.AdamW and is loaded into torch.optim.adam.Adam" in caplog.text
    assert_bitwise(adam.state_dict()["state"], opt.state_dict()["state"])
    manifest["optimizer_classes"] = ["not", "a", "mapping"]
    write_manifest(ckpt_url, "step-000000001", manifest)
    with pytest.raises(CheckpointError, match=r"which SGD needs \(saved by another optimizer\?;"):
        CheckpointManager(ckpt_url).restore(models=Net(), optimizers=torch.optim.SGD(Net().parameters(), lr=0.1))


def test_no_checkpoint_is_a_fresh_start(ckpt_url):
    assert CheckpointManager(ckpt_url).restore(models=Net()) is None
    assert CheckpointManager(ckpt_url).latest() is None


def test_restore_a_given_step(ckpt_url):
    model, opt, sched = simple_run()
    mgr = CheckpointManager(ckpt_url, keep_last=0)
    states = {}
    for step in (1, 2, 3):
        train_step(model, opt, sched, seed=step)
        states[step] = snapshot(model.state_dict())
        mgr.save(step, models=model)
    m2 = Net()
    assert CheckpointManager(ckpt_url).restore(models=m2, step=2).step == 2
    assert_bitwise(states[2], m2.state_dict())
    with pytest.raises(CheckpointError, match="step 9"):
        CheckpointManager(ckpt_url).restore(models=m2, step=9)


# -- async -------------------------------------------------------------------------------------------

def test_async_save_snapshots_before_returning(ckpt_url):
    model, opt, sched = simple_run()
    expected = snapshot((model.state_dict(), opt.state_dict()))
    release = threading.Event()
    persisted_files = []

    def hold_after_first_file(name, info):  # the background writer stops after its first data file
        if name == "save.data_file":
            persisted_files.append(info["file"])
            assert release.wait(10)

    faults.install(hold_after_first_file)
    mgr = CheckpointManager(ckpt_url, async_save=True, max_file_bytes=96)
    mgr.save(5, models=model, optimizers=opt, schedulers=sched)
    with torch.no_grad():  # training goes on and changes everything in place
        for p in model.parameters():
            p.add_(1.0)
        for s in opt.state.values():
            s["exp_avg"].mul_(3)
    release.set()
    mgr.wait()
    mgr.close()
    assert len(persisted_files) >= 3  # most tensors were written after the mutation
    m2 = Net()
    o2 = torch.optim.AdamW(m2.parameters())
    CheckpointManager(ckpt_url).restore(models=m2, optimizers=o2)
    assert_bitwise(expected, (m2.state_dict(), o2.state_dict()))


def test_async_background_failure_surfaces_at_wait(ckpt_url):
    model, _, _ = simple_run()

    def fail_commit(name, info):
        if name == "save.before_commit" and info["step"] == 2:
            raise faults.FaultInjected("disk gone")

    faults.install(fail_commit)
    mgr = CheckpointManager(ckpt_url, async_save=True)
    mgr.save(1, models=model)
    mgr.save(2, models=model)  # returns; the failure happens in the background
    with pytest.raises(CheckpointError, match="step 2.*disk gone"):
        mgr.wait()
    mgr.wait()  # reported once
    mgr.save(3, models=model)
    mgr.close()
    assert [n for n in ckpt_names(ckpt_url) if n != "step-000000002"] == ["step-000000001", "step-000000003"]
    assert CheckpointManager(ckpt_url).restore(models=Net()).step == 3


def test_async_background_failure_surfaces_at_next_save(ckpt_url):
    model, _, _ = simple_run()

    def fail_first(name, info):
        if name == "save.data_file" and info["step"] == 1:
            raise faults.FaultInjected("write failed")

    faults.install(fail_first)
    mgr = CheckpointManager(ckpt_url, async_save=True)
    mgr.save(1, models=model)
    with pytest.raises(CheckpointError, match="step 1.*write failed"):
        mgr.save(2, models=model)
    mgr.save(2, models=model)
    mgr.close()
    assert CheckpointManager(ckpt_url).restore(models=Net()).step == 2
