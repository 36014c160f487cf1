"""Accuracy-vs-speed-up curves: prune a copy progressively, no finetuning, evaluate as it goes.

Each point can be evaluated after re-estimating the BatchNorm running statistics on a few
training batches (adaptive BN, as EagleEye, Li et al., ECCV 2020): without it a pruned network's
statistics describe channels that are gone and its accuracy falls to chance within a few steps,
which says nothing about the capacity left (docs/method.md). Pure torch: the Lightning
command (pipeline/curve.py) and checkpoint selection (pipeline/select.py) supply
``evaluate`` and the calibration batches.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence, Sized, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .pruning import _checked_counter, count_macs, count_params, criterion_pruner
from .sparsity import make_permanent, sparsify, weight_sparsity, zero_counts

Point = tuple[float, int, float]  # (speed-up, MACs, accuracy)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on ``batches``.

    The statistics are reset, then each batch goes forward once with the BN layers in train
    mode and ``momentum=None``, so running_mean / running_var end as the plain average of the
    per-batch mean / unbiased variance. Every other module stays in eval mode (dropout off: the
    statistics are those of the network that will be evaluated) and no parameter changes.
    Returns ``model`` in eval mode."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    model.eval()
    if not norms or not batches:
        return model
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x in batches:
            model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


def calibration_batches(dataset: Dataset, count: int, batch_size: int,
                        seed: int = 0) -> list[torch.Tensor]:
    """``count`` batches of ``batch_size`` images drawn once from ``dataset`` (a seeded random
    sample without replacement, the dataset's own transforms applied under a fixed seed): the
    same images for every point of a curve and every network compared."""
    if count < 0 or batch_size < 1:
        raise ValueError(f"calibration needs count >= 0 and batch_size >= 1, got {count} and "
                         f"{batch_size}")
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(cast(Sized, dataset)), generator=generator)[:count * batch_size].tolist()
    if count and not picked:
        raise ValueError("no images to recalibrate BatchNorm on (empty training split)")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [x for x, _ in DataLoader(Subset(dataset, picked), batch_size=batch_size)]


def accuracy_curve(model: nn.Module, example: torch.Tensor, base_macs: int,
                   evaluate: Callable[[nn.Module], float], max_speed_up: float,
                   iterative_steps: int = 200, every: int = 1,
                   calibration: Sequence[torch.Tensor] = (),
                   max_pruning_ratio: float = 1.0, importance: str = "l2") -> list[Point]:
    """Points ``(speed_up, macs, accuracy)`` of a copy of ``model`` pruned step by step with the
    criterion of :func:`networks.criterion_pruner` (with its per-layer cap
    ``max_pruning_ratio`` and its ``importance``; ``model`` itself is untouched).

    The first point is the network as it is; then every ``every``-th step that removed
    something, and always the step that first reaches ``max_speed_up`` (the curve stops there,
    or after ``iterative_steps`` steps). Speed-ups strictly increase along the curve.
    ``evaluate(model) -> float`` gets the pruned copy in eval mode, its BatchNorm statistics
    re-estimated on the ``calibration`` image batches first when any are given (the criterion
    never reads running statistics, so this does not change what is pruned next).
    """
    if every < 1:
        raise ValueError(f"every={every} must be a positive number of steps")

    def measure(work: nn.Module) -> float:
        return float(evaluate(recalibrate_batchnorm(work, calibration)))

    work = copy.deepcopy(model).eval()
    macs = count_macs(work, example)
    points = [(base_macs / macs, macs, measure(work))]
    if points[0][0] >= max_speed_up:
        return points
    counter = _checked_counter(work, example, macs)
    pruner = criterion_pruner(work, example, iterative_steps, max_pruning_ratio=max_pruning_ratio,
                              importance=importance)
    for step in range(1, iterative_steps + 1):
        params = count_params(work)
        pruner.step()
        if count_params(work) == params:
            continue  # nothing removed: same point
        macs = counter(work, example)
        speed_up = base_macs / macs
        if step % every == 0 or speed_up >= max_speed_up:
            points.append((speed_up, macs, measure(work)))
        if speed_up >= max_speed_up:
            break
    return points


def sparsity_curve(model: nn.Module, evaluate: Callable[[nn.Module], float],
                   levels: Iterable[float], calibration: Sequence[torch.Tensor] = (),
                   scope: str = "global", exclude: Sequence[str] = ()) -> list[Point]:
    """Points ``(weight sparsity, non-zero weights, accuracy)`` of copies of ``model`` with the
    smallest ``|w|`` of its convolutions and dense layers but ``exclude`` zeroed
    (``networks.sparsity.sparsify``, ``scope`` global or per layer) to each of ``levels``, no
    finetuning; ``model`` itself is untouched.

    The first point is the network as it is; then each level above its current sparsity, in
    increasing order, each pruned from ``model``'s weights (magnitude masks are nested, so this
    equals pruning step by step). The sparsity of a point is counted on the pruned copy (a level
    rounds to whole weights). ``evaluate`` and ``calibration`` as in :func:`accuracy_curve`."""
    exclude = tuple(exclude)

    def point(work: nn.Module) -> Point:
        zeros = zero_counts(work, exclude).values()
        nonzero = sum(n - z for z, n in zeros)
        return (weight_sparsity(work, exclude), nonzero,
                float(evaluate(recalibrate_batchnorm(work, calibration))))

    points = [point(copy.deepcopy(model).eval())]
    for level in sorted({float(v) for v in levels}):
        if level <= points[-1][0]:
            continue
        work = copy.deepcopy(model).eval()
        sparsify(work, level, scope=scope, exclude=exclude)
        make_permanent(work)
        points.append(point(work))
    return points


def sparsity_levels(step: float, span: tuple[float, float], top: float) -> list[float]:
    """The weight sparsities a :func:`sparsity_curve` visits: every multiple of ``step`` and
    both ends of ``span`` (the range its area averages over) up to ``top``, in increasing order
    (rounded to 1e-6, so that 0.15 and 3 * 0.05 are one level)."""
    steps = np.arange(1, int(np.floor(top / step + 1e-9)) + 1) * step
    return sorted({round(float(v), 6) for v in [*steps, *span, top] if 0 < v <= top})


def curve_area(points: Iterable[Sequence[float]], lo: float, hi: float) -> float:
    """Mean accuracy over speed-ups ``[lo, hi]``: the trapezoid area under accuracy (last item of
    each point) against speed-up (first item; or weight sparsity, for a ``sparsity_curve``),
    divided by ``hi - lo``.

    Linear between points; outside the curve's range the nearest end value is held (a curve
    that starts at 1.32x counts its first accuracy from ``lo`` on).
    """
    if not hi > lo:
        raise ValueError(f"speed-up range [{lo}, {hi}] is empty; need lo < hi")
    pts = sorted((float(p[0]), float(p[-1])) for p in points)
    if not pts:
        raise ValueError("curve has no points")
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    grid = np.unique(np.concatenate([[lo, hi], xs[(xs > lo) & (xs < hi)]]))
    values = np.interp(grid, xs, ys)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)) / (hi - lo))


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``(images, labels)`` batches."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        pred = model(x.to(device)).argmax(1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    if total == 0:
        raise ValueError("no images to evaluate on (empty validation split)")
    return correct / total
