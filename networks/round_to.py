"""The channel multiple (torch_pruning's ``round_to``) a runtime favours, chosen by measuring.

Kernels run some widths faster than their neighbours (a SIMD register holds 8 or 16 floats, a
GEMM tile 16 or 64 columns), but which multiple pays off depends on the runtime, the machine,
the batch size and the network, and coarser rounding costs freedom: at the same target it
removes channels in larger chunks. So the choice is measured on the network itself: a copy is
pruned to the target under each candidate multiple and timed, and the multiple whose network
does the most work per unit of time (MACs / ms) wins, the smallest multiple when several are
within 2% of the best. For a MACs target every copy has about
the same MACs, so this is the fastest one; for a latency target every copy takes about the
target time, so it is the one that keeps the most MACs (capacity) to get there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .pruning import count_macs_fast

# 1 is no rounding; 2-16 cover SIMD lanes (AVX2: 8 floats, AVX-512: 16) and tensor-core tiles
ROUND_TO_CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16)
# Readings within this share of the best count as a tie, won by the smaller multiple: a gain
# smaller than the clock's noise is not worth the coarser pruning.
TIE = 0.02


@dataclass(frozen=True)
class RoundToTrial:
    """One candidate multiple: the MACs and measured latency (ms) of a copy pruned to the
    target with it; both None when that rounding cannot reach the target (``why`` says so)."""
    round_to: int
    macs: int | None
    ms: float | None
    why: str = ""

    @property
    def macs_per_ms(self) -> float | None:
        return None if self.macs is None or self.ms is None else self.macs / self.ms


def choose_round_to(model: nn.Module, example_inputs: torch.Tensor,
                    prune: Callable[[nn.Module, int | None], object],
                    measure: Callable[[nn.Module], float],
                    candidates: Sequence[int] = ROUND_TO_CANDIDATES) -> tuple[int, list[RoundToTrial]]:
    """Prune a copy of ``model`` with each candidate multiple (``prune(copy, round_to)``, None
    for 1; it raises ValueError when the target is out of reach), time it (``measure(copy) ->
    ms``, e.g. ``networks.latency_probe``) and return the multiple with the most MACs per ms
    (the smallest within ``TIE`` of the best) and every trial. ``model`` itself is not
    changed."""
    if not candidates or any(int(c) < 1 for c in candidates):
        raise ValueError(f"round_to candidates {list(candidates)} must be positive channel counts, "
                         "e.g. [1, 4, 8, 16]")
    trials = []
    for r in sorted({int(c) for c in candidates}):
        trial = copy.deepcopy(model)
        try:
            prune(trial, None if r == 1 else r)
        except ValueError as e:
            trials.append(RoundToTrial(r, None, None, str(e)))
            continue
        trials.append(RoundToTrial(r, count_macs_fast(trial, example_inputs), measure(trial)))
    reached = [t for t in trials if t.macs_per_ms is not None]
    if not reached:
        raise ValueError(f"no round_to of {[t.round_to for t in trials]} reaches the target: "
                         f"{trials[0].why}")
    best = max(t.macs_per_ms or 0.0 for t in reached)
    return min(t.round_to for t in reached if (t.macs_per_ms or 0.0) >= best * (1 - TIE)), trials


def trials_table(trials: Sequence[RoundToTrial], chosen: int) -> str:
    """The trials as a markdown table, the chosen multiple marked."""
    lines = ["| round_to | MACs | latency ms | MACs per ms |", "|---|---|---|---|"]
    for t in trials:
        mark = " (chosen)" if t.round_to == chosen else ""
        if t.macs is None or t.ms is None:
            lines.append(f"| {t.round_to} | target not reached | | |")
        else:
            lines.append(f"| {t.round_to}{mark} | {t.macs:,} | {t.ms:.3f} | {t.macs / t.ms:,.0f} |")
    return "\n".join(lines)
