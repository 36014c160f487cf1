from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

import networks
from datamodules import ImageDataModule
from lightning_modules import ImageClassifier


def _separable(n: int = 96, seed: int = 0) -> TensorDataset:
    """Three classes told apart by which colour channel is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), y] += 2.0
    return TensorDataset(x, y)


def _trainer(**kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **kw)


def test_training_learns_and_logs_every_split() -> None:
    torch.manual_seed(0)
    model = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.25},
                            lr=0.05, milestones=[100])
    train = DataLoader(_separable(), batch_size=32, shuffle=True)
    held_out = DataLoader(_separable(seed=1), batch_size=48)
    before = _trainer().validate(model, held_out, verbose=False)[0]["val/loss"]
    trainer = _trainer(max_epochs=8)
    trainer.fit(model, train, held_out)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["val/loss"] < 0.5 * before
    assert metrics["val/acc"] > 0.9

    result = trainer.test(model, held_out, verbose=False)[0]
    model.eval()
    x, y = held_out.dataset.tensors
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert result["test/acc"] == pytest.approx(expected)


def test_export_and_reload_pruned_network(tmp_path: Path) -> None:
    model = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.5})
    net = model.network.eval()
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 32, 32))
    dg.get_pruning_group(net.layer1[0].conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    assert net.layer1[0].conv1.out_channels == 6
    path = model.export_network(tmp_path / "net.pt", metadata={"note": "pruned"})

    again = ImageClassifier("resnet8_cifar", num_classes=3, weights=str(path)).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.arch == model.arch  # the unpruned recipe travels on

    mismatch = r"net.pt.*resnet8_cifar with 3 classes.*num_classes=10"
    with pytest.raises(networks.CheckpointError, match=mismatch):
        ImageClassifier("resnet8_cifar", num_classes=10, weights=str(path))


def test_class_count_must_match_the_data(tiny_cifar: Path) -> None:
    model = ImageClassifier("resnet8_cifar", num_classes=10, network_kwargs={"width": 0.25})
    data = ImageDataModule(str(tiny_cifar), num_classes=3, num_workers=0)
    with pytest.raises(ValueError, match=r"model.num_classes=10 but the data has 3 classes"):
        _trainer(fast_dev_run=True).fit(model, datamodule=data)
