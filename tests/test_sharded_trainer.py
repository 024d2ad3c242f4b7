"""`harness train` under torchrun (2 gloo ranks on CPU) with train.parallel = zero and fsdp: a run stopped at
step 6 and resumed to step 12 ends bitwise identical to an uninterrupted run to step 12, and its checkpoints
are recorded as sharded ("zero" / "fsdp")."""

from __future__ import annotations

import json

import pytest

from trainer_helpers import Runner, assert_same, final_state, resumed_from, torchrun_cmd

SETS = ["checkpoint.every_steps=6", "checkpoint.split_writes=true", "scheduler.name=\"none\"",
        "model.hidden=16", "data.num_samples=640"]


@pytest.fixture
def runner(tmp_path):
    r = Runner(tmp_path)
    yield r
    r.close()


def test_zero_and_fsdp_resume_bitwise(runner, tmp_path):
    dirs = {}
    procs = []
    for mode in ("zero", "fsdp"):
        for kind in ("ref", "split"):
            d = tmp_path / f"{mode}-{kind}"
            d.mkdir()
            dirs[mode, kind] = d
            steps = 12 if kind == "ref" else 6
            procs.append(runner.start(f"{mode}-{kind}-1", torchrun_cmd(
                d, *SETS, f"train.parallel=\"{mode}\"", f"train.max_steps={steps}")))
    for p in procs:
        assert p.wait() == 0, p.tail()
    procs = [runner.start(f"{mode}-split-2", torchrun_cmd(dirs[mode, "split"], *SETS, f"train.parallel=\"{mode}\"",
                                                          "train.max_steps=12")) for mode in ("zero", "fsdp")]
    for p in procs:
        assert p.wait() == 0, p.tail()
    for mode, p in zip(("zero", "fsdp"), procs):
        assert resumed_from(p.log()) == [6, 6], p.tail()  # each rank logs its resume
        ref, got = final_state(dirs[mode, "ref"] / "ck"), final_state(dirs[mode, "split"] / "ck")
        assert got.raw["step"] == 12 and got.raw["sharding"] == mode
        commit = json.loads((dirs[mode, "split"] / "ck" / got.name / "COMMIT").read_text())
        assert commit["sharding"] == mode and commit["world_size"] == 2
        assert_same(got.state, ref.state, f"{mode}.state")
        assert_same(got.ranks, ref.ranks, f"{mode}.ranks")
