"""Every rank runs the same config (harness/sameconfig.py).

Two launchers of one job (--nnodes 2 on loopback) started with different `--set` options used to abort their
workers (SIGABRT: a checkpoint collective on one rank's step only), spend every restart, and exit 1; with
another `optim.lr` the replicas would drift apart silently.
"""

from __future__ import annotations

import logging

from harness import config, sameconfig
from harness.errors import ConfigError
from sharded_helpers import run_ranks
from trainer_helpers import CONFIG, free_port, launch_cmd

import torch.distributed as tdist


def test_two_nodes_started_with_different_settings_exit_2_at_once(runner, tmp_path):
    """Both launchers exit 2 (not restarted: --max-restarts 3), one line naming the keys and values."""
    port = free_port()
    extra = [[], ["checkpoint.every_steps=30", "optim.lr=0.01"]]
    nodes = [runner.start(f"node{i}", launch_cmd(tmp_path, *sets, nproc=1, nnodes=2, endpoint=f"127.0.0.1:{port}",
                                                 max_restarts=3))
             for i, sets in enumerate(extra)]
    assert [n.wait(120) for n in nodes] == [2, 2], [n.tail() for n in nodes]
    for n in nodes:
        lines = [ln for ln in n.log().splitlines() if ln.startswith("harness: ")]
        assert len(lines) == 1 and lines[0].startswith("harness: config error: the ranks do not run the same config"), \
            n.tail()
        assert "checkpoint.every_steps = " in lines[0] and "optim.lr = " in lines[0], lines
        assert "will restart worker group" not in n.log() and "SIGABRT" not in n.log(), n.tail()
    assert not list((tmp_path / "ck").glob("step-*"))


def compare(rank: int, world: int, sets: list[list[str]]) -> dict:
    """sameconfig.check on the default group, each rank with its own overrides of the test config."""
    cfg = config.load(CONFIG, sets[rank])
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    logging.getLogger("harness").addHandler(handler)
    try:
        sameconfig.check(cfg, tdist.group.WORLD)
        return {"error": None, "warnings": records}
    except ConfigError as exc:
        return {"error": str(exc), "warnings": records}


def test_paths_timeouts_and_credentials_may_differ_between_nodes(tmp_path):
    sets = [["checkpoint.dir=/mnt/a/ck", "dist.timeout_s=60", "checkpoint.storage_options={key = 'secret-a'}"],
            ["checkpoint.dir=/mnt/b/ck", "dist.timeout_s=90", "checkpoint.storage_options={key = 'secret-b'}",
             "run.output_dir=/elsewhere", "checkpoint.io_threads=8"]]
    assert [r["error"] for r in run_ranks(tmp_path, compare, 2, sets=sets)] == [None, None]


def test_data_settings_that_differ_are_a_warning_not_an_error(tmp_path):
    res = run_ranks(tmp_path, compare, 2, sets=[[], ["data.num_samples=4096"]])
    assert [r["error"] for r in res] == [None, None]
    assert any("rank 1 (host " in w and "data.num_samples = 4096 where rank 0 has 8192" in w
               for w in res[0]["warnings"]), res[0]
    assert res[1]["warnings"] == []  # said once, by rank 0


def test_the_same_error_on_every_rank_and_no_credentials_in_it(tmp_path):
    sets = [["model.hidden=128", "checkpoint.storage_options={key = 'secret-a'}"],
            ["model.hidden=256", "train.seed=7", "checkpoint.storage_options={key = 'secret-b'}"]]
    res = run_ranks(tmp_path, compare, 2, sets=sets)
    assert res[0]["error"] == res[1]["error"], res
    err = res[0]["error"]
    assert "rank 1 (host " in err and "model.hidden = 256 where rank 0 has 128" in err, err
    assert "train.seed = 7 where rank 0 has 0" in err and "secret" not in err, err


def test_differences_name_every_key_and_absent_ones():
    ref = sameconfig.flat(config.load(CONFIG, []))
    mine = sameconfig.flat(config.load(CONFIG, ["model.dropout=0.1", "scheduler.name=step"]))
    assert sameconfig.differences(ref, mine) == [("model.dropout", "0.1", None),
                                                ("scheduler.name", '"step"', '"cosine"')]
    assert "harness version" in ref and "torch version" in ref
    assert not any(k.startswith("checkpoint.storage_options") or k == "checkpoint.dir" for k in ref)
    line = sameconfig.describe([[], sameconfig.differences(ref, mine)], ["a", "b"], warn_only=False)
    assert "model.dropout = 0.1 where rank 0 has nothing" in line, line
