"""Paired comparison of two methods over the same networks (docs/method.md).

Every method prunes the same held-out networks, so the comparison is per network: the
difference between the two methods on each network, then the mean difference with a 95%
confidence interval from the t distribution with n - 1 degrees of freedom. A per-method
mean +- std would throw the pairing away (networks differ from each other more than the
methods do).
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class PairedDifference:
    """``first - second`` on ``measure``, network by network."""

    first: str
    second: str
    measure: str
    differences: dict[str, float]   # network -> value(first) - value(second)

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences.values())

    @property
    def ci95(self) -> tuple[float, float] | None:
        """95% confidence interval of the mean difference (paired t); None below 2 networks."""
        if self.n < 2:
            return None
        from scipy.stats import t

        half = t.ppf(0.975, self.n - 1) * statistics.stdev(self.differences.values()) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def verdict(self) -> str:
        """Whether the interval excludes 0, and on which side."""
        ci = self.ci95
        if ci is None:
            return "n < 2: no interval"
        if ci[0] > 0:
            return f"{self.first} better (CI excludes 0)"
        if ci[1] < 0:
            return f"{self.second} better (CI excludes 0)"
        return "no difference shown (CI contains 0)"


def paired(values: Mapping[str, Mapping[str, float]], first: str, second: str,
           measure: str) -> PairedDifference:
    """``values[method][network]`` -> the paired difference of two methods over the networks
    both have."""
    shared = sorted(set(values[first]) & set(values[second]))
    return PairedDifference(first, second, measure,
                            {k: values[first][k] - values[second][k] for k in shared})


def paired_table(diffs: list[PairedDifference], scale: float = 100.0, unit: str = "points") -> str:
    """Markdown: one row per comparison, differences multiplied by ``scale``."""
    lines = [f"| measure | comparison | networks | per network ({unit}) | mean difference | "
             "95% CI | verdict |", "|---|---|---|---|---|---|---|"]
    for d in diffs:
        ci = d.ci95
        lines.append(
            f"| {d.measure} | {d.first} - {d.second} | {d.n} | "
            + " ".join(f"{scale * v:+.2f}" for v in d.differences.values())
            + f" | {scale * d.mean:+.2f} | "
            + ("-" if ci is None else f"[{scale * ci[0]:+.2f}, {scale * ci[1]:+.2f}]")
            + f" | {d.verdict} |")
    return "\n".join(lines)


def paired_figure(diffs: list[PairedDifference], title: str, scale: float = 100.0,
                  unit: str = "points"):
    """A forest plot of ``diffs``: one row per comparison (the first on top), each network's
    difference a dot, the mean a diamond on its 95% interval, a line at 0. Where the interval
    lies against 0 is what a reader looks for; the dots show whether one network carries it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.6 * len(diffs) + 1.4))
    for row, d in enumerate(reversed(diffs)):
        ax.scatter([scale * v for v in d.differences.values()], [row] * d.n, s=14,
                   color="tab:gray", alpha=0.6, zorder=2, label="networks" if row == 0 else None)
        ci = d.ci95
        if ci is not None:
            ax.plot([scale * ci[0], scale * ci[1]], [row, row], color="tab:blue", lw=2.5, zorder=3)
        ax.scatter([scale * d.mean], [row], marker="D", s=45, color="tab:blue", zorder=4,
                   label="mean, 95% CI" if row == 0 else None)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(diffs)))
    ax.set_yticklabels([f"{d.measure}: {d.first} - {d.second} (n={d.n})" for d in reversed(diffs)],
                       fontsize=8)
    ax.set_xlabel(f"paired difference ({unit})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def save_paired_plot(diffs: list[PairedDifference], path: str | os.PathLike, title: str,
                     scale: float = 100.0, unit: str = "points") -> Path:
    """``paired_figure`` as a PNG at ``path``, atomically."""
    from .common import save_png

    return save_png(paired_figure(diffs, title, scale, unit), path)
