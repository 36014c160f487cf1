"""Pruning criteria (prune.importance, issue 31): each criterion removes exactly the channels
torch_pruning's own pruner removes with that importance; the sparse regularizers are
torch_pruning's; the command line's list of criteria is the library's; a metanetwork trained for
one criterion is refused under another unless allowed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from pruning_helpers import randomize
from torch import nn

import networks
from callbacks import SparseTraining
from pipeline import options

X32 = torch.zeros(1, 3, 32, 32)
ARCH = {"name": "resnet8_cifar", "num_classes": 10, "kwargs": {"width": 0.5}}
STEPS = 40
# each criterion spelled out from torch_pruning's documentation, independently of the registry
LIBRARY = {
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="max"),
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="max"),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2, group_reduction="mean", normalizer="max"),
    "lamp": lambda: tp.importance.LAMPImportance(p=2, group_reduction="mean", normalizer="lamp"),
    "bn_scale": lambda: tp.importance.BNScaleImportance(group_reduction="mean", normalizer="max"),
}


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_the_command_line_lists_the_librarys_criteria() -> None:
    assert set(options.IMPORTANCES) == set(networks.IMPORTANCES) == set(LIBRARY)
    assert set(options.REGULARIZED) == set(networks.pruning.REGULARIZED)


@pytest.mark.parametrize("importance", sorted(LIBRARY))
def test_each_criterion_removes_what_torch_prunings_pruner_removes(importance: str) -> None:
    model = randomize(networks.build(ARCH["name"], 10, **ARCH["kwargs"]), seed=3)
    base = networks.base_macs(ARCH, X32)
    ours = copy.deepcopy(model)
    reached = networks.prune_to_speed_up(ours, X32, 2.0, base, STEPS, importance=importance)
    # the library's pruner, stepped with its own MAC counter until the target
    theirs = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(theirs, X32, importance=LIBRARY[importance](), global_pruning=True,
                                  pruning_ratio=1.0, iterative_steps=STEPS,
                                  ignored_layers=[theirs.fc])
    for _ in range(STEPS):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(theirs, X32)
        if base / macs >= 2.0:
            break
    assert widths(ours) == widths(theirs) != widths(model)
    assert reached == pytest.approx(base / macs)


def test_bn_scale_sparse_training_is_network_slimmings_l1_on_bn_scales() -> None:
    model = randomize(networks.build(ARCH["name"], 10, **ARCH["kwargs"]), seed=4)
    callback = SparseTraining(reg=1e-3, importance="bn_scale")
    with torch.enable_grad():
        callback.pruner = networks.criterion_pruner(model, X32, reg=1e-3, importance="bn_scale")
    callback.network = model
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    callback.on_before_optimizer_step(None, None, None)  # type: ignore[arg-type]
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, nn.BatchNorm2d) and name.endswith("weight"):
            assert torch.equal(p.grad, 1e-3 * torch.sign(p.data))  # by the definition of L1
        else:
            assert not p.grad.any()


def test_criteria_without_a_regularizer_are_refused_for_sparse_training() -> None:
    with pytest.raises(ValueError, match="importance 'fpgm' has no sparse-training regularizer"):
        SparseTraining(importance="fpgm")
    with pytest.raises(ValueError, match="importance 'taylor' is unknown"):
        networks.criterion_pruner(networks.build("resnet8_cifar", 3), X32, importance="taylor")


def test_a_metanetwork_records_its_criterion_and_refuses_one_without_a_regularizer(tmp_path) -> None:
    from lightning_modules import MetaPruningModule, trained_criterion
    from metaprune.errors import UserError

    module = MetaPruningModule(num_layers=1, hidden=4, importance="bn_scale")
    path = tmp_path / "meta.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": {}}, path)
    assert trained_criterion(path) == "bn_scale"
    torch.save({"hyper_parameters": {"reg": 10.0}, "state_dict": {}}, path)  # before the option
    assert trained_criterion(path) == "l2"
    with pytest.raises(UserError, match="model.init_args.importance: importance 'lamp' has no"):
        MetaPruningModule(num_layers=1, hidden=4, importance="lamp")
