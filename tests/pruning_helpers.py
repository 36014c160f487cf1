"""Test networks: random weights, pruning with torch_pruning (random channels, chosen widths),
a plain accuracy loop to check reported accuracies against, a tiny prune config, and the
gradients of a metanetwork's outputs (to compare block and per-edge message passing)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch_pruning as tp
import yaml
from torch import nn

from networks import classifier_layer

DEMO_PRUNE = Path(__file__).parents[1] / "configs" / "demo" / "prune.yaml"


def random_prune(model: nn.Module, example: torch.Tensor, ratio: float, seed: int) -> nn.Module:
    """Remove random channels, a different fraction per layer (global random importance)."""
    torch.manual_seed(seed)
    pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.RandomImportance(),
                                  global_pruning=True, pruning_ratio=ratio,
                                  ignored_layers=[classifier_layer(model, example)])
    pruner.step()
    return model


def prune_out_channels(model: nn.Module, example: torch.Tensor, layer: nn.Module,
                       keep: int) -> nn.Module:
    """Shrink ``layer``'s output (and everything coupled to it) to ``keep`` channels."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    group = dg.get_pruning_group(layer, fn, idxs=list(range(keep, width)))
    group.prune()
    return model


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating tensor random, BN running statistics included (all must survive), at
    scales that keep deep networks finite."""
    g = torch.Generator().manual_seed(seed)
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        noise = torch.rand(value.shape, generator=g, dtype=value.dtype)
        if value.dim() > 1 and not value.any():  # zero-initialized (a ViT's head, class token)
            fan_in = value[0].numel() if value.shape[0] > 1 else value.shape[-1]
            value.copy_(torch.randn(value.shape, generator=g, dtype=value.dtype) / fan_in ** 0.5)
        elif value.dim() > 1:  # conv/linear weights: keep the He-style scale of the init
            value.mul_(0.5 + noise)
        elif key.endswith("running_var") or key.endswith("weight"):
            value.copy_(0.5 + noise)
        else:
            value.copy_(0.2 * (noise - 0.5))
    return model.eval()


def output_gradients(meta: nn.Module, data, outputs: dict) -> list[torch.Tensor]:
    """Gradients of a fixed random weighting of ``outputs`` (a metanetwork's output features
    by key) with respect to every parameter of ``meta`` and every input feature of ``data``
    (which must require grad)."""
    from graph import edge_attr_key

    g = torch.Generator().manual_seed(1)
    loss = sum((value * torch.randn(value.shape, generator=g, dtype=value.dtype)).sum()
               for _, value in sorted(outputs.items()))
    inputs = [data.x, *(data[edge_attr_key(a)] for a in meta.edge_types)]
    return list(torch.autograd.grad(loss, [*meta.parameters(), *inputs]))


@torch.no_grad()
def plain_accuracy(model: nn.Module, loader) -> float:
    """Fraction of correctly classified images of ``loader``, by a plain loop in eval mode."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


class TinyNet(nn.Module):
    """A user's own network, unknown to the registry: built by import path
    (``pruning_helpers:TinyNet``) in tests of bring-your-own architectures."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_prune_config(root: Path, out: Path, speed_up: float, iterative_steps: int) -> Path:
    """The demo prune.yaml shrunk to seconds (3 classes, 2 batches per stage, 1 epoch each),
    written to ``out/prune.yaml``."""
    cfg = yaml.safe_load(DEMO_PRUNE.read_text())
    cfg["prune"].update(dir=str(out / "runs"), speed_up=speed_up, iterative_steps=iterative_steps)
    cfg["base"]["trainer"].update(limit_train_batches=2, enable_model_summary=False)
    cfg["base"]["data"]["init_args"].update(root=str(root), num_classes=3, batch_size=8,
                                            eval_batch_size=8, subset=None, test_subset=None)
    for stage in ("finetune", "final"):
        cfg[stage]["trainer"]["max_epochs"] = 1
    path = out / "prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
