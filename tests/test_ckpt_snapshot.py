"""Snapshot buffers are reused across async saves, tied weights are stored once, and a saved state that does not
fit the object it is restored into is a clear CheckpointError."""

import pytest
import torch

from harness import CheckpointError, CheckpointManager
from harness.checkpoint.discovery import open_checkpoint


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight


def test_async_snapshot_reuses_buffers_and_keeps_values(ckpt_url):
    model = torch.nn.Linear(16, 4)
    mgr = CheckpointManager(ckpt_url, async_save=True, keep_last=0)
    mgr.save(1, models=model)
    first = dict(mgr._buffers)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while step 1 persists
    mgr.save(2, models=model)
    assert first and all(mgr._buffers[k] is first[k] for k in first)
    mgr.close()
    fresh = torch.nn.Linear(16, 4)
    CheckpointManager(ckpt_url).restore(models=fresh, step=1)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    CheckpointManager(ckpt_url).restore(models=fresh, step=2)
    assert torch.equal(fresh.weight, model.weight)


def test_tied_weights_stored_once_and_restored_tied(ckpt_url):
    model = Tied()
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, models=model)
    manifest = open_checkpoint(mgr.storage, mgr.latest())
    model_keys = [k for k in manifest.tensors if k.startswith("state/models/")]
    assert len(model_keys) == 1  # emb.weight and head.weight are one tensor
    other = Tied()
    mgr.restore(models=other)
    assert torch.equal(other.emb.weight, model.emb.weight)
    assert other.head.weight is other.emb.weight


def test_scheduler_of_another_type_is_a_clear_error(ckpt_url):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    CheckpointManager(ckpt_url).save(1, models=model, optimizers=opt,
                                     schedulers=torch.optim.lr_scheduler.StepLR(opt, 5))
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    with pytest.raises(CheckpointError, match="scheduler 'scheduler' cannot take the saved state"):
        CheckpointManager(ckpt_url).restore(models=model, optimizers=opt2, schedulers=lam)
