"""Paired comparison of two methods over the same networks (DESIGN section 9).

Every method prunes the same held-out networks, so the comparison is per network: the
difference between the two methods on each network, then the mean difference with a 95%
confidence interval from the t distribution with n - 1 degrees of freedom. A per-method
mean +- std would throw the pairing away (networks differ from each other more than the
methods do).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
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
