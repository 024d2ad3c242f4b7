"""`harness launch` on several nodes without --rdzv-endpoint. The Kubeflow operator's plain (not elastic)
PyTorchJob gives every pod MASTER_ADDR/MASTER_PORT (and WORLD_SIZE, RANK: the node count and index), the
endpoint torchrun users pass by hand: the launcher takes it. Elsewhere a missing endpoint is a config error;
before, every node waited for the others at its own localhost until the join timeout (600 s), then exit 1."""

from __future__ import annotations

from trainer_helpers import MAX_STEPS, assert_same_final, base_env, committed_steps, free_port, launch_cmd


def test_two_pods_of_a_plain_pytorchjob_find_each_other_at_master_addr(runner, tmp_path, ref):
    port = free_port()
    nodes = [runner.start(f"pod{rank}", launch_cmd(tmp_path, nproc=1, nnodes=2),
                          env=base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank)))
             for rank in (0, 1)]
    assert [n.wait() for n in nodes] == [0, 0], "\n".join(n.tail() for n in nodes)
    for node in nodes:
        assert f"harness launch: rendezvous at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)" in node.log()
    assert "training on cpu: 2 rank(s)" in nodes[0].log() + nodes[1].log()
    assert committed_steps(tmp_path / "ck")[-1] == MAX_STEPS
    assert_same_final(tmp_path, ref)  # one job of two ranks: the bytes of a 2-rank run on one node


def test_several_nodes_without_an_endpoint_are_a_config_error_at_once(runner, tmp_path):
    proc = runner.run("node", launch_cmd(tmp_path, nproc=1, nnodes="1:2"), timeout=60)
    assert proc.rc == 2, proc.tail()
    assert proc.log().strip() == (
        "harness: config error: --nnodes 1:2 needs --rdzv-endpoint HOST:PORT, the same on every node: a host:port "
        "of one of them, which hosts the rendezvous (without one each node waits for the others at its own "
        "localhost until the join timeout)")
    assert not (tmp_path / "ck").exists()


def test_a_master_port_that_is_no_port_is_a_config_error(runner, tmp_path):
    proc = runner.run("node", launch_cmd(tmp_path, nproc=1, nnodes=2),
                      env=base_env(PET_MASTER_ADDR="job-master-0", PET_MASTER_PORT="http"), timeout=60)
    assert proc.rc == 2 and "PET_MASTER_ADDR:PET_MASTER_PORT, the rendezvous of --nnodes 2: 'job-master-0:http'" \
        in proc.log(), proc.tail()
