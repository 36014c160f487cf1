"""Accuracy-vs-speed-up curves: prune a copy progressively, no finetuning, evaluate as it goes.

Pure torch: the Lightning callback (callbacks/curve.py) and checkpoint selection
(callbacks/selection.py) supply ``evaluate``.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .pruning import _checked_counter, count_macs, count_params, magnitude_pruner

Point = tuple[float, int, float]  # (speed-up, MACs, accuracy)


def accuracy_curve(model: nn.Module, example: torch.Tensor, base_macs: int,
                   evaluate: Callable[[nn.Module], float], max_speed_up: float,
                   iterative_steps: int = 200, every: int = 1) -> list[Point]:
    """Points ``(speed_up, macs, accuracy)`` of a copy of ``model`` pruned step by step with the
    criterion of :func:`networks.magnitude_pruner` (``model`` itself is untouched).

    The first point is the network as it is; then every ``every``-th step that removed
    something, and always the step that first reaches ``max_speed_up`` (the curve stops there,
    or after ``iterative_steps`` steps). Speed-ups strictly increase along the curve.
    ``evaluate(model) -> float`` gets the pruned copy in eval mode.
    """
    if every < 1:
        raise ValueError(f"every={every} must be a positive number of steps")
    work = copy.deepcopy(model).eval()
    macs = count_macs(work, example)
    points = [(base_macs / macs, macs, float(evaluate(work)))]
    if points[0][0] >= max_speed_up:
        return points
    counter = _checked_counter(work, example, macs)
    pruner = magnitude_pruner(work, example, iterative_steps)
    for step in range(1, iterative_steps + 1):
        params = count_params(work)
        pruner.step()
        if count_params(work) == params:
            continue  # nothing removed: same point
        macs = counter(work, example)
        speed_up = base_macs / macs
        if step % every == 0 or speed_up >= max_speed_up:
            work.eval()
            points.append((speed_up, macs, float(evaluate(work))))
        if speed_up >= max_speed_up:
            break
    return points


def curve_area(points: Iterable[Sequence[float]], lo: float, hi: float) -> float:
    """Mean accuracy over speed-ups ``[lo, hi]``: the trapezoid area under accuracy (last item of
    each point) against speed-up (first item), divided by ``hi - lo``.

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
