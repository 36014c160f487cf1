"""A prune-runs folder and what is computed from it: each run's folder
``seed<N>/<target>/<method>`` (``run_key``; ``<target>`` is ``<S>x`` for a speed-up, ``w<S>`` for a
weight sparsity), the reports read back from a folder (``read_reports``: the one place that knows the
layout), the results table, and the paired differences between methods over networks that the
demo, the registered runs and the quality benchmarks report."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .paired import PairedDifference, paired
from .run_config import REPORT


@dataclass(frozen=True)
class Target:
    """One target of a demo or a registered run: a speed-up in MACs (channels removed) or, with
    ``weights``, a fraction of zero weights (weights zeroed by magnitude, the shape kept)."""

    value: float
    weights: bool = False

    @property
    def folder(self) -> str:
        """The run key's middle part: ``<S>x`` or ``w<S>``."""
        return f"w{self.value:g}" if self.weights else f"{self.value:g}x"

    @property
    def text(self) -> str:
        """``2x`` or ``weight sparsity 0.9``, as measures and tables name it."""
        return f"weight sparsity {self.value:g}" if self.weights else f"{self.value:g}x"

    @property
    def option(self) -> dict[str, float]:
        """The ``prune.py run`` target it stands for, as a keyword of ``RunRequest``."""
        return {"weight_sparsity" if self.weights else "speed_up": self.value}

    @classmethod
    def of_report(cls, report: dict) -> Target:
        """The target a run's report.json records (a weight sparsity or a speed-up in MACs)."""
        if "weight_sparsity" in report:
            return cls(float(report["weight_sparsity"]["target"]), weights=True)
        return cls(float(report["speed_up"]["target"]))


def run_key(seed: int, target: Target | float, method: str) -> str:
    """``seed<N>/<target>/<method>``: a prune run's folder under ``<out>/prune`` (a bare number
    is a speed-up)."""
    target = target if isinstance(target, Target) else Target(float(target))
    return f"seed{int(seed)}/{target.folder}/{method}"


def network_of(key: str) -> str:
    """``seed<N>`` of a run key ``seed<N>/<target>/<method>``."""
    return key.split("/")[0]


def run_folders(folder: str | Path) -> list[Path]:
    """The finished runs under ``folder`` (a ``prune/`` folder holding
    ``seed<N>/<target>/<method>/report.json``), sorted."""
    return sorted(path.parent for path in Path(folder).glob(f"seed*/*/*/{REPORT}"))


def read_reports(folder: str | Path, method: str | None = None) -> dict[str, dict]:
    """``{run_key: report}`` of every finished run under ``folder`` (``run_folders``);
    ``method`` renames the runs' method (a variant read as the method it stands for)."""
    out = {}
    for run in run_folders(folder):
        report = json.loads((run / REPORT).read_text())
        report["method"] = method or report["method"]
        out[f"{run.parts[-3]}/{run.parts[-2]}/{report['method']}"] = report
    return out


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _reached(r: dict) -> tuple[str, str]:
    """A report's target cells: what it reached (of what target), and its measured speed-ups
    (none for a weight run: its network keeps its shape)."""
    if "weight_sparsity" in r:
        ws = r["weight_sparsity"]
        return f"{ws['reached']:.3f} (target {ws['target']:g})", "-"
    measured = " / ".join(f"{v:.2f}x ({b})" for b, v in
                          (r["speed_up"].get("measured") or {}).items()) or "-"
    return f"{r['speed_up']['reached']:.2f}x (target {r['speed_up']['target']:g}x)", measured


def demo_table(reports: dict[str, dict]) -> str:
    """The demo's result table (markdown): one row per report.json, keyed
    ``seed<N>/<target>/<method>`` (``run_key``)."""
    pct = lambda a: "-" if a is None else f"{100 * a:.1f}%"  # noqa: E731
    weights = any("weight_sparsity" in r for r in reports.values())
    reached = "weight sparsity reached" if weights else "speed-up vs unpruned: MACs"
    lines = [f"| network | method | {reached} | measured (batch) | MACs: unpruned "
             "architecture / network given -> pruned | params | test acc before | test acc after "
             "| val acc after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in reports.items():
        acc, seed = r["accuracy"], key.split("/")[0]
        target, measured = _reached(r)
        lines.append(
            f"| {seed} | {r['method']} | {target} | {measured} "
            f"| {_fmt_count(r['macs']['unpruned'])} / {_fmt_count(r['macs']['before'])} -> "
            f"{_fmt_count(r['macs']['after'])} "
            f"| {_fmt_count(r['params']['before'])} -> {_fmt_count(r['params']['after'])} "
            f"| {pct(acc['original']['test'])} | {pct(acc['final']['test'])} "
            f"| {pct(acc['final']['val'])} |")
    return "\n".join(lines)


# The comparisons the demo and the quality benchmark report: (first, second) -> first - second.
PAIRS = (("metanetwork", "none"), ("metanetwork", "sparse"), ("sparse", "none"))


def measures(reports: dict[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{measure: {method: {network: value}}}`` of run reports keyed by ``run_key``: the
    stage-1 curve area (one per network and method: stage 1 does not depend on the target) and
    the final test accuracy per target. A weight run's area is over weight sparsity
    (``stage-1 curve area, weight sparsity 0.5-0.9``; its final accuracy ``test acc at weight
    sparsity 0.9``)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, r in sorted(reports.items()):
        lo, hi = r["stage1_curve"]["range"]
        target = Target.of_report(r)
        area = (f"stage-1 curve area, weight sparsity {lo:g}-{hi:g}" if target.weights else
                f"stage-1 curve area {lo:g}-{hi:g}x")
        out.setdefault(area, {}).setdefault(r["method"], {})[network_of(key)] = \
            r["stage1_curve"]["area"]
        final = f"test acc at {target.text}"
        out.setdefault(final, {}).setdefault(r["method"], {})[network_of(key)] = \
            r["accuracy"]["final"]["test"]
    return out


def paired_differences(values: dict[str, dict[str, dict[str, float]]]) -> list[PairedDifference]:
    """Every pair of ``PAIRS`` on every measure both methods have."""
    return [paired(per, a, b, measure) for measure, per in values.items()
            for a, b in PAIRS if a in per and b in per]
