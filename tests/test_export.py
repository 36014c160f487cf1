"""Deployment exports (issue 16): the ONNX file of a pruned network runs in onnxruntime in a
fresh process with the PyTorch network's outputs; a network that cannot be exported is refused
naming the layer, and no file is left behind."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pruning_helpers import random_prune
from torch import nn

import networks
from networks.export import ExportError, check_onnx, export_onnx, export_program

X = torch.zeros(1, 3, 32, 32)


def test_onnx_round_trip_of_a_pruned_network(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    net = random_prune(networks.build("resnet8_cifar", 3, width=0.25), X, 0.4, 0).eval()
    monkeypatch.chdir(tmp_path)  # a relative path, as a run's folder usually is
    path = export_onnx(net, X, Path("net.onnx"))
    inputs = torch.randn(5, 3, 32, 32)  # another batch size than the export's: dynamic batch
    result = check_onnx(path, net, inputs)
    assert result["max_abs_diff"] <= 1e-4 and result["onnxruntime"]
    # the check can fail: a network with other weights is not what the file computes
    other = random_prune(networks.build("resnet8_cifar", 3, width=0.25), X, 0.4, 0).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    with pytest.raises(ExportError, match="differs from the PyTorch network"):
        check_onnx(path, other, inputs)


class Gate(nn.Module):
    """Data-dependent control flow: no static graph exists."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.ReLU(), Gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))


@pytest.mark.parametrize("export", [export_onnx, export_program])
def test_export_failure_names_the_layer_and_writes_nothing(export, tmp_path: Path) -> None:
    path = tmp_path / "net.out"
    with pytest.raises(ExportError, match=r"export failed in layer body\.1 \(Gate\): .*data-dependent"):
        export(Gated(), X, path)
    assert list(tmp_path.iterdir()) == []
