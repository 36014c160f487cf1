"""timm classifiers through the pipeline (issue 29): ``networks.build("timm:<name>")``, pruned
network files of timm models, ``prune.py run --arch timm:<name>`` from a plain state_dict, and
a metanetwork meta-trained on a tiny zoo of one timm family."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_pruning as tp
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from pruning_helpers import random_prune, randomize, tiny_prune_config

import networks
import prune
from datamodules import ImageDataModule, ModelZooDataModule
from lightning_modules import MetaPruningModule

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("cli_argv")

X32 = torch.zeros(1, 3, 32, 32)
QUICK = ["--prune.latency_batch_sizes", "[]", "--prune.onnx=false", "--prune.program=false",
         "--prune.bn_batches", "0", "--prune.curve_every", "20"]


def _timm_macs(model: torch.nn.Module, example: torch.Tensor = X32) -> int:
    """MACs of one image by torch_pruning's own counter (not the project's wrapper)."""
    macs, _ = tp.utils.count_ops_and_params(model.eval(), example)
    return int(macs)


def test_timm_names_build_untrained_timm_models_and_bad_names_are_named(monkeypatch) -> None:
    model = networks.build("timm:convnext_atto", 3, drop_path_rate=0.1)
    assert type(model) is timm.models.convnext.ConvNeXt and model.num_classes == 3
    assert model.stages[0].blocks[1].drop_path.drop_prob == pytest.approx(0.1 / 11)  # kwargs reach timm
    torch.manual_seed(0)
    reference = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(
        reference.state_dict().values(), networks.build("timm:convnext_atto", 3).state_dict().values()))
    with pytest.raises(ValueError, match=r"timm has no model 'no_such_net'.*timm\.list_models"):
        networks.build("timm:no_such_net", 3)
    with pytest.raises(ValueError, match="pretrained timm weights are never downloaded"):
        networks.build("timm:convnext_atto", 3, pretrained=True)
    with pytest.raises(ValueError, match=r"timm:<name>.*package\.module:Class"):
        networks.build("no_such_net", 3)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ValueError, match="timm is not installed"):
        networks.build("timm:convnext_atto", 3)


# (model, input size, the timm layers its pruned file must carry). The GroupNorm model runs at
# 64x64: at 32x32 its last stages are 1x1, and a group pruned to one channel there normalizes a
# single value, which torch refuses at batch size 1 (the MAC count's batch).
PRUNED = [
    ("convnext_atto", 32, "LayerNorm2d (a LayerNorm subclass), layer-scale gamma parameters"),
    ("mobilenetv3_small_050", 32, "BatchNormAct2d, squeeze-excitation convs, a conv head"),
    ("test_efficientnet_gn", 64, "GroupNormAct: groups kept, channels pruned in every group"),
]


@pytest.mark.parametrize("name,size,what", PRUNED, ids=[p[0] for p in PRUNED])
def test_a_pruned_timm_network_file_loads_back_bit_for_bit(name: str, size: int, what: str,
                                                           tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize(networks.build(f"timm:{name}", 3))
    example = torch.zeros(1, 3, size, size)
    base = _timm_macs(timm.create_model(name, pretrained=False, num_classes=3), example)
    reached = networks.prune_to_speed_up(model, example, 1.3, base, iterative_steps=40)
    macs = _timm_macs(model, example)
    assert reached == pytest.approx(base / macs) and reached >= 1.2
    networks.save_network(model, tmp_path / "net.pt", {"name": f"timm:{name}", "num_classes": 3})
    loaded, _ = networks.load_network(tmp_path / "net.pt")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert _timm_macs(loaded, example) == macs
    # every layer's size attributes follow its tensors (a later prune reads them)
    for (path, a), b in zip(model.named_modules(), loaded.modules()):
        for attr in ("num_features", "num_channels", "num_groups", "normalized_shape",
                     "in_channels", "out_channels", "groups"):
            assert getattr(a, attr, None) == getattr(b, attr, None), f"{path}.{attr}"
    norms = [m for m in loaded.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels == m.weight.shape[0] and m.num_channels % m.num_groups == 0
               for m in norms)


def _run_arch(config: Path, arch: str, weights: Path, out: Path, *extra: str) -> dict:
    assert prune.main(["run", "--config", str(config), "--arch", arch, "--weights", str(weights),
                       "--method", "none", "--speed_up", "1.5", "--out", str(out), *QUICK,
                       *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _timm_resized_to(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh timm ``name`` narrowed to ``state``'s shapes by torch_pruning's own dependency
    graph (each group's last channels removed; not the project's layer-shape records), with
    ``state`` loaded strictly: an oracle for a pruned network file."""
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=X32)
    paths = {m: p for p, m in model.named_modules()}
    for group in graph.get_all_groups(root_module_types=(torch.nn.Conv2d, torch.nn.Linear)):
        root = group[0].dep.target.module
        width = int(state[f"{paths[root]}.weight"].shape[0])
        current = root.weight.shape[0]
        if width < current:
            group = graph.get_pruning_group(root, group[0].dep.handler, list(range(width, current)))
            group.prune()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("name", ["convnext_atto",  # the default suite: one family end to end
                                  pytest.param("mobilenetv3_small_050", marks=pytest.mark.slow),
                                  pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_prune_run_prunes_a_timm_network_from_a_plain_state_dict(
        name: str, tiny_cifar: Path, tmp_path: Path) -> None:
    """`--arch timm:<name> --weights FILE --method none` reaches the target by torch_pruning's
    MAC count of a timm model narrowed by torch_pruning to the final weights, and network.pt
    reloads to that model's outputs bit for bit."""
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=3)  # knows nothing of our files
    torch.save(plain.state_dict(), tmp_path / "sd.pt")
    config = tiny_prune_config(tiny_cifar, tmp_path, 1.5, 40)
    report = _run_arch(config, f"timm:{name}", tmp_path / "sd.pt", tmp_path / "run")
    assert report["architecture"] == {"name": f"timm:{name}", "num_classes": 3, "kwargs": {}}
    final, record = networks.load_network(tmp_path / "run" / "network.pt")
    oracle = _timm_resized_to(name, record["state_dict"])
    base = _timm_macs(timm.create_model(name, pretrained=False, num_classes=3))
    assert base / _timm_macs(oracle) >= 1.5
    assert report["speed_up"]["reached"] == pytest.approx(base / _timm_macs(oracle))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(final.eval()(x), oracle(x))


class _Recorder(Callback):
    """The metanetwork's parameters when training starts, and every step's loss."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach())


ConvNeXt = {"name": "timm:convnext_atto", "kwargs": {}}


@pytest.fixture(scope="module")
def timm_meta(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory,
              make_zoo) -> tuple[_Recorder, MetaPruningModule, Path]:
    """Two meta-training steps on a zoo of three randomly pruned ConvNeXt-attos (two
    meta-train members; the graph comes from the ATen walk), and the checkpoint."""
    out = tmp_path_factory.mktemp("timm_meta")
    seed_everything(0)
    zoo = make_zoo(out / "zoo", count=3, arch=ConvNeXt)
    images = ImageDataModule(str(tiny_cifar), dataset="cifar10", num_classes=3, batch_size=8,
                             num_workers=0, val_fraction=0.25)
    data = ModelZooDataModule(str(zoo), images, meta_val_members=1, batches_per_step=1, batch_size=4)
    recorder = _Recorder()
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      default_root_dir=out, callbacks=[recorder])
    module = MetaPruningModule(num_layers=1, hidden=8, node_res_ratio=0.1, edge_res_ratio=0.1)
    trainer.fit(module, data)
    trainer.save_checkpoint(out / "meta.ckpt")
    return recorder, module, out / "meta.ckpt"


def test_meta_training_on_a_timm_zoo_takes_finite_steps(timm_meta) -> None:
    recorder, module, _ = timm_meta
    assert len(recorder.losses) == 2 and all(torch.isfinite(x) for x in recorder.losses)
    after = module.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in recorder.start.items())


@pytest.mark.slow
def test_a_timm_metanetwork_prunes_a_held_out_member(timm_meta, tiny_cifar: Path,
                                                      tmp_path: Path) -> None:
    """The checkpoint runs `prune.py run --method metanetwork` to the end on a ConvNeXt-atto
    it never saw, pruned differently (same graph layout, other widths)."""
    torch.manual_seed(7)
    held_out = random_prune(networks.build("timm:convnext_atto", 3), X32, 0.2, seed=7)
    networks.save_network(held_out, tmp_path / "held_out.pt", {**ConvNeXt, "num_classes": 3})
    config = tiny_prune_config(tiny_cifar, tmp_path, 3.0, 40)  # the random prune reached ~1.5x
    assert prune.main(["run", "--config", str(config), "--network", str(tmp_path / "held_out.pt"),
                       "--metanetwork", str(timm_meta[2]), "--method", "metanetwork",
                       "--out", str(tmp_path / "run"), *QUICK]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["speed_up"]["reached"] >= 3.0 and report["accuracy"]["feedforward"] is not None
