"""benchmarks/latency_methods.py (issue 33): its demo config composes as the demo with three
held-out networks, and its table against values worked out by hand."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from benchmark_helpers import BENCHMARKS, benchmark_module

from pipeline import demo as pipeline_demo

DEMO = Path(__file__).parents[1] / "configs" / "demo" / "demo.yaml"


def test_the_latency_demo_is_the_demo_with_three_held_out_networks() -> None:
    shipped = pipeline_demo.load_demo_config(DEMO)
    latency = pipeline_demo.load_demo_config(BENCHMARKS / "latency_demo.yaml")
    assert latency.demo.target_seeds == [100, 101, 102]
    assert latency.demo.configs == shipped.demo.configs  # the same stage configs, resolved
    assert dataclasses.replace(latency.demo, target_seeds=shipped.demo.target_seeds) == shipped.demo
    assert (latency.zoo, latency.meta, latency.prune, latency.select) == \
        (shipped.zoo, shipped.meta, shipped.prune, shipped.select)


def _report(acc: float, reached: float, macs: float) -> dict:
    return {"accuracy": {"final": {"test": acc}}, "latency_speed_up": {"reached": reached},
            "speed_up": {"reached": macs}}


def test_table_areas_and_paired_differences(tmp_path: Path) -> None:
    bench = benchmark_module("latency_methods")
    # curves: accuracy falls linearly from 0.6 at 1.0x to 0.2 at 2.0x (metanetwork), and is
    # 0.1 lower everywhere for none; area over [1.2, 1.6] = mean accuracy there
    for network, shift in (("seed100", 0.0), ("seed101", 0.02)):
        folder = tmp_path / "latency" / network
        folder.mkdir(parents=True)
        with (folder / "curve_latency.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["curve", "latency_speed_up", "macs", "accuracy"])
            writer.writeheader()
            for method, drop in (("metanetwork", 0.0), ("none", 0.1)):
                for s in (1.0, 1.5, 2.0):
                    writer.writerow({"curve": method, "latency_speed_up": s, "macs": 1,
                                     "accuracy": 0.6 - 0.4 * (s - 1.0) - drop + shift})
        for method, acc in (("metanetwork", 0.5 + shift), ("none", 0.45)):
            for run in (folder / "lat1.5b64" / method, tmp_path / "prune" / network / "2x" / method):
                run.mkdir(parents=True)
                (run / "report.json").write_text(json.dumps(_report(acc, 1.4, 3.0)))
    # from the command line, as the docstring runs it: only the table (every cell "has run")
    assert bench.main(["--demo", str(tmp_path), "--data_root", "unused", "--area", "[1.2,1.6]",
                       "--part", "table"]) == 0
    record = json.loads((tmp_path / "latency" / "latency_methods.json").read_text())
    measured = record["values"]
    area = measured["stage-1 val area, latency 1.2-1.6x at batch 64"]
    assert area["metanetwork"]["seed100"] == pytest.approx(0.6 - 0.4 * 0.4)  # at the mean, 1.4x
    assert area["none"]["seed101"] == pytest.approx(0.6 - 0.4 * 0.4 - 0.1 + 0.02)
    final = measured["test acc at latency 1.5x, batch 64"]
    assert final == {"metanetwork": {"seed100": 0.5, "seed101": 0.52},
                     "none": {"seed100": 0.45, "seed101": 0.45}}
    table = tmp_path / "latency" / "latency_methods.md"
    by = {(d["measure"], d["first"], d["second"]): d for d in record["paired"]}
    d = by[("test acc at latency 1.5x, batch 64", "metanetwork", "none")]
    assert d["differences"] == pytest.approx({"seed100": 0.05, "seed101": 0.07})
    assert d["mean"] == pytest.approx(0.06)
    assert by[("stage-1 val area, latency 1.2-1.6x at batch 64", "metanetwork", "none")]["mean"] \
        == pytest.approx(0.1)
    assert not any(k[0] in ("latency speed-up re-timed", "MACs speed-up taken") for k in by)
    assert "| test acc at latency 1.5x, batch 64 | metanetwork | 0.5000 | 0.5200 |" in table.read_text()
