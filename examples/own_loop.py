"""Checkpointing your own training loop with harness.CheckpointManager (no built-in trainer)."""
import torch
import harness

def main(ckpt_dir: str = "runs/own_loop/checkpoints", max_steps: int = 300) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
    mgr = harness.CheckpointManager(ckpt_dir, keep_last=2, keep_best=1, best_metric="loss")

    # Resume from the newest valid checkpoint (damaged ones are skipped); None on a first run.
    res = mgr.restore(models=model, optimizers=opt, schedulers=sched)
    step = res.step if res else 0
    data = torch.Generator().manual_seed(step)  # your data cursor could also go in position=...

    while step < max_steps:
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0:  # atomic, checksummed, RNG included; async_save=True to overlap
            mgr.save(step, models=model, optimizers=opt, schedulers=sched, loss=loss.item(),
                     position={"data_seed": step})
    mgr.close()  # waits for any save in flight
    print(f"done at step {step}, checkpoints: {mgr.latest()}")

if __name__ == "__main__":
    main()
