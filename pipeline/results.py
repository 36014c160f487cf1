"""A prune-runs folder and what is computed from it: each run's folder ``seed<N>/<S>x/<method>``
(``run_key``), the reports read back from a folder (``read_reports``: the one place that knows the
layout), the results table, and the paired differences between methods over networks that the
demo, the registered runs and the quality benchmarks report."""
from __future__ import annotations

import json
from pathlib import Path

from .paired import PairedDifference, paired
from .run_config import REPORT


def run_key(seed: int, speed_up: float, method: str) -> str:
    """``seed<N>/<S>x/<method>``: a prune run's folder under ``<out>/prune``."""
    return f"seed{int(seed)}/{float(speed_up):g}x/{method}"


def network_of(key: str) -> str:
    """``seed<N>`` of a run key ``seed<N>/<S>x/<method>``."""
    return key.split("/")[0]


def run_folders(folder: str | Path) -> list[Path]:
    """The finished runs under ``folder`` (a ``prune/`` folder holding
    ``seed<N>/<S>x/<method>/report.json``), sorted."""
    return sorted(path.parent for path in Path(folder).glob(f"seed*/*x/*/{REPORT}"))


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


def demo_table(reports: dict[str, dict]) -> str:
    """The demo's result table (markdown): one row per report.json, keyed
    ``seed<N>/<S>x/<method>`` (``run_key``)."""
    pct = lambda a: "-" if a is None else f"{100 * a:.1f}%"  # noqa: E731
    lines = ["| network | method | speed-up vs unpruned: MACs | measured (batch) | MACs: unpruned "
             "architecture / network given -> pruned | params | test acc before | test acc after "
             "| val acc after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in reports.items():
        acc, seed = r["accuracy"], key.split("/")[0]
        measured = " / ".join(f"{v:.2f}x ({b})" for b, v in
                              (r["speed_up"].get("measured") or {}).items()) or "-"
        lines.append(
            f"| {seed} | {r['method']} | {r['speed_up']['reached']:.2f}x "
            f"(target {r['speed_up']['target']:g}x) | {measured} "
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
    the final test accuracy per target."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, r in sorted(reports.items()):
        lo, hi = r["stage1_curve"]["range"]
        area = f"stage-1 curve area {lo:g}-{hi:g}x"
        out.setdefault(area, {}).setdefault(r["method"], {})[network_of(key)] = \
            r["stage1_curve"]["area"]
        final = f"test acc at {r['speed_up']['target']:g}x"
        out.setdefault(final, {}).setdefault(r["method"], {})[network_of(key)] = \
            r["accuracy"]["final"]["test"]
    return out


def paired_differences(values: dict[str, dict[str, dict[str, float]]]) -> list[PairedDifference]:
    """Every pair of ``PAIRS`` on every measure both methods have."""
    return [paired(per, a, b, measure) for measure, per in values.items()
            for a, b in PAIRS if a in per and b in per]
