"""Test networks: random weights, pruning with torch_pruning (random channels, chosen widths),
a plain accuracy loop to check reported accuracies against, a tiny prune config, the
gradients of a metanetwork's outputs (to compare block and per-edge message passing), and the
pieces the `prune.py run` tests share (a zoo-like network, a metanetwork checkpoint, a run, a
refused run; their fixtures are in conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch_pruning as tp
import yaml
from torch import nn

import networks
from networks import classifier_layer
from pipeline.config_files import load_config_file

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


class PReLUNet(TinyNet):
    """TinyNet with a PReLU, which neither walker encodes (a learned slope per channel that
    no record carries): a network the pipeline must refuse by name."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__(num_classes, width)
        self.features[2] = nn.PReLU(width)


def tiny_prune_config(root: Path, out: Path, speed_up: float, iterative_steps: int) -> Path:
    """The demo prune.yaml shrunk to seconds (3 classes, 2 batches per stage, 1 epoch each),
    written to ``out/prune.yaml``."""
    cfg = load_config_file(DEMO_PRUNE)
    cfg["prune"].update(dir=str(out / "runs"), speed_up=speed_up, iterative_steps=iterative_steps)
    cfg["base"]["trainer"].update(limit_train_batches=2, enable_model_summary=False)
    cfg["base"]["data"]["init_args"].update(root=str(root), num_classes=3, batch_size=8,
                                            eval_batch_size=8, subset=None, test_subset=None)
    for stage in ("finetune", "final"):
        cfg[stage]["trainer"]["max_epochs"] = 1
    path = out / "prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- `prune.py run` (tests/test_prune_run*.py, test_prune_weights.py, test_prune_latency.py) ----
ARCH = {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}}
X32 = torch.zeros(1, 3, 32, 32)
TARGET = 1.6
STEPS = 40
# a run's report without ONNX and latency (each costs seconds), and without the torch.export
# program unless its tests read it
QUICK_WITH_PROGRAM = ("--prune.latency_batch_sizes", "[]", "--prune.onnx=false")
QUICK = (*QUICK_WITH_PROGRAM, "--prune.program=false")


def tiny_config(root: Path, out: Path) -> Path:
    """The demo prune.yaml shrunk to seconds: 3 classes, 2 batches per stage."""
    return tiny_prune_config(root, out, TARGET, STEPS)


def zoo_like_network(path: Path, seed: int = 0) -> Path:
    """A quarter-width ResNet-8 with some channels pruned already (as zoo members are)."""
    torch.manual_seed(seed)
    model = random_prune(networks.build(ARCH["name"], 3, **ARCH["kwargs"]), X32, 0.1, seed)
    return networks.save_network(model, path, ARCH)


def meta_checkpoint(tiny_cifar: Path, out: Path, make_zoo, name: str = "meta", **module) -> Path:
    """A real MetaPruningModule checkpoint: one meta-training step on a tiny zoo (``module``:
    more MetaPruningModule arguments, e.g. sparsity="weights")."""
    from lightning.pytorch import Trainer, seed_everything

    from datamodules import ImageDataModule, ModelZooDataModule
    from lightning_modules import MetaPruningModule

    seed_everything(0)
    zoo = make_zoo(out / f"{name}_zoo")
    images = ImageDataModule(str(tiny_cifar), dataset="cifar10", num_classes=3, batch_size=8,
                             num_workers=0, val_fraction=0.25)
    data = ModelZooDataModule(str(zoo), images, meta_val_members=1, batches_per_step=1, batch_size=4)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, default_root_dir=out)
    trainer.fit(MetaPruningModule(num_layers=1, hidden=8, node_res_ratio=0.1, edge_res_ratio=0.1,
                                  **module), data)
    path = out / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


def run(config: Path, network: Path, method: str, out: Path, meta: Path | None = None,
        *extra: str) -> int:
    import prune

    argv = ["run", "--config", str(config), "--network", str(network), "--method", method,
            "--out", str(out), *extra]
    return prune.main(argv + (["--metanetwork", str(meta)] if meta else []))


def _expect(setup: dict, tmp_path: Path, match: str, network: Path | None = None,
            meta: Path | None | str = "default", method: str = "metanetwork",
            extra: tuple[str, ...] = (), error: type = ValueError) -> None:
    out = tmp_path / "run"
    meta = setup["meta"] if meta == "default" else meta
    with pytest.raises(error, match=match):
        run(setup["config"], network or setup["network"], method, out, meta, *extra)
    assert not out.exists()  # nothing written before the inputs were checked


def _prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every convolution's and dense layer's weight, by module name (written out here, not
    read from networks.sparsity)."""
    return {name: m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}
