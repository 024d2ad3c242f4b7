"""``state={name: Stateful}`` (torch.distributed.checkpoint's protocol) beside the keyword arguments: both
write the same checkpoint, a user's own kind of state is one entry, and a new kind in the table is one entry."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from ckpt_helpers import Net, assert_bitwise, snapshot, train_step
from harness import CheckpointManager
from harness.checkpoint import kinds
from harness.checkpoint.discovery import open_checkpoint
from harness.storage import Storage


class Cursor:
    """A user's own Stateful object (a data cursor with a tensor): an extra."""

    def __init__(self, pos: int = 0) -> None:
        self.pos, self.seen = pos, torch.arange(pos, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "seen": self.seen.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.pos, self.seen = sd["pos"], sd["seen"]


def _objects(seed: int):
    torch.manual_seed(seed)
    g, d = Net(8), Net(6)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3)
    opt_d = torch.optim.SGD(d.parameters(), lr=1e-2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt_g, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for i in range(2):
        train_step(g, opt_g, sched, seed=seed + i)
        train_step(d, opt_d, seed=seed + 10 + i)
    return g, d, opt_g, opt_d, sched, scaler, Cursor(5 + seed)


def _seed_all() -> None:  # the RNG states are saved too: the same on both sides
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)


def _files(url: str, name: str) -> dict[str, bytes]:
    storage = Storage(url)
    manifest = open_checkpoint(storage, name)
    return {f: storage.read_bytes(f"{name}/{f}") for f in manifest.files}


def test_state_dict_and_keywords_write_identical_checkpoints(tmp_path):
    g, d, opt_g, opt_d, sched, scaler, cursor = _objects(0)
    a, b = str(tmp_path / "kw"), str(tmp_path / "state")
    _seed_all()
    CheckpointManager(a).save(4, models={"g": g, "d": d}, optimizers={"g": opt_g, "d": opt_d},
                              schedulers={"g": sched}, scaler=scaler,
                              extra={"cursor": cursor, "note": "x", "t": torch.ones(3)}, loss=0.5)
    _seed_all()
    CheckpointManager(b).save(4, {"g": g, "d": d}, optimizers={"g": opt_g, "d": opt_d},  # same names per kind
                              schedulers={"g": sched}, scaler=scaler, loss=0.5,
                              extra={"cursor": cursor, "note": "x", "t": torch.ones(3)})
    _seed_all()
    c = str(tmp_path / "mixed")
    mgr = CheckpointManager(c)
    with pytest.raises(ValueError, match="two models named 'g'"):
        mgr.save(4, {"g": g}, models={"g": g})
    mgr.save(4, {"g": g, "d": d, "cursor": cursor, "note": "x", "t": torch.ones(3), "amp": scaler},
             optimizers={"g": opt_g, "d": opt_d}, schedulers={"g": sched}, loss=0.5)
    ma, mb, mc = (open_checkpoint(Storage(u), "step-000000004").raw for u in (a, b, c))
    for m in (mb, mc):
        for key in ("state", "ranks", "tensors", "files", "model_classes", "sharding", "loss"):
            assert m[key] == ma[key], key
    assert _files(a, "step-000000004") == _files(b, "step-000000004") == _files(c, "step-000000004")


def test_state_dict_restores_every_kind_bitwise(ckpt_url):
    g, d, opt_g, opt_d, sched, scaler, cursor = _objects(0)
    state = {"g": g, "d": d, "opt_g": opt_g, "opt_d": opt_d, "sched": sched, "scaler": scaler, "cursor": cursor,
             "note": {"k": [1, 2]}}
    expected = snapshot([o.state_dict() for o in (g, d, opt_g, opt_d, sched, scaler, cursor)])
    mgr = CheckpointManager(ckpt_url)
    mgr.save(7, state, epoch=1)
    meta = open_checkpoint(mgr.storage, mgr.latest()).raw
    assert set(meta["state"]["models"]) == {"g", "d"} and set(meta["state"]["optimizers"]) == {"opt_g", "opt_d"}
    assert set(meta["state"]["schedulers"]) == {"sched"} and meta["state"]["scaler"] is not None
    assert set(meta["state"]["extra"]) == {"cursor", "note"}

    g2, d2, opt_g2, opt_d2, sched2, scaler2, cursor2 = _objects(99)
    res = CheckpointManager(ckpt_url).restore({"g": g2, "d": d2, "opt_g": opt_g2, "opt_d": opt_d2, "sched": sched2,
                                               "scaler": scaler2, "cursor": cursor2})
    assert res.step == 7 and res.epoch == 1 and res.extra == {"note": {"k": [1, 2]}}
    assert_bitwise(expected, snapshot([o.state_dict() for o in (g2, d2, opt_g2, opt_d2, sched2, scaler2, cursor2)]))


