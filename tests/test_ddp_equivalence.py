"""2-process CPU DDP of classifier training equals one process with the same global batch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

from datamodules import ImageDataModule
from lightning_modules import ImageClassifier


class _RecordStep(Callback):
    """Saves, per rank, the initial network, the (augmented) batch, its loss and the synced
    gradients of the first optimizer step."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save(pl_module.network.state_dict(), self.out / f"init{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.save(list(batch), self.out / f"batch{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.clone() for n, p in pl_module.network.named_parameters()}
        torch.save(grads, self.out / f"grads{trainer.global_rank}.pt")


@pytest.mark.slow  # one step of what test_ddp_run_equals_... checks over four (default suite)
def test_ddp_gradient_equals_one_process_over_the_same_batches(tiny_cifar: Path,
                                                                tmp_path: Path) -> None:
    """The synced gradient of a 2-rank step equals, to 1e-5 relative, one process averaging the
    gradients of the two ranks' batches. (BatchNorm normalizes each rank's batch with its own
    statistics, as in any DDP run without SyncBatchNorm, which CPUs do not support; so the
    single-process reference uses the same per-batch statistics.)"""
    seed_everything(0)
    model = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.25})
    # 12 train images per class, a third held out: 24 train images, 12 per rank, no padding
    data = ImageDataModule(str(tiny_cifar), num_classes=3, batch_size=12, num_workers=0,
                           val_fraction=1 / 3)
    trainer = Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp_spawn",
                      callbacks=[_RecordStep(tmp_path)], logger=False,
                      num_sanity_val_steps=0, limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    trainer.fit(model, data)

    init = torch.load(tmp_path / "init0.pt", weights_only=True)
    batches = [torch.load(tmp_path / f"batch{r}.pt", weights_only=True) for r in range(2)]
    assert all(len(b[1]) == 12 for b in batches)
    assert not torch.equal(batches[0][0], batches[1][0])  # each rank has its own shard

    single = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.25})
    single.network.load_state_dict(init)
    single.network.train()
    for x, y in batches:
        (F.cross_entropy(single.network(x), y) / len(batches)).backward()
    for r in range(2):
        synced = torch.load(tmp_path / f"grads{r}.pt", weights_only=True)
        for name, p in single.network.named_parameters():
            torch.testing.assert_close(synced[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


class _RecordRun(Callback):
    """Saves, per rank, the initial network, every step's batch and loss, and the final
    network."""

    def __init__(self, out: Path) -> None:
        self.out, self.batches, self.losses = out, [], []

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save(pl_module.network.state_dict(), self.out / f"init{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append([t.clone() for t in batch])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"batches": self.batches, "losses": self.losses,
                    "final": pl_module.network.state_dict()},
                   self.out / f"run{trainer.global_rank}.pt")


def test_ddp_run_equals_one_process_over_the_same_batches(tiny_cifar: Path, tmp_path: Path) -> None:
    """A whole 2-rank run (4 SGD steps with momentum and weight decay) against one process
    that, at each step, averages the gradients of the two ranks' batches and steps the same
    optimizer: the global-batch loss of every step (mean of the ranks' losses) and the final
    weights agree to 1e-4 relative. BatchNorm again normalizes per rank batch (see above)."""
    seed_everything(0)
    model = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.25})
    # 24 train images, batches of 3 per rank: 4 steps in the epoch, 12 images per rank
    data = ImageDataModule(str(tiny_cifar), num_classes=3, batch_size=3, num_workers=0,
                           val_fraction=1 / 3)
    trainer = Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp_spawn",
                      callbacks=[_RecordRun(tmp_path)], logger=False,
                      num_sanity_val_steps=0, limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    trainer.fit(model, data)
    runs = [torch.load(tmp_path / f"run{r}.pt", weights_only=True) for r in range(2)]
    assert [len(r["losses"]) for r in runs] == [4, 4]

    single = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.25})
    single.network.load_state_dict(torch.load(tmp_path / "init0.pt", weights_only=True))
    single.network.train()
    optimizer = single.configure_optimizers()["optimizer"]
    for step in range(4):
        optimizer.zero_grad()
        losses = []
        for run in runs:
            x, y = run["batches"][step]
            loss = F.cross_entropy(single.network(x), y)
            (loss / len(runs)).backward()
            losses.append(loss.item())
        optimizer.step()
        ddp_mean = sum(r["losses"][step] for r in runs) / len(runs)
        assert abs(sum(losses) / len(losses) - ddp_mean) <= 1e-4 * abs(ddp_mean), step
    final = single.network.state_dict()
    for run in runs:  # both ranks end with the same weights, those of the single process
        for name, value in run["final"].items():
            if "running" in name or "num_batches" in name:
                continue  # per-rank BatchNorm statistics
            torch.testing.assert_close(value, final[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # a process-exit check; the DDP equivalence tests stay in the default suite
def test_worker_destroys_its_process_group_at_exit(tmp_path: Path) -> None:
    """Our modules' setup registers an exit handler that destroys the process group (a gloo
    worker exiting with a live group can abort in interpreter finalization). In a fresh
    process: join a 1-rank gloo group, run ImageClassifier.setup as Lightning does, and check
    from an exit handler registered earlier (exit handlers run last-in first-out, so it runs
    after ours) that the group is gone; without setup it is still alive there."""
    script = """
import atexit, sys
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning_modules import ImageClassifier
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
module = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.25})
module.trainer = Trainer(accelerator="cpu", logger=False)
if sys.argv[2] == "setup":
    module.setup("fit")
"""
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"store-{mode}"), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[1])
            for mode in ("setup", "none")]  # both at once: each spends seconds importing
    outputs = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
        outputs.append(stdout.strip().splitlines()[-1])
    assert outputs == ["initialized at exit: False", "initialized at exit: True"]
