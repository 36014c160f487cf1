"""Measured latency (issue 16): `networks.latency` against a forward of known duration, and
`prune.py measure` on a pruned network file against MACs counted from layer shapes."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pruning_helpers import random_prune
from torch import nn

import networks
import prune
from networks.latency import measure_latency


class Sleeper(nn.Module):
    """A forward that takes ``seconds`` per call, whatever the batch."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_latency_of_a_forward_of_known_duration() -> None:
    model = Sleeper(0.02)
    (one, four) = measure_latency(model, [3, 8, 8], batch_sizes=[1, 4], min_run_time=0.3)
    for m, batch in ((one, 1), (four, 4)):
        assert m.batch_size == batch and m.device == "cpu" and m.threads == torch.get_num_threads()
        assert 20.0 <= m.median_ms < 24.0  # sleep() never returns early; the loop costs little
        assert m.runs >= 10
    assert model.calls >= one.runs + four.runs + 2  # plus one warm-up per batch size
    assert not model.training
    with pytest.raises(ValueError, match="batch size 0"):
        measure_latency(model, [3, 8, 8], batch_sizes=[0])


def test_measure_command_compares_with_the_unpruned_architecture(tmp_path: Path, capsys) -> None:
    arch = {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}}
    x = torch.zeros(1, 3, 32, 32)
    torch.manual_seed(0)
    pruned = random_prune(networks.build(arch["name"], 3, **arch["kwargs"]), x, 0.5, 0)
    path = networks.save_network(pruned, tmp_path / "net.pt", arch)
    out = tmp_path / "latency.json"
    assert prune.main(["measure", "--network", str(path), "--batch_sizes", "[1, 2]",
                       "--min_run_time", "0.05", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # the two networks compared are this file's and a fresh build of its unpruned recipe
    # (count_macs itself is checked against layer shapes in test_prune_run.py)
    unpruned = networks.build(arch["name"], 3, **arch["kwargs"])
    assert result["macs"] == networks.count_macs(pruned, x) < result["base_macs"] == \
        networks.count_macs(unpruned, x)
    assert result["speed_up"] == result["base_macs"] / result["macs"]
    rows = result["latency"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["speed_up_measured"] == pytest.approx(r["unpruned_latency_ms"] / r["latency_ms"])
    printed = capsys.readouterr().out
    assert f"{result['speed_up']:.2f}x" in printed and "| 2 | cpu (" in printed


def test_measure_console_carries_no_third_party_noise(tmp_path: Path) -> None:
    """From the entry point, as a user runs it: the table and nothing else on stderr (torch's
    "No CUDA runtime is found" log line on CPU machines is quieted at the entry point)."""
    path = networks.save_network(networks.build("resnet8_cifar", 3, width=0.25), tmp_path / "net.pt",
                                 {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}})
    done = subprocess.run([sys.executable, "prune.py", "measure", "--network", str(path),
                           "--batch_sizes", "[1]", "--min_run_time", "0.05"],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| 1 | cpu (" in done.stdout
    assert done.stderr.strip() == ""