class Sampler:
    """A kind of state the harness does not know yet."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "order": torch.randperm(6, generator=torch.Generator().manual_seed(self.epoch))}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch = sd["epoch"]
        assert torch.equal(sd["order"], self.state_dict()["order"])


def test_a_new_kind_of_state_is_one_entry_in_the_table(ckpt_url, monkeypatch):
    samplers = kinds.Kind("samplers", "sampler", lambda o: isinstance(o, Sampler))
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS[:-1], samplers, kinds.EXTRA))
    model = Net()
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, {"model": model, "train": Sampler(3), "val": Sampler(5)})
    saved = open_checkpoint(mgr.storage, mgr.latest()).raw["state"]
    assert set(saved["samplers"]) == {"train", "val"} and saved["extra"] == {}
    train, val, other = Sampler(), Sampler(), Net()
    res = CheckpointManager(ckpt_url).restore({"model": other, "train": train, "val": val})
    assert (train.epoch, val.epoch) == (3, 5) and res.extra == {}
    assert_bitwise(snapshot(model.state_dict()), snapshot(other.state_dict()))


def test_one_scaler_per_checkpoint(ckpt_url):
    mgr = CheckpointManager(ckpt_url)
    with pytest.raises(ValueError, match="one scaler"):
        mgr.save(1, {"a": torch.amp.GradScaler("cpu"), "b": torch.amp.GradScaler("cpu")})


def test_save_arguments_are_checked_before_anything_is_written(ckpt_url, caplog):
    """A step of 6.5 was saved as step 6, True as step 1, -1 as a folder 'step--00000001'; a list of models
    failed inside with "'list' object has no attribute 'state_dict'". Each is a TypeError/ValueError naming the
    argument now, and nothing is written."""
    model = Net(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(ckpt_url)
    bad = [(dict(step=6.5), TypeError, "checkpoint step must be an int, got float 6.5"),
           (dict(step=True), TypeError, "checkpoint step must be an int, got bool True"),
           (dict(step="7"), TypeError, "got str '7'"),
           (dict(step=-1), ValueError, "checkpoint step must be >= 0, got -1"),
           # saved "OK" as step-1000000000000, a folder name no listing matches: never found, never retained
           (dict(step=10**12), ValueError, "checkpoint step must be at most 999999999999 .*got 1000000000000"),
           (dict(step=1, loss="abc"), TypeError, "checkpoint loss must be a number .*got str 'abc'"),
           (dict(step=1, loss="0.05"), TypeError, "got str '0.05'"),  # was taken as the number 0.05
           (dict(step=1, loss=torch.ones(2)), TypeError, "loss must be a number .*got a tensor of 2 elements"),
           (dict(step=1, epoch=-2), ValueError, "checkpoint epoch must be >= 0"),
           (dict(step=torch.tensor(2.0)), TypeError, "must be an int, got Tensor"),
           (dict(step=1, models=[model, Net(8)]), TypeError,
            r"models= takes a model .* got list: name them in a dict, models=\{'a': ..., 'b': ...\}"),
           (dict(step=1, optimizers={"main": opt, "other": None}), TypeError,
            r"optimizers\['other'\] takes an optimizer .* got NoneType"),
           (dict(step=1, models=opt), TypeError, r"models= got an optimizer \(SGD\): pass it as optimizers="),
           (dict(step=1, schedulers="cosine"), TypeError, "schedulers= takes a scheduler .* got str")]
    for kwargs, exc, message in bad:
        with pytest.raises(exc, match=message):
            mgr.save(**{"models": model, **kwargs})
    assert mgr.latest() is None
    mgr.save(1, models=model)
    for kwargs, exc, message in [(dict(models=[model]), TypeError, "got list: name them in a dict"),
                                 (dict(models=model, optimizers=model), TypeError, "optimizers= got a model"),
                                 (dict(models=model, step=1.0), TypeError, "step must be an int, got float"),
                                 (dict(models=model, step="1"), TypeError, "step must be an int, got str")]:
        with pytest.raises(exc, match=message):  # "no valid checkpoint at step 1" for "1"
            mgr.restore(**kwargs)
    assert mgr.restore(models=model, step=np.int64(1)).step == 1
    # what a loop has at hand is accepted as it is: numpy and tensor integers, a loss still in the graph,
    # metrics as 0-d tensors and numpy scalars (plain numbers in the checkpoint)
    loss = model(torch.randn(2, 4)).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warned about a loss still in the graph
        mgr.save(np.int64(3), models=model, optimizers=opt, epoch=torch.tensor(1), loss=loss,
                 metrics={"acc": torch.tensor(0.75), "f1": np.float32(0.5), "per_class": [torch.tensor(1.0)]})
    mgr.close()
    res = CheckpointManager(ckpt_url).restore(models=Net(8))
    assert (res.step, res.epoch, res.loss) == (3, 1, pytest.approx(loss.item()))
    assert res.metrics == {"acc": 0.75, "f1": 0.5, "per_class": [1.0]}
    assert all(type(v) is float for v in (res.loss, res.metrics["acc"], res.metrics["f1"]))



def test_manager_settings_are_checked_before_the_folder_is_touched(tmp_path, monkeypatch):
    """A pathlib.Path folder failed with "argument of type 'PosixPath' is not iterable"; an empty one made
    checkpoints in the working directory; io_threads=0, max_file_bytes=0, keep_last=2.5 or timeout_s=0
    were taken without a word; keep_last=-1 raised after making the folder."""
    monkeypatch.chdir(tmp_path)
    bad = [(dict(dir=""), ValueError, "folder is empty"), (dict(dir=None), TypeError, "got NoneType"),
           (dict(keep_last=-1), ValueError, "keep_last must be >= 0"),
           (dict(keep_last=2.5), TypeError, "keep_last must be an int, got float"),
           (dict(keep_best="1"), TypeError, "keep_best must be an int, got str"),
           (dict(io_threads=0), ValueError, "io_threads must be > 0, got 0"),
           (dict(max_file_bytes=-5), ValueError, "max_file_bytes must be > 0, got -5"),
           (dict(timeout_s=0), ValueError, "timeout_s is in seconds and must be a finite number >= 1"),
           (dict(timeout_s=float("nan")), ValueError, "timeout_s"),
           (dict(best_mode="maximum"), ValueError, "best_mode must be 'min' or 'max'"),
           (dict(best_metric=""), ValueError, "best_metric must name a metric")]
    for kwargs, exc, message in bad:
        with pytest.raises(exc, match=message):
            CheckpointManager(**{"dir": "ck", **kwargs})
    assert list(tmp_path.iterdir()) == []
    model = Net(8)
    mgr = CheckpointManager(tmp_path / "as-a-path", keep_last=np.int64(1))
    mgr.save(1, models=model)
    mgr.save(2, models=model)
    mgr.close()
    assert sorted(p.name for p in (tmp_path / "as-a-path").iterdir()) == ["step-000000002"]


def test_a_model_on_the_meta_device_is_refused_not_reported_loaded(tmp_path):
    """Deferred init (`torch.device("meta")`) before `to_empty`: torch's load_state_dict skips meta tensors with a
    warning, and restore reported `loaded=2` for a model that still had no weights."""
    import harness
    net = Net(8)
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(1, models=net)
    with torch.device("meta"):
        deferred = Net(8)
    for call in (lambda: mgr.restore(models=deferred),
                 lambda: harness.load_for_inference(tmp_path / "ck", deferred),
                 lambda: harness.warm_start(deferred, tmp_path / "ck")):
        with pytest.raises(ValueError, match=r"model.* has 5 tensor\(s\) on the meta device \(calls, fc1.weight, "
                                             r"fc1.bias, ...\): .* call model.to_empty\(device=...\) first"):
            call()
    deferred.to_empty(device="cpu")
    assert mgr.restore(models=deferred).load_report["model"].loaded == 5
    assert_bitwise(snapshot(deferred.state_dict()), snapshot(net.state_dict()))


def test_a_data_position_given_as_an_object_is_saved_as_its_state(ckpt_url):
    """`position=loader` (a torchdata StatefulDataLoader, a sampler of one's own) and `position=generator` were
    refused with "use tensors... or give the object state_dict()/load_state_dict()", which the loader has.
    They are saved as their state dict / `get_state()`, and restore gives that back to be set."""
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)
    expected = torch.randn(5, generator=torch.Generator().set_state(gen.get_state()))
    cursor = Cursor(4)
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, models=Net(8), position=gen, rank_state=cursor)
    res = mgr.restore(models=Net(8))
    assert torch.equal(torch.randn(5, generator=torch.Generator().set_state(res.position)), expected)
    again = Cursor()
    again.load_state_dict(res.rank_state)
    assert again.pos == 4 and torch.equal(again.seen, cursor.seen)
