"""`harness train` under torchrun (2 gloo ranks on CPU) with train.parallel = zero and fsdp: a job resumed
from the step-6 checkpoint ends bitwise identical to an uninterrupted run to step 12, and its checkpoints
are recorded as sharded ("zero" / "fsdp")."""

from __future__ import annotations

import json
import shutil

from trainer_helpers import assert_same, final_state, resumed_from, torchrun_cmd
from torch_features import FSDP_UNSUPPORTED

SETS = ["checkpoint.every_steps=6", "checkpoint.split_writes=true", "scheduler.name=\"none\"",
        "model.hidden=16", "data.num_samples=640"]


def test_zero_and_fsdp_resume_bitwise(runner, tmp_path):
    """Each mode: an uninterrupted run to step 12 (checkpoints at 6 and 12); a second job that starts from a
    copy of its step-6 checkpoint alone and trains to 12 must end with the same final checkpoint."""
    modes = ("zero", "fsdp") if FSDP_UNSUPPORTED is None else ("zero",)  # torch 2.4: fsdp is exit 2
    procs = [runner.start(f"{m}-ref", torchrun_cmd(tmp_path / f"{m}-ref", *SETS, f"train.parallel=\"{m}\"",
                                                   "train.max_steps=12")) for m in modes]
    for p in procs:
        assert p.wait() == 0, p.tail()
    for m in modes:
        (tmp_path / f"{m}-resumed" / "ck").mkdir(parents=True)
        shutil.copytree(tmp_path / f"{m}-ref" / "ck" / "step-000000006",
                        tmp_path / f"{m}-resumed" / "ck" / "step-000000006")
    procs = [runner.start(f"{m}-resumed", torchrun_cmd(tmp_path / f"{m}-resumed", *SETS, f"train.parallel=\"{m}\"",
                                                       "train.max_steps=12")) for m in modes]
    for p in procs:
        assert p.wait() == 0, p.tail()
    for mode, p in zip(modes, procs):
        assert resumed_from(p.log()) == [6, 6], p.tail()  # each rank logs its resume
        ref, got = final_state(tmp_path / f"{mode}-ref" / "ck"), final_state(tmp_path / f"{mode}-resumed" / "ck")
        assert got.raw["step"] == 12 and got.raw["sharding"] == mode
        commit = json.loads((tmp_path / f"{mode}-resumed" / "ck" / got.name / "COMMIT").read_text())
        assert commit["sharding"] == mode and commit["world_size"] == 2
        assert_same(got.state, ref.state, f"{mode}.state")
        assert_same(got.ranks, ref.ranks, f"{mode}.ranks")
