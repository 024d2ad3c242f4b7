"""A short fault campaign that runs in CI by default (< 60 s): a few dozen in-process trials, every fault kind
(crash / FaultInjected / ENOSPC at each save point and at retention, byte flip / truncation / deletion of a
committed checkpoint's files), on local disk and memory://. The long one: test_campaign.py (-m campaign)."""

from __future__ import annotations

import os
import random

from . import runner


def test_every_in_process_kind_once(tmp_path):
    """One trial of each in-process fault kind, seeds random (printed for replay)."""
    rng = random.Random(int(os.environ.get("HARNESS_CAMPAIGN_SEED") or random.randrange(1 << 30)))
    kinds = ([f"save-fault:{p}:{a}" for p in runner.SAVE_POINTS for a in ("crash", "raise", "enospc")]
             + [f"damage:{h}" for h in runner.DAMAGES])
    results = [runner.run_one(kind, rng.randrange(1 << 31), tmp_path) for kind in kinds]
    for r in results:
        print(r.line())
    failed = [r.line() for r in results if r.outcome == "FAIL"]
    assert not failed, "\n".join(failed)


def test_random_campaign(tmp_path):
    """40 random in-process trials; the summary JSON is written and adds up."""
    seed = int(os.environ.get("HARNESS_CAMPAIGN_SEED") or random.randrange(1 << 30))
    doc = runner.campaign(40, seed, tmp=tmp_path, json_path=str(tmp_path / "summary.json"))
    assert doc["trials"] == 40 and sum(r["trials"] for r in doc["by_kind"].values()) == 40
    assert (tmp_path / "summary.json").exists()
    assert doc["failures"] == 0, doc["failed"]
