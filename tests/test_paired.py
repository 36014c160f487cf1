"""Paired differences with a t interval (pipeline.paired), and the measures the demo and the
quality benchmark pair, against numbers worked out by hand."""
from __future__ import annotations

import pytest

from pipeline.paired import paired, paired_table
from pipeline.results import measures, paired_differences

T_975_DF2 = 4.303  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables)


def test_mean_difference_and_t_interval_by_hand():
    values = {"a": {"n1": 0.52, "n2": 0.64, "n3": 0.76}, "b": {"n1": 0.50, "n2": 0.60,
                                                             "n3": 0.70, "n4": 0.1}}
    d = paired(values, "a", "b", "acc")
    assert d.differences == pytest.approx({"n1": 0.02, "n2": 0.04, "n3": 0.06})  # n4: only in b
    assert d.mean == pytest.approx(0.04)
    half = T_975_DF2 * 0.02 / 3 ** 0.5  # sample std of (0.02, 0.04, 0.06) is 0.02
    lo, hi = d.ci95
    assert lo == pytest.approx(0.04 - half, abs=1e-4) and hi == pytest.approx(0.04 + half, abs=1e-4)
    assert d.verdict.startswith("no difference")
    tight = paired({"a": {"x": 0.3, "y": 0.31, "z": 0.32}, "b": {"x": 0.2, "y": 0.2, "z": 0.2}},
                   "a", "b", "acc")
    assert tight.verdict == "a better (CI excludes 0)"
    assert paired({"a": {"x": 1.0}, "b": {"x": 0.5}}, "a", "b", "acc").ci95 is None
    row = paired_table([d]).splitlines()[2]
    assert row.startswith("| acc | a - b | 3 | +2.00 +4.00 +6.00 | +4.00 | [-0.97, +8.97] |")


def test_the_stage1_area_is_paired_once_per_network_and_accuracy_per_target():
    def report(method: str, target: float, area: float, test: float) -> dict:
        return {"method": method, "speed_up": {"target": target},
                "stage1_curve": {"range": [2.0, 3.0], "area": area},
                "accuracy": {"final": {"test": test}}}

    reports = {}
    for seed, (meta, none) in enumerate([(0.40, 0.30), (0.45, 0.40)]):
        for target in (2.0, 3.0):
            reports[f"seed{seed}/{target:g}x/metanetwork"] = report("metanetwork", target, meta, meta)
            reports[f"seed{seed}/{target:g}x/none"] = report("none", target, none, none - target / 100)
    values = measures(reports)
    assert list(values) == ["stage-1 curve area 2-3x", "test acc at 2x", "test acc at 3x"]
    assert values["stage-1 curve area 2-3x"]["none"] == {"seed0": 0.30, "seed1": 0.40}
    diffs = {d.measure: d for d in paired_differences(values)}
    assert diffs["stage-1 curve area 2-3x"].differences == pytest.approx({"seed0": 0.1, "seed1": 0.05})
    assert diffs["test acc at 3x"].differences == pytest.approx({"seed0": 0.13, "seed1": 0.08})
    assert all(d.first == "metanetwork" and d.second == "none" for d in diffs.values())


def test_the_forest_plot_draws_each_network_and_the_interval(tmp_path) -> None:
    import matplotlib.pyplot as plt

    from pipeline.paired import paired_figure, save_paired_plot

    first = paired({"a": {"x": 0.52, "y": 0.64, "z": 0.76}, "b": {"x": 0.5, "y": 0.6, "z": 0.7}},
                   "a", "b", "area")
    second = paired({"a": {"x": 0.1, "y": 0.2}, "c": {"x": 0.2, "y": 0.2}}, "a", "c", "acc")
    fig = paired_figure([first, second], "title")
    ax = fig.axes[0]
    half = T_975_DF2 * 2.0 / 3 ** 0.5  # in points: differences 2, 4, 6 (sample std 2)
    bars = [line.get_xdata() for line in ax.lines if len(line.get_xdata()) == 2
            and line.get_ydata()[0] == 1]  # the first comparison is the top row
    assert len(bars) == 1 and bars[0] == pytest.approx([4 - half, 4 + half], abs=1e-2)
    dots = [c.get_offsets() for c in ax.collections]
    top = sorted(float(x) for pts in dots for x, y in pts if y == 1)
    assert top == pytest.approx([2.0, 4.0, 4.0, 6.0])  # three networks and the mean
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["acc: a - c (n=2)", "area: a - b (n=3)"]
    plt.close(fig)
    path = save_paired_plot([first], tmp_path / "paired.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
