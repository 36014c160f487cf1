"""Pure-torch pruning helpers shared by the graph tests, callbacks and benchmarks."""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def classifier_layer(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """The layer that produces the network's output, found by running it (by identity, never
    by matching its width to the class count)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    return order[-1]


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """MACs of one forward pass, as torch_pruning counts them (the number all reports use)."""
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def magnitude_pruner(model: nn.Module, example_inputs: torch.Tensor, iterative_steps: int = 200,
                     reg: float = 1e-4, alpha: float = 4.0) -> tp.pruner.GroupNormPruner:
    """The pruning criterion of DESIGN section 7: global group-L2 magnitude (mean over a group,
    normalized by the max), small iterative steps, the classifier excluded by identity.

    ``reg`` and ``alpha`` only matter for ``pruner.regularize`` (sparse training)."""
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean",
                                                        normalizer="max")
    return tp.pruner.GroupNormPruner(
        model, example_inputs, importance=importance, reg=reg, alpha=alpha, global_pruning=True,
        pruning_ratio=1.0, iterative_steps=iterative_steps,
        ignored_layers=[classifier_layer(model, example_inputs)])


def prune_to_speed_up(model: nn.Module, example_inputs: torch.Tensor, target: float,
                      base_macs: int, iterative_steps: int = 200) -> float:
    """Prune ``model`` in place, step by step, until MACs(base) / MACs(now) >= ``target``.

    ``base_macs`` are the MACs of the original unpruned architecture, so earlier pruning (the
    zoo's initial prune) counts toward the target. Returns the speed-up reached.
    """
    current = base_macs / count_macs(model, example_inputs)
    if target <= current:
        raise ValueError(f"speed-up target {target:.3f}x is not above the network's current "
                         f"speed-up {current:.3f}x; ask for a larger target")
    pruner = magnitude_pruner(model, example_inputs, iterative_steps)
    for _ in range(iterative_steps):
        pruner.step()
        current = base_macs / count_macs(model, example_inputs)
        if current >= target:
            return current
    raise ValueError(f"speed-up target {target:.3f}x is unreachable: {iterative_steps} pruning "
                     f"steps reach {current:.3f}x; lower the target")


@torch.no_grad()
def group_norms(pruner: tp.pruner.GroupNormPruner) -> torch.Tensor:
    """L2 norm of every prunable channel group, each divided by the largest in its group.

    Values near 0 mark channels that magnitude pruning removes at no cost; the fraction below
    0.01 is how meta-training and sparse training report progress."""
    norms = []
    for group in pruner._groups:
        imp = pruner.estimate_importance(group)  # mean squared group-L2, normalized by its max
        if imp is not None and torch.isfinite(imp).all():
            norms.append(imp.clamp_min(0).sqrt())
    return torch.cat(norms) if norms else torch.zeros(0)
