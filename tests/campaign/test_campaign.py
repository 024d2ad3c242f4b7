"""The long fault campaign (opt in): ``pytest -m campaign tests/campaign --campaign-trials 200
--campaign-process-trials 10 [--campaign-s3-trials N] [--campaign-seed S] [--campaign-json FILE]``. Same as
``python -m tests.campaign.runner --trials 200 --process-trials 10 --seed S --json FILE``."""

from __future__ import annotations

import random

import pytest

from . import runner


@pytest.mark.campaign
def test_fault_campaign(request, tmp_path):
    opt = request.config.getoption
    seed = opt("--campaign-seed")
    seed = random.randrange(1 << 31) if seed is None else seed
    doc = runner.campaign(opt("--campaign-trials"), seed, opt("--campaign-process-trials"), tmp=tmp_path,
                          json_path=opt("--campaign-json") or str(tmp_path / "campaign.json"),
                          s3_trials=opt("--campaign-s3-trials"))
    assert doc["failures"] == 0, doc["failed"]
