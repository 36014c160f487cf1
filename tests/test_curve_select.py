"""Acc-vs-speed-up curves (callback, `prune.py curve`) and checkpoint selection (issue 5)."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import networks
import prune
from datamodules import ImageDataModule, ModelZooDataModule
from datamodules.zoo_manifest import widths
from lightning_modules import MetaPruningModule
from metaprune.errors import UserError
from pipeline.curve import CURVE_PAIRS
from pipeline.select import SelectionError

X32 = torch.zeros(1, 3, 32, 32)


def test_curve_area_on_a_known_curve():
    points = [(1.0, 100, 1.0), (2.0, 50, 0.5), (3.0, 33, 0.0)]
    assert networks.curve_area(points, 1.0, 3.0) == pytest.approx(0.5)
    assert networks.curve_area(points, 2.0, 3.0) == pytest.approx(0.25)
    assert networks.curve_area(points, 1.5, 2.5) == pytest.approx(0.5)
    assert networks.curve_area(points, 0.5, 1.0) == pytest.approx(1.0)  # held before the start
    assert networks.curve_area([(s, a) for s, _, a in points], 1.0, 3.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        networks.curve_area(points, 2.0, 2.0)


def test_accuracy_curve_is_monotone_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = networks.build("resnet8_cifar", 3, width=0.5).eval()
    before = widths(model)
    base = networks.count_macs(model, X32)
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 3, (12,))
    evaluate = lambda m: networks.accuracy(m, [(x, y)])  # noqa: E731
    points = networks.accuracy_curve(model, X32, base, evaluate, 2.0, iterative_steps=40)
    speed = [p[0] for p in points]
    assert speed[0] == pytest.approx(1.0) and speed[-1] >= 2.0 > speed[-2]
    assert all(a < b for a, b in zip(speed, speed[1:]))
    assert points[0][2] == evaluate(model)  # the unpruned network
    pruned = copy.deepcopy(model)
    networks.prune_to_speed_up(pruned, X32, 2.0, base, 40)
    assert points[-1][1] == networks.count_macs(pruned, X32) and points[-1][2] == evaluate(pruned)
    assert all(base / p[1] == pytest.approx(p[0]) for p in points)
    assert widths(model) == before
    sparse = networks.accuracy_curve(model, X32, base, evaluate, 2.0, 40, every=3)
    assert sparse[-1][:2] == points[-1][:2] and len(sparse) < len(points)
    # a per-layer cap prunes the curve's copy as prune_to_speed_up with that cap does
    capped = networks.accuracy_curve(model, X32, base, evaluate, 2.0, 40, max_pruning_ratio=0.3)
    networks.prune_to_speed_up(pruned := copy.deepcopy(model), X32, 2.0, base, 40,
                               max_pruning_ratio=0.3)
    assert capped[-1][1] == networks.count_macs(pruned, X32) and capped[-1][2] == evaluate(pruned)
    assert [p[1] for p in capped] != [p[1] for p in points]


def test_curve_command(tiny_cifar, tmp_path, capsys):
    torch.manual_seed(0)
    net = networks.build("resnet8_cifar", 3, width=0.25)
    arch = {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}}
    path = networks.save_network(net, tmp_path / "net.pt", arch)
    assert prune.main(["curve", "--network", str(path), "--data_root", str(tiny_cifar),
                       "--max_speed_up", "1.8", "--iterative_steps", "20",
                       "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "curve.csv").is_file() and (tmp_path / "out" / "curve.png").is_file()
    assert "| speed-up |" in capsys.readouterr().out
    # several networks: one overlay, one curve per label; the same network gives the same curve
    assert prune.main(["curve", "--network", f"[{path}, {path}]", "--labels", "[a, b]",
                       "--data_root", str(tiny_cifar), "--max_speed_up", "1.8",
                       "--iterative_steps", "20", "--out", str(tmp_path / "two")]) == 0
    rows = list(csv.DictReader((tmp_path / "two" / "curve.csv").open()))
    a = [(r["speed_up"], r["accuracy"]) for r in rows if r["curve"] == "a"]
    assert a and a == [(r["speed_up"], r["accuracy"]) for r in rows if r["curve"] == "b"]


def test_curve_command_times_every_point_for_a_latency_curve(tiny_cifar, tmp_path, capsys,
                                                            monkeypatch):
    """--latency_batch B: every point of the MACs curve is timed, in order, alternately with
    the unpruned architecture (CURVE_PAIRS readings each); curve_latency.csv holds the same
    points against the measured speed-up. With a clock proportional to MACs (a deterministic stand-in for
    networks.latency_probe) the latency speed-ups equal the MACs speed-ups point by point."""
    timed_macs: list[int] = []

    def probe(input_size, batch_size=1, device="cpu", min_run_time=0.2, runtime="torch"):
        assert list(input_size) == [3, 32, 32] and batch_size == 4 and runtime == "torch"

        def clock(model) -> float:
            timed_macs.append(networks.count_macs(model, X32))
            return timed_macs[-1] * batch_size / 1e6
        return clock

    monkeypatch.setattr(networks, "latency_probe", probe)
    arch = {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}}
    torch.manual_seed(0)
    path = networks.save_network(networks.build_arch(arch), tmp_path / "net.pt", arch)
    assert prune.main(["curve", "--network", str(path), "--data_root", str(tiny_cifar),
                       "--max_speed_up", "1.8", "--iterative_steps", "20", "--every", "2",
                       "--latency_batch", "4", "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "curve.csv").open()))
    timed = list(csv.DictReader((tmp_path / "out" / "curve_latency.csv").open()))
    assert (tmp_path / "out" / "curve_latency.png").is_file() and len(rows) > 3
    unpruned = networks.count_macs(networks.build_arch(arch), X32)
    assert timed_macs == [m for r in rows for m in [unpruned, int(r["macs"])] * CURVE_PAIRS]
    assert [r["macs"] for r in timed] == [r["macs"] for r in rows]
    assert [r["accuracy"] for r in timed] == [r["accuracy"] for r in rows]
    for r, t in zip(rows, timed):
        assert float(t["latency_speed_up"]) == pytest.approx(float(r["speed_up"]), abs=1e-5)
    assert "latency speed-up |" in capsys.readouterr().out


def _meta_run(root: Path, tiny_cifar: Path, make_zoo, epochs: int, **module) -> Path:
    """A tiny zoo, an ``epochs``-epoch meta-training run (one checkpoint per epoch) and its
    meta.yaml in ``root``."""
    seed_everything(0)
    zoo = make_zoo(root / "zoo")
    images = {"class_path": "datamodules.ImageDataModule",
              "init_args": {"root": str(tiny_cifar), "dataset": "cifar10", "num_classes": 3,
                            "batch_size": 8, "num_workers": 0, "val_fraction": 0.25}}
    data = {"class_path": "datamodules.ModelZooDataModule",
            "init_args": {"zoo": str(zoo), "meta_val_members": 1, "batches_per_step": 2,
                          "batch_size": 4, "images": images}}
    import yaml
    (root / "meta.yaml").write_text(yaml.safe_dump({"data": data}))
    dm = ModelZooDataModule(str(zoo), ImageDataModule(**images["init_args"]), 1, 2, 4)
    ckpt = ModelCheckpoint(dirpath=root / "run" / "checkpoints", save_top_k=-1, save_last=True,
                           every_n_epochs=1, filename="epoch{epoch:03d}",
                           auto_insert_metric_name=False)
    Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[ckpt], logger=False,
            enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root).fit(MetaPruningModule(num_layers=2, hidden=8, lr=0.05, **module), dm)
    return root


@pytest.fixture(scope="module")
def meta_run(tiny_cifar, tmp_path_factory, make_zoo):
    return _meta_run(tmp_path_factory.mktemp("select"), tiny_cifar, make_zoo, 3)


@pytest.fixture(scope="module")
def weights_meta_run(tiny_cifar, tmp_path_factory, make_zoo):
    """Two checkpoints of a metanetwork meta-trained for weight sparsity."""
    return _meta_run(tmp_path_factory.mktemp("select_weights"), tiny_cifar, make_zoo, 2,
                     sparsity="weights")


def _select(root: Path, *extra: str) -> int:
    return prune.main(["select", "--config", str(root / "meta.yaml"), "--run", str(root / "run"),
                       "--finetune_steps", "2", "--speed_up_range", "[1.5, 2.5]",
                       "--iterative_steps", "20", *extra])


def test_select_writes_table_plot_and_the_best_checkpoint(meta_run, capsys):
    assert _select(meta_run) == 0
    out = meta_run / "run" / "selection"
    rows = list(csv.DictReader((out / "selection.csv").open()))
    names = [r["checkpoint"] for r in rows]
    assert names == ["none (identity)"] + [f"checkpoints/epoch00{i}.ckpt" for i in range(3)]
    # each score is the mean over members of its curves' mean accuracy over 1.5-2.5x, here by
    # dense sampling of the piecewise-linear curves in selection_curves.csv
    curves: dict[str, list] = {}
    for r in csv.DictReader((out / "selection_curves.csv").open()):
        curves.setdefault(r["curve"], []).append((float(r["speed_up"]), float(r["accuracy"])))
    grid = np.linspace(1.5, 2.5, 20001)
    for r in rows:
        mine = [sorted(c) for name, c in curves.items() if name.startswith(r["checkpoint"] + " ")]
        sampled = [np.interp(grid, *zip(*c)).mean() for c in mine]
        assert mine and float(r["score"]) == pytest.approx(np.mean(sampled), abs=1e-4)
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 1 and float(best[0]["score"]) == max(
        float(r["score"]) for r in rows if r["path"])
    assert (out / "best.ckpt").read_bytes() == Path(best[0]["path"]).read_bytes()
    # selection.json sets the best against the identity row, and says when it is not above it
    verdict = json.loads((out / "selection.json").read_text())
    identity = float(rows[0]["score"])
    assert verdict["checkpoint"] == best[0]["checkpoint"]
    assert verdict["identity_score"] == pytest.approx(identity)
    assert verdict["beats_identity"] == (float(best[0]["score"]) > identity)
    captured = capsys.readouterr()
    assert ("WARNING: no checkpoint scores above the identity" in captured.err) == (
        not verdict["beats_identity"])
    assert (out / "selection.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "selection_curves.csv").is_file()
    printed = captured.out
    assert "| checkpoint | score |" in printed and "**best**" in printed
    # a second run does not take the previous best.ckpt for a candidate; N picks evenly spaced
    assert _select(meta_run, "--checkpoints", "2") == 0
    rows = list(csv.DictReader((out / "selection.csv").open()))
    assert [r["checkpoint"] for r in rows][1:] == ["checkpoints/epoch000.ckpt",
                                                   "checkpoints/epoch002.ckpt"]


def test_select_names_a_missing_or_corrupt_checkpoint(meta_run, tmp_path):
    with pytest.raises(networks.CheckpointError, match="nope.ckpt.*does not exist"):
        _select(meta_run, "--checkpoints", "checkpoints/nope.ckpt", "--out", str(tmp_path))
    bad = meta_run / "run" / "checkpoints" / "epoch099.ckpt"
    bad.write_bytes(b"not a zip file")
    try:
        with pytest.raises(networks.CheckpointError, match="epoch099.ckpt"):
            _select(meta_run, "--out", str(tmp_path))
    finally:
        bad.unlink()
    assert not (tmp_path / "best.ckpt").exists()


def test_every_data_command_reads_the_data_root_from_the_environment(monkeypatch, tmp_path) -> None:
    from pipeline.cli import parse
    from pipeline.options import RunRequest

    monkeypatch.setenv("METAPRUNE_DATA", str(tmp_path))
    for argv in (["curve", "--network", "n.pt"], ["run", "--config", "c.yaml", "--network", "n.pt"],
                 ["zoo", "--config", "c.yaml"], ["select", "--config", "c.yaml", "--run", "r"]):
        assert parse(argv)[1].data_root == str(tmp_path)
    # only the command line reads it: a Python caller's request keeps the config's data
    assert RunRequest("c.yaml", network="n.pt").data_root is None
    monkeypatch.delenv("METAPRUNE_DATA")
    with pytest.raises(UserError, match="--data_root PATH or set"):  # curve needs data
        parse(["curve", "--network", "n.pt"])
    assert parse(["run", "--config", "c", "--network", "n"])[1].data_root is None


def test_select_scores_a_weights_metanetwork_on_weight_sparsity_curves(weights_meta_run):
    assert _select(weights_meta_run, "--sparsity_range", "[0.2, 0.6]", "--sparsity_step", "0.2") == 0
    out = weights_meta_run / "run" / "selection"
    rows = list(csv.DictReader((out / "selection.csv").open()))
    assert [r["checkpoint"] for r in rows] == ["none (identity)", "checkpoints/epoch000.ckpt",
                                                "checkpoints/epoch001.ckpt"]
    curves: dict[str, list] = {}
    for r in csv.DictReader((out / "selection_curves.csv").open()):
        curves.setdefault(r["curve"], []).append(
            (float(r["weight_sparsity"]), int(r["nonzero_weights"]), float(r["accuracy"])))
    for name, points in curves.items():
        # the member as it is, then the levels 0.2, 0.4, 0.6 counted on the pruned copies (to
        # whole weights): fewer non-zero weights at each
        assert [round(p[0], 2) for p in points] == [0.0, 0.2, 0.4, 0.6], name
        assert [p[1] for p in points] == sorted((p[1] for p in points), reverse=True)
    grid = np.linspace(0.2, 0.6, 20001)
    for r in rows:  # the score: members' mean accuracy over weight sparsity 0.2-0.6
        mine = [c for name, c in curves.items() if name.startswith(r["checkpoint"] + " ")]
        sampled = [np.interp(grid, [p[0] for p in c], [p[2] for p in c]).mean() for c in mine]
        assert mine and float(r["score"]) == pytest.approx(np.mean(sampled), abs=1e-4)


def test_select_refuses_checkpoints_meta_trained_for_channels_and_for_weights(
        meta_run, weights_meta_run, tmp_path):
    mixed = tmp_path / "run"
    mixed.mkdir()
    for run in (meta_run, weights_meta_run):
        (mixed / f"{run.name}.ckpt").write_bytes(
            (run / "run" / "checkpoints" / "epoch000.ckpt").read_bytes())
    with pytest.raises(SelectionError, match="different pruning targets"):
        prune.main(["select", "--config", str(meta_run / "meta.yaml"), "--run", str(mixed)])
