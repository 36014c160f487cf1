"""A metanetwork applied to an architecture it was not meta-trained on (another depth, width,
class count or family): allowed where the graph layouts match, said on the console and
recorded in report.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pruning_helpers import ARCH, QUICK, X32, random_prune, run

import networks
from datamodules.zoo_manifest import read_manifest
from lightning_modules import trained_architectures
from pipeline import run as pipeline_run
from pipeline import run_stages
from pipeline.run_config import load_prune_config

pytestmark = pytest.mark.usefixtures("cli_argv")
WIDER = {**ARCH, "kwargs": {"width": 0.5}}


def _network(path: Path, arch: dict) -> Path:
    torch.manual_seed(1)
    model = random_prune(networks.build_arch(arch), X32, 0.1, 1)
    return networks.save_network(model, path, arch)


def test_a_checkpoint_records_the_architectures_it_was_meta_trained_on(setup: dict) -> None:
    """Oracle: the architecture of the tiny zoo's members (its manifest rows)."""
    rows = read_manifest(setup["out"] / "meta_zoo")["members"]
    assert trained_architectures(setup["meta"]) == networks.distinct_architectures(
        row["architecture"] for row in rows) == [networks.plain_arch(ARCH)]


LINE = ("transfer: the metanetwork was meta-trained on resnet8_cifar (width=0.25), 3 classes "
        "and is applied to resnet8_cifar (width=0.5), 3 classes")


class _Stop(Exception):
    pass


def test_a_run_on_another_width_says_so_before_anything_trains(
        setup: dict, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same architecture is no transfer (and its report has no such key, as before); another
    width is, named on the console right after the input checks."""
    cfg = load_prune_config(setup["config"])
    assert run_stages.check_inputs(cfg, str(setup["network"]), str(setup["meta"]))["transfer"] is None
    assert "transfer" not in json.loads((runs["metanetwork"] / "report.json").read_text())

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(pipeline_run, "stage_configs", stop)
    with pytest.raises(_Stop):
        run(setup["config"], _network(tmp_path / "wider.pt", WIDER), "metanetwork",
            tmp_path / "run", setup["meta"], *QUICK)
    assert LINE in capsys.readouterr().err


@pytest.mark.slow  # a whole run (about 15 s alone)
def test_a_transfer_run_records_it_in_its_report(setup: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert run(setup["config"], _network(tmp_path / "wider.pt", WIDER), "metanetwork", out,
               setup["meta"], *QUICK) == 0
    assert LINE in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["transfer"] == {"trained_on": [networks.plain_arch(ARCH)],
                                  "applied_to": networks.plain_arch(WIDER)}
