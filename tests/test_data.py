"""ResumableSampler / BatchLoader: sharding, reshuffling and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DistributedSampler

from harness.data import BatchLoader, ResumableSampler, collate_tuples
from harness.workloads import SyntheticVectors


class _IndexDataset(torch.utils.data.Dataset):
    """Item i is (tensor(i), tensor(2*i)): makes which-index-went-where visible."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(i), torch.tensor(2 * i)


def _rank_indices(n: int, world: int, epoch: int = 0, **kw) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = ResumableSampler(n, num_replicas=world, rank=rank, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n", [30, 31, 35])
def test_rank_slices_disjoint_equal_and_cover_with_drop_last(n: int) -> None:
    world = 3
    slices = _rank_indices(n, world, seed=7)
    assert all(len(s) == n // world for s in slices)
    flat = [i for s in slices for i in s]
    assert len(set(flat)) == len(flat), "ranks overlap"
    assert len(flat) == (n // world) * world
    assert set(flat) <= set(range(n))


def test_rank_slices_cover_everything_without_drop_last() -> None:
    n, world = 31, 4
    slices = _rank_indices(n, world, seed=3, drop_last=False)
    assert all(len(s) == 8 for s in slices)
    flat = [i for s in slices for i in s]
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == 32 - 31  # exactly the padding repeats


def test_tiny_dataset_padding_wraps_repeatedly() -> None:
    slices = _rank_indices(2, 5, drop_last=False)
    assert all(len(s) == 1 for s in slices)
    assert {i for s in slices for i in s} == {0, 1}


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("epoch", [0, 5])
def test_same_order_as_torch_distributed_sampler(drop_last: bool, epoch: int) -> None:
    ds = _IndexDataset(23)
    for rank in range(3):
        ours = ResumableSampler(23, num_replicas=3, rank=rank, seed=11, drop_last=drop_last)
        ref = DistributedSampler(ds, num_replicas=3, rank=rank, seed=11, drop_last=drop_last)
        ours.set_epoch(epoch)
        ref.set_epoch(epoch)
        assert list(ours) == list(ref)
        assert len(ours) == len(ref)


def test_epochs_reshuffle_but_keep_the_same_samples() -> None:
    s = ResumableSampler(64, seed=0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    assert sorted(e0) == sorted(e1) == list(range(64))


def test_no_shuffle_is_strided_arange() -> None:
    s = ResumableSampler(10, num_replicas=2, rank=1, shuffle=False)
    assert list(s) == [1, 3, 5, 7, 9]


def test_iter_starts_at_position_and_set_epoch_resets_only_on_change() -> None:
    s = ResumableSampler(20, seed=1)
    full = list(s)
    s.advance(6)
    assert list(s) == full[6:]
    s.set_epoch(0)  # same epoch (a training loop re-announcing it): keep position
    assert s.position == 6
    s.set_epoch(1)
    assert s.position == 0


def test_state_dict_is_plain_json_ints_and_roundtrips() -> None:
    s = ResumableSampler(20)
    s.set_epoch(3)
    s.advance(5)
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"epoch": 3, "position": 5, "dataset_len": 20}
    assert all(type(v) is int for v in state.values())
    t = ResumableSampler(20)
    t.load_state_dict(state)
    assert list(t) == list(s)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset_len": 0}, "dataset_len"),
        ({"dataset_len": 10, "num_replicas": 0}, "num_replicas"),
        ({"dataset_len": 10, "num_replicas": 2, "rank": 2}, "rank"),
        ({"dataset_len": 10, "rank": -1}, "rank"),
        ({"dataset_len": 2, "num_replicas": 4}, "num_replicas"),
        ({"dataset_len": 10.0}, "dataset_len"),
        ({"dataset_len": 10, "seed": "x"}, "seed"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResumableSampler(**kwargs)


def test_advance_and_load_state_dict_validate() -> None:
    s = ResumableSampler(10, num_replicas=2)
    with pytest.raises(ValueError, match="exceeds"):
        s.advance(6)
    with pytest.raises(ValueError, match="n must be"):
        s.advance(-1)
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="exceeds"):
        s.load_state_dict({"epoch": 0, "position": 6})
    with pytest.raises(ValueError, match="epoch"):
        s.load_state_dict({"epoch": -1, "position": 0})
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-2)
    assert s.state_dict() == {"epoch": 0, "position": 0, "dataset_len": 10}  # failed loads changed nothing


def test_loader_batches_collate_and_drop_partial_batch() -> None:
    ds = _IndexDataset(10)
    loader = BatchLoader(ds, ResumableSampler(10, shuffle=False), batch_size=4)
    assert loader.batches_per_epoch == len(loader) == 2
    batches = list(loader)
    assert len(batches) == 2
    assert torch.equal(batches[0][0], torch.tensor([0, 1, 2, 3]))
    assert torch.equal(batches[1][1], torch.tensor([8, 10, 12, 14]))
    assert loader.sampler.position == 8  # dropped tail never counted as consumed
    assert list(loader) == []  # the epoch is exhausted until set_epoch


def test_loader_advances_before_the_consumer_sees_the_batch() -> None:
    loader = BatchLoader(_IndexDataset(12), ResumableSampler(12), batch_size=3)
    it = iter(loader)
    next(it)
    assert loader.sampler.state_dict() == {"epoch": 0, "position": 3, "dataset_len": 12}
    next(it)
    assert loader.sampler.state_dict() == {"epoch": 0, "position": 6, "dataset_len": 12}
    assert loader.remaining_batches == 2


def _run_epochs(loader: BatchLoader, epochs: range) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.extend(loader)
    return out


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_resume_mid_epoch_matches_uninterrupted(rank: int, k: int) -> None:
    ds = SyntheticVectors(num_samples=50, in_features=5, num_classes=3, seed=4)

    def make() -> BatchLoader:
        return BatchLoader(ds, ResumableSampler(len(ds), num_replicas=2, rank=rank, seed=9), batch_size=4)

    reference = _run_epochs(make(), range(3))
    per_epoch = make().batches_per_epoch
    assert per_epoch == 6 and len(reference) == 18

    # Interrupted run: epoch 0 complete, then k batches of epoch 1, checkpoint.
    first = make()
    consumed = _run_epochs(first, range(1))
    first.sampler.set_epoch(1)
    it = iter(first)
    consumed += [next(it) for _ in range(k)]
    state = json.loads(json.dumps(first.sampler.state_dict()))
    del first, it

    resumed = make()
    resumed.sampler.load_state_dict(state)
    assert resumed.remaining_batches == per_epoch - k
    consumed += _run_epochs(resumed, range(1, 3))  # set_epoch(1) must not reset

    assert len(consumed) == len(reference)
    for got, want in zip(consumed, reference):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_loader_rejects_bad_arguments_and_mid_iteration_tampering() -> None:
    ds = _IndexDataset(10)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, ResumableSampler(10), batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, ResumableSampler(10, num_replicas=2), batch_size=6)
    with pytest.raises(ValueError, match="dataset_len"):
        BatchLoader(ds, ResumableSampler(11), batch_size=2)
    with pytest.raises(ValueError, match="ResumableSampler"):
        BatchLoader(ds, object(), batch_size=2)  # type: ignore[arg-type]
    loader = BatchLoader(ds, ResumableSampler(10), batch_size=2)
    it = iter(loader)
    next(it)
    loader.sampler.set_epoch(1)
    with pytest.raises(RuntimeError, match="changed"):
        next(it)


def test_collate_rejects_ragged_items() -> None:
    with pytest.raises(ValueError):
        collate_tuples([(torch.zeros(1), torch.zeros(1)), (torch.zeros(1),)])
    with pytest.raises(ValueError):
        collate_tuples([])
