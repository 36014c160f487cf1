"""`prune.py run`: bad input (missing, truncated or swapped files, layouts, unsupported
networks, unreachable or double targets, a metanetwork of another kind) is refused before
anything trains or is written, and a failed run never overwrites earlier outputs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from pruning_helpers import QUICK_WITH_PROGRAM, _expect

import networks
import prune
from lightning_modules import MetaPruningModule

pytestmark = pytest.mark.usefixtures("cli_argv")


def test_reuse_first_stage_only_from_a_run_that_differs_in_the_target(
        runs: dict[str, Path], setup: dict, tmp_path: Path) -> None:
    _expect(setup, tmp_path, r"--reuse_first_stage .*differs in method.*only the speed-up target",
            method="sparse", meta=None, extra=("--reuse_first_stage", str(runs["none"])))
    _expect(setup, tmp_path, r"differs in config\.finetune\.trainer\.max_epochs\)", method="none",
            meta=None, extra=("--reuse_first_stage", str(runs["none"]),
                              "--finetune.trainer.max_epochs", "7"))
    _expect(setup, tmp_path, r"is not a prune run directory", method="none", meta=None,
            extra=("--reuse_first_stage", str(tmp_path)))


def test_speed_up_not_above_current(setup: dict, tmp_path: Path) -> None:
    _expect(setup, tmp_path, r"not above the network's current speed-up .*pass a --speed_up above",
            extra=("--speed_up", "1.01"))


def test_speed_up_unreachable(setup: dict, tmp_path: Path) -> None:
    _expect(setup, tmp_path, r"speed-up target 1000x is unreachable .*Lower --speed_up",
            extra=("--speed_up", "1000"))


def test_layout_mismatch_names_both_layouts_and_files(setup: dict, tmp_path: Path) -> None:
    vgg_like = {"node_dim": 5, "edge_types": [9], "bn_slots": 1, "bias_slots": 1}
    module = MetaPruningModule(num_layers=1, hidden=8, layout=vgg_like)
    ckpt = tmp_path / "vgg_meta.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, ckpt)
    _expect(setup, tmp_path, r"vgg_meta\.ckpt.* graph layout \{'node_dim': 5.*net\.pt.* has graph "
            r"layout \{'node_dim': 9.*meta-trained on a zoo", meta=ckpt)


def test_missing_and_corrupt_files(setup: dict, tmp_path: Path) -> None:
    _expect(setup, tmp_path, r"network file .*nope\.pt' does not exist", network=tmp_path / "nope.pt")
    _expect(setup, tmp_path, r"metanetwork checkpoint .*nope\.ckpt' does not exist",
            meta=tmp_path / "nope.ckpt")
    _expect(setup, tmp_path, r"--method metanetwork needs --metanetwork", meta=None)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(setup["network"].read_bytes()[:300])  # truncated
    _expect(setup, tmp_path, r"network file .*bad\.pt' is truncated", network=bad)
    _expect(setup, tmp_path, r"metanetwork checkpoint .*bad\.pt' is truncated", meta=bad)


def test_a_metanetwork_meta_trained_for_weight_sparsity_is_refused(setup: dict, tmp_path: Path) -> None:
    ckpt = torch.load(setup["meta"], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["sparsity"] = "weights"
    path = tmp_path / "weights_meta.ckpt"
    torch.save(ckpt, path)
    _expect(setup, tmp_path, r"weights_meta.ckpt' was meta-trained for weight sparsity.*prunes "
            "channels", meta=path)


def test_swapped_network_and_metanetwork(setup: dict, tmp_path: Path) -> None:
    _expect(setup, tmp_path, r"meta\.ckpt' is not a target-network file.*not a metanetwork",
            network=setup["meta"])
    _expect(setup, tmp_path, r"net\.pt' is a target-network file.*Pass it as --network",
            meta=setup["network"])


def test_unsupported_network(setup: dict, tmp_path: Path) -> None:
    from pruning_helpers import PReLUNet

    from graph import UnsupportedArchitectureError

    arch = {"name": "pruning_helpers:PReLUNet", "num_classes": 3, "kwargs": {}}
    path = networks.save_network(PReLUNet(3), tmp_path / "prelu.pt", arch)
    _expect(setup, tmp_path, r"prelu\.pt' cannot be encoded as a graph.*--method none",
            network=path, error=UnsupportedArchitectureError)


def test_failed_run_never_overwrites_earlier_outputs(runs: dict[str, Path], setup: dict,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = runs["sparse"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
            "--method", "sparse", "--out", str(out), *QUICK_WITH_PROGRAM]  # as the run was made
    assert prune.cli(argv + ["--speed_up", "1.8"]) == 2  # other settings, same directory
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "holds a run with other settings" in message
    assert "speed_up); pass another --out, or delete the directory" in message
    assert prune.cli(argv + ["--speed_up", "1000", "--out", str(out.parent / "x")]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_two_targets_and_a_metanetwork_of_the_other_kind_are_refused_in_one_line(
        setup: dict, weight_runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before anything trains or is written: two targets (on the command line, or in the
    config beside none given there), a bad N:M, a metanetwork meta-trained for the other kind
    (both ways), a weight target not above the network's own sparsity, an unknown layer to
    keep dense."""
    out = tmp_path / "run"
    base = ["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
            "--out", str(out)]
    cases = [
        (["--method", "none", "--speed_up", "2", "--weight_sparsity", "0.5"],
         "--speed_up and --weight_sparsity are two targets; a run has one"),
        (["--method", "none", "--weight_sparsity", "0.5", "--nm", "[2,4]"],
         "--weight_sparsity and --nm are two targets"),
        (["--method", "none", "--prune.weight_sparsity", "0.5"],
         "prune.speed_up 1.6 and prune.weight_sparsity 0.5 are two targets; a run has one"),
        (["--method", "none", "--nm", "[4,2]"], r"--nm \[4, 2\]: N:M sparsity .* 0 < N < M"),
        (["--method", "none", "--prune.nm", "[4,2]", "--prune.speed_up", "null"],
         r"prune.nm \[4, 2\]: N:M sparsity"),
        (["--method", "none", "--weight_sparsity", "1.5"], "--weight_sparsity 1.5: Not of type"),
        (["--method", "metanetwork", "--metanetwork", str(setup["meta"]), "--weight_sparsity",
          "0.5"], r"meta\.ckpt' was meta-trained for channel pruning .*this run zeroes weights "
                  r"\(weight sparsity 0.5 \(global\)\); use a metanetwork meta-trained with "
                  "sparsity: weights"),
        (["--method", "metanetwork", "--metanetwork", str(weight_runs["meta"])],
         r"weights_meta\.ckpt' was meta-trained for weight sparsity .*this run prunes channels "
         r"\(a speed-up target, 1.6x\); pass --weight_sparsity S or --nm \[N,M\]"),
        (["--method", "none", "--prune.sparsity_exclude", "[head]", "--weight_sparsity", "0.5"],
         r"prune.sparsity_exclude \['head'\]: network file .*net\.pt' has no module named 'head'"),
    ]
    for extra, message in cases:
        assert prune.cli([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("prune.py: error: "), err
        assert re.search(message, err), (message, err)
    sparse_input = str(weight_runs["none"] / "network.pt")  # 0.6 of its weights are zero
    assert prune.cli([*base[:4], sparse_input, "--out", str(out), "--method", "none",
                      "--weight_sparsity", "0.5"]) == 2
    reached = json.loads((weight_runs["none"] / "report.json").read_text())["weight_sparsity"]["reached"]
    assert "weight sparsity target 0.5 is not above the network's current weight sparsity " \
        f"{reached:.4f}" in capsys.readouterr().err
    assert not out.exists()
