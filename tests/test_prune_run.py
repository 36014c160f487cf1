"""`prune.py run` (issue 5): each method end to end on a tiny network, outputs checked against
independent oracles, bad input stopped before training, reruns recompute nothing."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from benchmark_helpers import benchmark_module
from lightning.pytorch import Trainer, seed_everything
from pruning_helpers import plain_accuracy, random_prune, tiny_prune_config
from torch import nn

import networks
import networks.export
import prune
from datamodules import ImageDataModule
from datamodules.zoo_manifest import widths
from lightning_modules import MetaPruningModule
from metaprune.errors import UserError
from pipeline import run as pipeline_run
from pipeline import run_stages

pytestmark = pytest.mark.usefixtures("cli_argv")
ARCH = {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}}
X32 = torch.zeros(1, 3, 32, 32)
TARGET = 1.6
STEPS = 40


def tiny_config(root: Path, out: Path) -> Path:
    """The demo prune.yaml shrunk to seconds: 3 classes, 2 batches per stage."""
    return tiny_prune_config(root, out, TARGET, STEPS)


def zoo_like_network(path: Path, seed: int = 0) -> Path:
    """A quarter-width ResNet-8 with some channels pruned already (as zoo members are)."""
    torch.manual_seed(seed)
    model = random_prune(networks.build(ARCH["name"], 3, **ARCH["kwargs"]), X32, 0.1, seed)
    return networks.save_network(model, path, ARCH)


def meta_checkpoint(tiny_cifar: Path, out: Path, make_zoo, name: str = "meta", **module) -> Path:
    """A real MetaPruningModule checkpoint: one meta-training step on a tiny zoo (``module``:
    more MetaPruningModule arguments, e.g. sparsity="weights")."""
    from datamodules import ImageDataModule, ModelZooDataModule

    seed_everything(0)
    zoo = make_zoo(out / f"{name}_zoo")
    images = ImageDataModule(str(tiny_cifar), dataset="cifar10", num_classes=3, batch_size=8,
                             num_workers=0, val_fraction=0.25)
    data = ModelZooDataModule(str(zoo), images, meta_val_members=1, batches_per_step=1, batch_size=4)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, default_root_dir=out)
    trainer.fit(MetaPruningModule(num_layers=1, hidden=8, node_res_ratio=0.1, edge_res_ratio=0.1,
                                  **module), data)
    path = out / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


def run(config: Path, network: Path, method: str, out: Path, meta: Path | None = None,
        *extra: str) -> int:
    argv = ["run", "--config", str(config), "--network", str(network), "--method", method,
            "--out", str(out), *extra]
    return prune.main(argv + (["--metanetwork", str(meta)] if meta else []))


@pytest.fixture(scope="module")
def setup(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory, make_zoo) -> dict:
    out = tmp_path_factory.mktemp("prune_run")
    return {"config": tiny_config(tiny_cifar, out), "network": zoo_like_network(out / "net.pt"),
            "meta": meta_checkpoint(tiny_cifar, out, make_zoo), "out": out}


@pytest.fixture(scope="module")
def runs(setup: dict) -> dict[str, Path]:
    """One finished run per method."""
    argv, sys.argv = sys.argv, ["prune.py"]
    try:
        dirs = {}
        for method in pipeline_run.METHODS:
            dirs[method] = setup["out"] / method
            assert run(setup["config"], setup["network"], method, dirs[method], setup["meta"]) == 0
        return dirs
    finally:
        sys.argv = argv


# ---- each method end to end -------------------------------------------------------------------
@pytest.mark.parametrize("method", pipeline_run.METHODS)
def test_method_runs_end_to_end(setup: dict, runs: dict[str, Path], method: str) -> None:
    out = runs[method]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["format"] == "metaprune.prune_run/v1"
    assert report["speed_up"]["target"] == TARGET <= report["speed_up"]["reached"]
    assert report["speed_up"]["before"] > 1.0  # the zoo-like initial prune counts
    assert report["macs"]["after"] < report["macs"]["before"] < report["macs"]["unpruned"]
    assert report["params"]["after"] < report["params"]["before"]
    acc = report["accuracy"]
    data = ImageDataModule(**yaml.safe_load(setup["config"].read_text())["base"]["data"]["init_args"])
    data.setup("validate")
    data.setup("test")
    for stage in ("original", "finetuned", "pruned", "final"):  # against a plain loop
        net = networks.load_network(report["files"]["stages"][stage])[0]
        assert acc[stage]["val"] == pytest.approx(plain_accuracy(net, data.val_dataloader())), stage
        assert acc[stage]["test"] == pytest.approx(plain_accuracy(net, data.test_dataloader())), stage
    assert (acc["feedforward"] is None) == (method != "metanetwork")
    assert report["seeds"]["seed_everything"] == 0
    stages = report["config"]["stages"]
    assert list(stages) == [pipeline_run.FIRST_STAGE[method], pipeline_run.SECOND_STAGE]
    first = stages[pipeline_run.FIRST_STAGE[method]]
    assert first["trainer"]["max_epochs"] == stages[pipeline_run.SECOND_STAGE]["trainer"]["max_epochs"]
    classes = [c["class_path"] for c in first["trainer"]["callbacks"]]
    expected = {"metanetwork": "callbacks.MetanetworkFeedforward",
                "sparse": "callbacks.SparseTraining"}.get(method)
    assert (expected in classes) if expected else not any("Sparse" in c or "Metanetwork" in c
                                                          for c in classes)
    for stage in stages:  # ordinary Lightning runs: TensorBoard logs and checkpoints
        assert list((out / stage).glob("events.out.tfevents.*")), stage
        assert (out / stage / "checkpoints" / "last.ckpt").is_file(), stage
    for name in ("network.pt", "network.pt2", "curve.png", "report.json", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".*"))


@pytest.mark.parametrize("method", pipeline_run.METHODS)
def test_stage1_curve_starts_at_the_stage1_network_and_its_area_is_reported(
        setup: dict, runs: dict[str, Path], method: str) -> None:
    from pipeline.curve import read_curves

    report = json.loads((runs[method] / "report.json").read_text())
    first = runs[method] / pipeline_run.FIRST_STAGE[method]
    (points,) = read_curves(first / "curve.csv").values()
    network = networks.load_network(first / "network.pt")[0]
    assert points[0][1] == networks.count_macs(network, X32)  # the curve starts unpruned
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    curve = report["stage1_curve"]
    assert curve["range"] == [2.0, 3.0] and curve["bn_batches"] == 8 and curve["split"] == "test"
    # the first point is the unpruned stage-1 network on the *test* images (the area is an
    # outcome; val images select things), after BN re-estimation on the training batches
    data = ImageDataModule(**yaml.safe_load(setup["config"].read_text())["base"]["data"]["init_args"])
    data.setup("validate")
    data.setup("test")
    calibrated = networks.recalibrate_batchnorm(
        copy.deepcopy(network), networks.calibration_batches(data.train_set, 8, 128))
    assert points[0][2] == pytest.approx(plain_accuracy(calibrated, data.test_dataloader()), abs=1e-5)
    assert curve["area"] == pytest.approx(networks.curve_area(points, 2.0, 3.0), abs=1e-5)  # csv: 6 digits
    assert (first / "curve.png").is_file()


def test_metanetwork_changed_the_weights(runs: dict[str, Path], setup: dict) -> None:
    first = runs["metanetwork"] / pipeline_run.FIRST_STAGE["metanetwork"]
    fed, _ = networks.load_network(first / "feedforward.pt")
    original, _ = networks.load_network(setup["network"])
    assert widths(fed) == widths(original)
    diff = [k for k, v in fed.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert any(k.endswith("conv1.weight") for k in diff)
    assert not any("running" in k for k in diff)  # BN statistics pass through unchanged
    # oracle: decode(M(encode(W))) computed here from the checkpoint, by the graph API directly
    from graph import NetworkGraph
    meta = MetaPruningModule.load_from_checkpoint(setup["meta"], weights_only=True).metanetwork
    graph = NetworkGraph.from_module(original.eval(), X32)
    with torch.no_grad():
        expected = graph.decode(meta.eval()(graph.encode(original)))
    for k, v in expected.items():
        torch.testing.assert_close(fed.state_dict()[k], v, rtol=0, atol=0)


def test_sparse_training_adds_the_group_regularizer_before_the_step(setup: dict) -> None:
    from callbacks import SparseTraining
    from lightning_modules import ImageClassifier

    module = ImageClassifier(ARCH["name"], 3, weights=str(setup["network"]))
    callback = SparseTraining(reg=0.5, alpha=4.0, input_size=[3, 32, 32])
    callback.on_fit_start(None, module)
    assert module.network.training  # mode restored after tracing
    for p in module.network.parameters():
        p.grad = torch.zeros_like(p)
    callback.on_before_optimizer_step(None, module, None)
    reference = networks.load_network(setup["network"])[0]
    for p in reference.parameters():
        p.grad = torch.zeros_like(p)
    networks.criterion_pruner(reference.eval(), X32, reg=0.5, alpha=4.0).regularize(
        reference, alpha=4.0, bias=False)
    got = dict(module.network.named_parameters())
    assert any(p.grad.abs().sum() > 0 for p in reference.parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=0, atol=0)


def _shape_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(conv + linear MACs, total in torch_pruning's convention), from layer shapes.

    Conv: output elements x (in_channels / groups) x kernel area (+ output elements for a bias);
    Linear: in x out (+ out). torch_pruning's counter adds 2 per BN output element (affine),
    1 per ReLU output element and 1 per input element of average pooling."""
    core, extra = 0, 0

    def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal core, extra
        if isinstance(m, nn.Conv2d):
            core += output.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            extra += output.numel() if m.bias is not None else 0
        elif isinstance(m, nn.Linear):
            core += m.in_features * m.out_features
            extra += m.out_features if m.bias is not None else 0
        elif isinstance(m, nn.BatchNorm2d):
            extra += 2 * output.numel()
        elif isinstance(m, nn.ReLU):
            extra += output.numel()
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            extra += inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(example)
    for h in handles:
        h.remove()
    return core, core + extra


@pytest.mark.parametrize("method", pipeline_run.METHODS)
def test_report_macs_match_layer_shapes_and_target_is_reached_by_the_smallest_step(
        runs: dict[str, Path], method: str) -> None:
    out = runs[method]
    report = json.loads((out / "report.json").read_text())
    final, record = networks.load_network(out / "network.pt")  # weights_only=True inside
    unpruned = networks.build(ARCH["name"], 3, **ARCH["kwargs"])
    core, total = _shape_macs(final, X32)
    assert report["macs"]["after"] == total == networks.count_macs(final, X32)
    assert report["macs"]["unpruned"] == _shape_macs(unpruned, X32)[1]
    assert report["params"]["after"] == sum(p.numel() for p in final.parameters())
    assert report["speed_up"]["reached"] == pytest.approx(report["macs"]["unpruned"] / total)
    assert core < total  # the convention adds BN/ReLU/pool work on top of conv+linear

    # Oracle: the plain step-by-step loop (MAC count after every step) on the stage-1 network
    # stops at the same widths; one step less is below the target.
    start, _ = networks.load_network(out / pipeline_run.FIRST_STAGE[method] / "network.pt")
    pruner = networks.criterion_pruner(start.eval(), X32, STEPS)
    speed_ups = []
    for _ in range(STEPS):
        pruner.step()
        speed_ups.append(report["macs"]["unpruned"] / networks.count_macs(start, X32))
        if speed_ups[-1] >= TARGET:
            break
    assert speed_ups[-1] == pytest.approx(report["speed_up"]["reached"])
    assert len(speed_ups) == 1 or speed_ups[-2] < TARGET
    assert widths(start) == widths(final)
    assert record["metadata"]["method"] == method


EXPORT_CHECK = r"""
import sys
for name in ("networks", "graph", "callbacks", "lightning_modules", "datamodules", "prune",
             "pipeline", "train", "lightning", "torch_pruning", "torch_geometric"):
    sys.modules[name] = None  # importing any of them now raises ImportError
import torch
program = torch.export.load(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=True)
torch.save([program.module()(x) for x in inputs], sys.argv[3])
"""


def test_exported_program_runs_without_the_project(runs: dict[str, Path], tmp_path: Path) -> None:
    out = runs["metanetwork"]
    network, _ = networks.load_network(out / "network.pt")
    torch.manual_seed(0)
    inputs = [torch.randn(1, 3, 32, 32), torch.randn(5, 3, 32, 32)]
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "check.py"
    script.write_text(EXPORT_CHECK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", str(script), str(out / "network.pt2"),
                    str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
                   cwd=tmp_path, env=env, check=True, timeout=120)
    got = torch.load(tmp_path / "outputs.pt", weights_only=True)
    with torch.no_grad():
        for x, y in zip(inputs, got):
            torch.testing.assert_close(y, network.eval()(x), rtol=1e-5, atol=1e-5)


def test_rerunning_a_finished_run_recomputes_nothing(runs: dict[str, Path], setup: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = runs["none"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(run_stages, "fit_stage", fail)
    for name in ("evaluate_networks", "check_inputs", "measured_latency", "export_checked_onnx"):
        monkeypatch.setattr(pipeline_run, name, fail)
    for name in ("export_program", "export_onnx"):
        monkeypatch.setattr(networks.export, name, fail)
    assert run(setup["config"], setup["network"], "none", out) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_killed_run_resumes_without_redoing_finished_stages(runs: dict[str, Path], setup: dict,
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 done, export missing (killed after stage 2): only evaluation/export/report run."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["none"], out)
    for name in ("report.json", "network.pt2", "curve.png"):
        (out / name).unlink()
    (out / "run.json").write_text((runs["none"] / "run.json").read_text())
    monkeypatch.setattr(run_stages, "fit_stage", lambda *a, **k: pytest.fail("a stage was refit"))
    assert run(setup["config"], setup["network"], "none", out) == 0
    assert json.loads((out / "report.json").read_text())["accuracy"] == \
        json.loads((runs["none"] / "report.json").read_text())["accuracy"]
    assert (out / "network.pt2").is_file() and (out / "curve.png").is_file()


def test_stage2_typo_fails_before_stage1_and_the_fix_reuses_stage1(
        runs: dict[str, Path], setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelled key in `final:` is refused before anything trains or is written, naming the
    file, the section and the key; after stage 1 finished, a changed `final:` keeps stage 1."""
    import shutil

    cfg = yaml.safe_load(setup["config"].read_text())
    bad = copy.deepcopy(cfg)
    bad["final"]["trainer"]["max_epoch"] = 1  # typo of max_epochs
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(bad))
    trained = []
    monkeypatch.setattr(run_stages, "fit_stage", lambda *a, **k: trained.append(a))
    with pytest.raises(pipeline_run.PruneRunError,
                       match=rf"prune config '{config}', section 'final'.*'max_epoch'"):
        run(config, setup["network"], "none", tmp_path / "typo")
    assert not trained and not (tmp_path / "typo").exists()
    bad = copy.deepcopy(cfg)
    bad["final"]["model"]["init_args"]["lrr"] = 0.1
    config.write_text(yaml.safe_dump(bad))
    with pytest.raises(pipeline_run.PruneRunError, match=r"section 'final'.*model.*'lrr'"):
        run(config, setup["network"], "none", tmp_path / "typo")
    assert not trained

    # stage 1 finished (copied from a finished run minus its stage 2), then 'final' changes
    out = tmp_path / "changed"
    shutil.copytree(runs["none"], out)
    shutil.rmtree(out / pipeline_run.SECOND_STAGE / "checkpoints")
    (out / pipeline_run.SECOND_STAGE / "network.pt").unlink()
    for name in ("report.json", "network.pt", "network.pt2", "eval.json"):
        (out / name).unlink()
    changed = copy.deepcopy(cfg)
    changed["final"]["model"]["init_args"]["lr"] = 0.02
    config.write_text(yaml.safe_dump(changed))
    stages = []

    def run_stage(config: dict, output: Path, name: str) -> Path:
        stages.append((name, output.is_file()))
        if name == pipeline_run.SECOND_STAGE:
            pytest.fail("stop after the stages were chosen")
        return output

    monkeypatch.setattr(pipeline_run, "run_stage", run_stage)
    with pytest.raises(pytest.fail.Exception, match="stop after"):
        run(config, setup["network"], "none", out)
    assert stages == [("finetune", True), (pipeline_run.SECOND_STAGE, False)]  # stage 1 kept
    assert (out / f"{pipeline_run.SECOND_STAGE}.superseded-1").is_dir()  # moved aside, not deleted
    stored = json.loads((out / "run.json").read_text())
    assert stored["config"]["final"]["model"]["init_args"]["lr"] == 0.02


# ---- bad input stops early ----------------------------------------------------------------------
def _expect(setup: dict, tmp_path: Path, match: str, network: Path | None = None,
            meta: Path | None | str = "default", method: str = "metanetwork",
            extra: tuple[str, ...] = (), error: type = ValueError) -> None:
    out = tmp_path / "run"
    meta = setup["meta"] if meta == "default" else meta
    with pytest.raises(error, match=match):
        run(setup["config"], network or setup["network"], method, out, meta, *extra)
    assert not out.exists()  # nothing written before the inputs were checked


def test_a_capped_run_reuses_stage_1_and_prunes_within_the_cap(
        runs: dict[str, Path], setup: dict, tmp_path: Path) -> None:
    """prune.max_pruning_ratio changes stage 2 only: stage 1 comes from an uncapped run, and
    stage 2 prunes it as the capped criterion does (networks.prune_to_speed_up)."""
    cfg = yaml.safe_load(setup["config"].read_text())
    cfg["prune"]["max_pruning_ratio"] = 0.1
    config = tmp_path / "capped.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "capped"
    assert run(config, setup["network"], "none", out, None,
               "--reuse_first_stage", str(runs["none"])) == 0
    first = pipeline_run.FIRST_STAGE["none"]
    assert (out / first / "network.pt").read_bytes() == (runs["none"] / first / "network.pt").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["prune"]["max_pruning_ratio"] == 0.1

    def widths(net: torch.nn.Module) -> list[int]:
        return [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]

    expected = networks.load_network(out / first / "network.pt")[0].eval()
    base = networks.base_macs(ARCH, X32)
    networks.prune_to_speed_up(expected, X32, TARGET, base, STEPS, max_pruning_ratio=0.1)
    capped = widths(networks.load_network(out / "network.pt")[0])
    assert capped == widths(expected) != widths(networks.load_network(runs["none"] / "network.pt")[0])
    # the stage-1 curve prunes too: recomputed under the cap, not copied
    assert (out / first / "curve.csv").read_text() != (runs["none"] / first / "curve.csv").read_text()
    cfg["prune"]["max_pruning_ratio"] = 1.5
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_run.PruneRunError, match=r"prune.max_pruning_ratio 1.5: Not of "
                                                         r"type PruningCap: does not conform"):
        run(config, setup["network"], "none", tmp_path / "bad", None)
    cfg["prune"].update(max_pruning_ratio=0.5, stage1_curve_split="train")
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_run.PruneRunError, match=r"prune.stage1_curve_split train: Expected a "
                                                         r"typing.Literal\['test', 'val'\]"):
        run(config, setup["network"], "none", tmp_path / "bad", None)
    assert not (tmp_path / "bad").exists()


def test_quality_rerun_redoes_a_benchmark_run_under_a_cap_from_its_stored_settings(
        runs: dict[str, Path], tmp_path: Path) -> None:
    """benchmarks/quality.py rerun: the stored run.json becomes a prune.yaml that reproduces the
    run's settings but the cap, so stage 1 is reused (not retrained) and only the cap differs."""
    import shutil

    quality = benchmark_module("quality")
    source = tmp_path / "bench" / "seed0" / "2x" / "none"
    shutil.copytree(runs["none"], source)
    assert quality.main(["rerun", "--runs", str(tmp_path / "bench"), "--max_pruning_ratio", "0.1",
                         "--methods", "[none]", "--out", str(tmp_path / "capped")]) == 0
    out = tmp_path / "capped" / "prune" / "seed0" / "2x" / "none"
    before, after = (json.loads((d / "run.json").read_text()) for d in (source, out))
    assert after["config"]["prune"].pop("max_pruning_ratio") == 0.1
    assert after == before
    first = pipeline_run.FIRST_STAGE["none"]
    assert (out / first / "network.pt").read_bytes() == (source / first / "network.pt").read_bytes()
    assert not (out / first / "checkpoints").exists()  # reused, not trained again
    assert json.loads((out / "report.json").read_text())["config"]["prune"]["max_pruning_ratio"] == 0.1


def test_reuse_first_stage_only_from_a_run_that_differs_in_the_target(
        runs: dict[str, Path], setup: dict, tmp_path: Path) -> None:
    _expect(setup, tmp_path, r"--reuse_first_stage .*differs in method.*only the speed-up target",
            method="sparse", meta=None, extra=("--reuse_first_stage", str(runs["none"])))
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


def test_unsupported_network(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import swin_transformer

    from graph import NetworkGraph, UnsupportedArchitectureError, handlers

    # every torchvision classifier is encoded; without its attention handler Swin is not
    monkeypatch.delitem(handlers._MODULE_HANDLERS, swin_transformer.ShiftedWindowAttention)
    monkeypatch.setattr(NetworkGraph, "_cache", type(NetworkGraph._cache)())
    net = networks.build("swin_t", 3)
    path = networks.save_network(net, tmp_path / "swin.pt",
                                 {"name": "swin_t", "num_classes": 3, "kwargs": {}})
    _expect(setup, tmp_path, r"swin\.pt' cannot be encoded as a graph.*--method none",
            network=path, error=UnsupportedArchitectureError)


def test_failed_run_never_overwrites_earlier_outputs(runs: dict[str, Path], setup: dict,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = runs["sparse"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
            "--method", "sparse", "--out", str(out)]
    assert prune.cli(argv + ["--speed_up", "1.8"]) == 2  # other settings, same directory
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "holds a run with other settings" in message
    assert "speed_up); pass another --out, or delete the directory" in message
    assert prune.cli(argv + ["--speed_up", "1000", "--out", str(out.parent / "x")]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


PRUNE_CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/prune.yaml"))


@pytest.mark.parametrize("config", PRUNE_CONFIGS, ids=lambda p: p.parent.name)
def test_every_prune_config_builds_both_stages(config: Path, tiny_cifar: Path,
                                               tiny_imagenet: Path, tmp_path: Path) -> None:
    """Each shipped prune.yaml parses and both of its stages build through train.py's CLI with
    the config's own budgets (parse only: the full runs are the benchmarks' job)."""
    from pipeline import train

    large = "imagenet" in config.parent.name
    cfg = pipeline_run.load_prune_config(config, data_root=str(tiny_imagenet if large else tiny_cifar))
    raw = yaml.safe_load(config.read_text())
    assert cfg.prune.speed_up == raw["prune"]["speed_up"]
    assert cfg.prune.dir == (raw["prune"].get("dir") or f"runs/prune/{config.parent.name}")
    arch = {"name": "resnet50" if large else "resnet8_cifar",
            "num_classes": 2 if large else 3, "kwargs": {}}
    for section in ("finetune", "final"):
        stage = run_stages.run_stage_config(cfg, section, tmp_path, section, "unused.pt", arch, [])
        stage["trainer"].update(precision=32, accelerator="cpu")  # 16-mixed is for GPUs
        stage["model"]["init_args"]["weights"] = None  # parse only: no network file here
        stage["data"]["init_args"]["num_classes"] = arch["num_classes"]
        cli = train.main(["--config", yaml.safe_dump(stage)], run=False)
        assert cli.trainer.max_epochs == raw[section]["trainer"]["max_epochs"]
        assert cli.model.hparams.lr == raw[section]["model"]["init_args"]["lr"]


def test_run_writes_a_checked_onnx_file_and_measured_latency(runs: dict[str, Path]) -> None:
    report = json.loads((runs["sparse"] / "report.json").read_text())
    assert report["onnx"]["file"] == "network.onnx" and (runs["sparse"] / "network.onnx").is_file()
    assert report["onnx"]["max_abs_diff"] <= 1e-4 and report["onnx"]["opset"] == 18
    assert [r["batch_size"] for r in report["latency"]] == [1, 64]
    for row in report["latency"]:
        assert row["speed_up_measured"] == pytest.approx(row["unpruned_latency_ms"] / row["latency_ms"])
        assert report["speed_up"]["measured"][str(row["batch_size"])] == row["speed_up_measured"]


def test_bring_your_own_state_dict(setup: dict, tmp_path: Path) -> None:
    """`--arch NAME --weights FILE`: a state_dict saved by plain PyTorch code is pruned like a
    network file; the converted input computes what the plain model computes, bit for bit."""
    torch.manual_seed(1)
    plain = networks.build("resnet8_cifar", 3)  # code that knows nothing of our file format
    weights = tmp_path / "plain_state_dict.pt"
    torch.save(plain.state_dict(), weights)
    out = tmp_path / "byo"
    config = yaml.safe_load(setup["config"].read_text())
    config["prune"]["latency_batch_sizes"], config["prune"]["onnx"] = [], False
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(config))
    assert prune.main(["run", "--config", str(path), "--arch", "resnet8_cifar", "--weights",
                       str(weights), "--method", "none", "--speed_up", "1.5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["network"] == str(weights.resolve())
    assert report["architecture"]["name"] == "resnet8_cifar"
    converted, _ = networks.load_network(out / "input_network.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), plain.eval()(x))
    # weights of another architecture: refused before anything is written, keys named
    with pytest.raises(networks.CheckpointError, match=r"does not match resnet20_cifar with 3 "
                                                       r"classes .*first: missing layer1\.1"):
        prune.main(["run", "--config", str(path), "--arch", "resnet20_cifar", "--weights",
                    str(weights), "--method", "none", "--out", str(tmp_path / "wrong")])
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(UserError, match="--arch NAME --weights FILE"):
        prune.main(["run", "--config", str(path), "--arch", "resnet8_cifar", "--method", "none",
                    "--out", str(tmp_path / "wrong")])


def test_bring_your_own_class_by_import_path_and_registry_arguments(setup: dict, tmp_path: Path) -> None:
    """`--arch package.module:Class --arch_kwargs ...`: a user's own module class (and a
    registry network with arguments) pruned from a plain state_dict; the files it writes
    rebuild the class from the recorded import path and arguments."""
    from pruning_helpers import TinyNet

    path, quick = setup["config"], ["--prune.latency_batch_sizes", "[]", "--prune.onnx=false"]
    torch.manual_seed(2)
    plain = TinyNet(num_classes=3, width=6)
    weights = tmp_path / "tiny.pt"
    torch.save(plain.state_dict(), weights)
    out = tmp_path / "tiny"
    assert prune.main(["run", "--config", str(path), "--arch", "pruning_helpers:TinyNet",
                       "--arch_kwargs", "{width: 6}", "--weights", str(weights), "--method", "none",
                       "--speed_up", "1.5", "--out", str(out), *quick]) == 0
    report = json.loads((out / "report.json").read_text())
    # the command-line overrides reached the run and its record
    assert report["config"]["prune"]["onnx"] is False and report["latency"] == []
    assert not (out / "network.onnx").exists()
    assert report["architecture"] == {"name": "pruning_helpers:TinyNet", "num_classes": 3,
                                      "kwargs": {"width": 6}}
    assert report["speed_up"]["reached"] >= 1.5
    converted, _ = networks.load_network(out / "input_network.pt")
    final, _ = networks.load_network(out / "network.pt")  # rebuilt by import path, pruned
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), plain.eval()(x))
    assert isinstance(final, TinyNet) and final.head.in_features < 12
    # a registry network with arguments: a half-width ResNet-8
    half = networks.build("resnet8_cifar", 3, width=0.5)
    torch.save(half.state_dict(), tmp_path / "half.pt")
    assert prune.main(["run", "--config", str(path), "--arch", "resnet8_cifar", "--arch_kwargs",
                       "{width: 0.5}", "--weights", str(tmp_path / "half.pt"), "--method", "none",
                       "--speed_up", "1.5", "--out", str(tmp_path / "half"), *quick]) == 0
    assert json.loads((tmp_path / "half" / "report.json").read_text())["architecture"]["kwargs"] == \
        {"width": 0.5}
    # an import path that does not resolve is named, before anything is written
    with pytest.raises(pipeline_run.PruneRunError, match="module 'no_such_module' cannot be imported"):
        prune.main(["run", "--config", str(path), "--arch", "no_such_module:Net", "--weights",
                    str(weights), "--method", "none", "--out", str(tmp_path / "wrong")])
    assert not (tmp_path / "wrong").exists()


def test_config_overrides_on_the_command_line_are_parsed_and_checked(
        setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--section.key VALUE` (or `=VALUE`), read as YAML, nested; a key the config does not
    have, a section it does not have and a token of another form are each refused by name,
    before anything is written."""
    from pipeline.common import parse_overrides

    assert parse_overrides(["--base.trainer.max_epochs", "1", "--prune.onnx=false",
                            "--base.trainer.limit_val_batches", "0.5", "--prune.curve_range",
                            "[2, 4]"]) == {
        "base": {"trainer": {"max_epochs": 1, "limit_val_batches": 0.5}},
        "prune": {"onnx": False, "curve_range": [2, 4]}}
    for tokens, message in ((["--prune.onnx"], "has no value"), (["stray"], "'stray'"),
                            (["--verbosity", "2"], "'--verbosity'"), (["--a..b", "1"], "'--a..b'")):
        with pytest.raises(ValueError, match=message):
            parse_overrides(tokens)
    base = ["--network", str(setup["network"]), "--config", str(setup["config"]),
            "--method", "none", "--out", str(tmp_path / "r")]
    with pytest.raises(pipeline_run.PruneRunError, match="nokey"):
        prune.main(["run", *base, "--prune.nokey", "1"])
    with pytest.raises(pipeline_run.PruneRunError, match="'trainerr' is not a section.*base"):
        prune.main(["run", *base, "--trainerr.max_epochs", "1"])
    with pytest.raises(UserError, match="run: unrecognized arguments: --unknown"):
        prune.main(["run", *base, "--unknown"])
    assert not (tmp_path / "r").exists()


def test_another_criterion_prunes_stage_2_and_a_metanetwork_of_another_is_refused(
        runs: dict[str, Path], setup: dict, tmp_path: Path) -> None:
    """prune.importance: stage 2 prunes the stage-1 network as networks.prune_to_speed_up does
    with that criterion; a metanetwork meta-trained for l2 is refused under l1 unless
    prune.allow_other_criterion; sparse training refuses a criterion without a regularizer."""
    cfg = yaml.safe_load(setup["config"].read_text())
    cfg["prune"]["importance"] = "l1"
    config = tmp_path / "l1.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "l1"
    assert run(config, setup["network"], "none", out, None, "--reuse_first_stage", str(runs["none"])) == 0
    first = pipeline_run.FIRST_STAGE["none"]
    expected = networks.load_network(out / first / "network.pt")[0].eval()
    networks.prune_to_speed_up(expected, X32, TARGET, networks.base_macs(ARCH, X32), STEPS,
                               importance="l1")
    assert widths(networks.load_network(out / "network.pt")[0]) == widths(expected)
    with pytest.raises(pipeline_run.PruneRunError, match="meta-trained for the pruning criterion 'l2', "
                                                         "but this run prunes by 'l1'"):
        run(config, setup["network"], "metanetwork", tmp_path / "meta_l1", setup["meta"])
    assert not (tmp_path / "meta_l1").exists()
    cfg["prune"]["importance"] = "fpgm"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_run.PruneRunError, match="'fpgm' has no sparse-training regularizer"):
        run(config, setup["network"], "sparse", tmp_path / "sparse_fpgm", None)
    cfg["prune"].update(importance="l1", allow_other_criterion=True)
    config.write_text(yaml.safe_dump(cfg))
    info = run_stages.check_inputs(pipeline_run.load_prune_config(config), str(setup["network"]),
                                     str(setup["meta"]))  # allowed: the checks pass
    assert info["arch"] == ARCH


def test_the_runs_tensorboard_holds_its_results(runs: dict[str, Path]) -> None:
    """<run>/summary, read back with TensorBoard's own reader: the report's accuracies,
    speed-ups and MACs, both curves point by point (step = 100 x speed-up); the stages' logs
    carry the pruning tags and no hp_metric placeholder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.curve import read_curves

    out = runs["none"]
    report = json.loads((out / "report.json").read_text())
    events = EventAccumulator(str(out / "summary"))
    events.Reload()
    value = {t: {e.step: e.value for e in events.Scalars(t)} for t in events.Tags()["scalars"]}
    for network, splits in report["accuracy"].items():
        for split, acc in (splits or {}).items():
            assert value[f"accuracy/{network}/{split}"][0] == pytest.approx(acc)
    assert value["pruning/speed_up"][0] == pytest.approx(report["speed_up"]["reached"])
    assert value["pruning/macs"][0] == report["macs"]["after"]
    assert value["curve/stage1_area"][0] == pytest.approx(report["stage1_curve"]["area"])
    first = pipeline_run.FIRST_STAGE["none"]
    for tag, csv in (("curve/stage1", out / first / "curve.csv"), ("curve/final", out / "curve.csv")):
        (points,) = read_curves(csv).values()
        assert value[tag] == pytest.approx({round(100 * p[0]): p[-1] for p in points}, abs=1e-5)
    stage = EventAccumulator(str(out / pipeline_run.SECOND_STAGE))
    stage.Reload()
    tags = stage.Tags()["scalars"]
    assert "pruning/speed_up" in tags and "hp_metric" not in tags


# ---- weight sparsity: a weight-sparsity or N:M target (issue 31) ---------------------------------
QUICK = ("--prune.latency_batch_sizes", "[]", "--prune.onnx=false")


def _prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every convolution's and dense layer's weight, by module name (written out here, not
    read from networks.sparsity)."""
    return {name: m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.fixture(scope="module")
def weight_runs(setup: dict, runs: dict[str, Path], tiny_cifar: Path, make_zoo) -> dict[str, Path]:
    """One finished weight run per method, and an N:M run: ``none`` to 0.6 (global) taking stage
    1 from the channel run (a target of the other kind), ``nm`` (none, 2:4) taking it from
    that one, ``sparse`` to 0.5 per layer, ``metanetwork`` to 0.5 with a metanetwork meta-trained
    for weight sparsity; the last three in their default folders."""
    meta = meta_checkpoint(tiny_cifar, setup["out"], make_zoo, "weights_meta", sparsity="weights",
                           reg=1e-3)
    base = ["run", "--config", str(setup["config"]), "--network", str(setup["network"])]
    folder = Path(yaml.safe_load(setup["config"].read_text())["prune"]["dir"])
    dirs = {"none": setup["out"] / "w_none", "nm": folder / "net_none_2of4_seed0",
            "sparse": folder / "net_sparse_w0.5-layer_seed0",
            "metanetwork": folder / "net_metanetwork_w0.5_seed0"}
    argv, sys.argv = sys.argv, ["prune.py"]
    try:
        # the config of the channel run (ONNX, latency), whose stage 1 they take
        assert prune.main([*base, "--method", "none", "--weight_sparsity", "0.6", "--out",
                           str(dirs["none"]), "--reuse_first_stage", str(runs["none"])]) == 0
        assert prune.main([*base, "--method", "none", "--nm", "[2,4]", "--reuse_first_stage",
                           str(dirs["none"])]) == 0
        assert prune.main([*base, "--method", "sparse", "--weight_sparsity", "0.5",
                           "--prune.sparsity_scope", "layer", *QUICK]) == 0
        assert prune.main([*base, "--method", "metanetwork", "--metanetwork", str(meta),
                           "--weight_sparsity", "0.5", *QUICK]) == 0
    finally:
        sys.argv = argv
    return {**dirs, "meta": meta}


@pytest.mark.parametrize("kind", ["none", "nm", "sparse", "metanetwork"])
def test_weight_run_end_to_end(setup: dict, weight_runs: dict, kind: str) -> None:
    """Each method to a weight target: the report's accuracies against a plain loop, the stages'
    callbacks, the network's shape unchanged, the masks kept through the finetune (the zeros of
    the network right after masking are the final network's), the files exported."""
    out = weight_runs[kind]
    report = json.loads((out / "report.json").read_text())
    method = "none" if kind == "nm" else kind
    assert report["method"] == method and report["format"] == "metaprune.prune_run/v1"
    assert "speed_up" not in report
    assert report["target"] == ({"nm": [2, 4]} if kind == "nm" else
                                {"weight_sparsity": {"none": 0.6}.get(kind, 0.5),
                                 "scope": "layer" if kind == "sparse" else "global"})
    data = ImageDataModule(**yaml.safe_load(setup["config"].read_text())["base"]["data"]["init_args"])
    data.setup("validate")
    data.setup("test")
    acc, stages = report["accuracy"], report["files"]["stages"]
    for stage in ("original", "finetuned", "pruned", "final"):
        net = networks.load_network(stages[stage])[0]
        assert acc[stage]["val"] == pytest.approx(plain_accuracy(net, data.val_dataloader())), stage
        assert acc[stage]["test"] == pytest.approx(plain_accuracy(net, data.test_dataloader())), stage
    assert (acc["feedforward"] is None) == (method != "metanetwork")
    original, final = (networks.load_network(stages[k])[0] for k in ("original", "final"))
    assert widths(final) == widths(original)  # zeros, not removed channels
    assert report["macs"]["after"] == report["macs"]["before"]
    pruned = _prunable(networks.load_network(stages["pruned"])[0])
    for name, w in _prunable(final).items():
        assert torch.equal(w == 0, pruned[name] == 0), name  # the masks held through the finetune
    assert any(not torch.equal(w, pruned[name]) for name, w in _prunable(final).items())  # trained
    config = report["config"]["stages"]
    first = config[pipeline_run.FIRST_STAGE[method]]["trainer"]["callbacks"]
    expected = {"metanetwork": "callbacks.MetanetworkFeedforward",
                "sparse": "callbacks.SparseTraining"}.get(method)
    assert not expected or expected in [c["class_path"] for c in first]
    if method == "sparse":
        assert first[-1]["init_args"]["sparsity"] == "weights"
    (masking, save) = config[pipeline_run.SECOND_STAGE]["trainer"]["callbacks"][-2:]
    assert masking["class_path"] == "callbacks.WeightSparsity" and masking["init_args"]["epoch"] == 0
    assert save["init_args"] == {"filename": "pruned.pt", "when": "train_start"}
    for name in ("network.pt", "network.pt2", "curve.png", "report.json", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "network.onnx").is_file() == (method == "none")


@pytest.mark.parametrize("kind", ["none", "sparse", "metanetwork"])
def test_weight_sparsity_reached_is_counted_on_the_exported_network(weight_runs: dict,
                                                                   kind: str) -> None:
    """The zeros of network.pt and of the torch.export program, counted here, equal the report's
    and the target within one weight per layer of rounding (global: one threshold over all
    weights; per layer: the share in each)."""
    out = weight_runs[kind]
    report = json.loads((out / "report.json").read_text())
    target, scope = report["target"]["weight_sparsity"], report["target"]["scope"]
    layers = _prunable(networks.load_network(out / "network.pt")[0])
    program = torch.export.load(out / "network.pt2").state_dict
    zeros = {name: int((w == 0).sum()) for name, w in layers.items()}
    for name in layers:
        assert int((program[f"{name}.weight"] == 0).sum()) == zeros[name], name  # zeros in place
    total = sum(w.numel() for w in layers.values())
    sparsity = report["weight_sparsity"]
    assert sparsity["zeros"] == sum(zeros.values()) and sparsity["weights"] == total
    assert sparsity["reached"] == sum(zeros.values()) / total
    assert {k: v["zeros"] for k, v in sparsity["layers"].items()} == zeros
    if scope == "global":
        assert abs(sum(zeros.values()) - target * total) <= 1
    else:
        for name, w in layers.items():
            assert abs(zeros[name] - target * w.numel()) <= 0.5, name
    assert sparsity["before"] == 0.0


def test_nm_pattern_holds_in_every_layer_by_brute_force(weight_runs: dict) -> None:
    """2:4: every run of 4 consecutive input channels of every output and kernel position of
    every layer that has a multiple of 4 input channels holds at most 2 non-zero weights, in
    network.pt and in the torch.export program; the others are left dense and named."""
    import itertools

    out = weight_runs["nm"]
    report = json.loads((out / "report.json").read_text())
    nm = report["weight_sparsity"]["nm"]
    program = torch.export.load(out / "network.pt2").state_dict
    covered, dense = [], []
    for name, w in _prunable(networks.load_network(out / "network.pt")[0]).items():
        if w.shape[1] % 4:
            dense.append(name)
            continue
        covered.append(name)
        for weight in (w, program[f"{name}.weight"].detach()):
            for o, *pos in itertools.product(range(w.shape[0]), *(range(k) for k in w.shape[2:])):
                for start in range(0, w.shape[1], 4):
                    run = [float(weight[(o, c, *pos)]) for c in range(start, start + 4)]
                    assert sum(v != 0 for v in run) <= 2, (name, o, pos, start)
    assert covered and dense  # the randomly narrowed network has both kinds of layer
    assert nm["layers"] == covered and report["weight_sparsity"]["dense_layers"] == dense
    assert nm["satisfied"] is True and nm["violating_runs"] == 0 and nm["sparsity"] == 0.5


def test_weight_curve_points_match_magnitude_pruning_by_hand(setup: dict, weight_runs: dict) -> None:
    """A point of the stage-1 curve (in weight sparsity) is the stage-1 network with its
    smallest |w| over all layers zeroed (sorted here), BN re-estimated, on the test images; the
    curve starts unpruned and its area over prune.sparsity_range is the report's."""
    from pipeline.curve import read_curves

    out = weight_runs["none"]
    report = json.loads((out / "report.json").read_text())
    first = out / pipeline_run.FIRST_STAGE["none"]
    (points,) = read_curves(first / "curve.csv").values()
    assert (first / "curve.csv").read_text().startswith("curve,weight_sparsity,nonzero_weights")
    network = networks.load_network(first / "network.pt")[0]
    data = ImageDataModule(**yaml.safe_load(setup["config"].read_text())["base"]["data"]["init_args"])
    data.setup("validate")
    data.setup("test")
    batches = networks.calibration_batches(data.train_set, 8, 128)
    layers = _prunable(network)
    total = sum(w.numel() for w in layers.values())
    level = 0.7
    point = min(points, key=lambda p: abs(p[0] - level))
    ranked = sorted((abs(float(v)), name, i) for name, w in layers.items()
                    for i, v in enumerate(w.flatten()))
    count = round(level * total)
    pruned = copy.deepcopy(network)
    with torch.no_grad():
        for _, name, i in ranked[:count]:
            pruned.get_submodule(name).weight.view(-1)[i] = 0.0
    assert point[0] == pytest.approx(count / total, abs=1e-6) and point[1] == total - count
    expected = plain_accuracy(networks.recalibrate_batchnorm(pruned, batches), data.test_dataloader())
    assert point[2] == pytest.approx(expected, abs=1e-5)
    unpruned = networks.recalibrate_batchnorm(copy.deepcopy(network), batches)
    assert points[0][:2] == (0.0, total)
    assert points[0][2] == pytest.approx(plain_accuracy(unpruned, data.test_dataloader()), abs=1e-5)
    curve = report["stage1_curve"]
    assert curve["axis"] == "weight_sparsity" and curve["range"] == [0.5, 0.9]
    assert curve["area"] == pytest.approx(networks.curve_area(points, 0.5, 0.9), abs=1e-5)
    assert [round(p[0], 2) for p in points] == [round(0.05 * i, 2) for i in range(19)]


def test_weight_runs_reuse_stage_1_across_targets_and_record_their_target(
        runs: dict[str, Path], weight_runs: dict, setup: dict, tmp_path: Path) -> None:
    """Stage 1 comes from a channel run (none) and from a weight run of another target; the
    stage-1 curve is copied only from a run of the same kind; run.json records the weight
    target in place of the speed-up; a rerun is answered from the files; sparse training of one
    kind is not taken for the other."""
    first = pipeline_run.FIRST_STAGE["none"]
    stage1 = (runs["none"] / first / "network.pt").read_bytes()
    assert (weight_runs["none"] / first / "network.pt").read_bytes() == stage1
    assert (weight_runs["nm"] / first / "network.pt").read_bytes() == stage1
    assert not (weight_runs["none"] / first / "checkpoints").exists()  # reused, not trained
    curve = (weight_runs["none"] / first / "curve.csv").read_text()
    assert curve != (runs["none"] / first / "curve.csv").read_text()  # a curve in sparsity
    assert (weight_runs["nm"] / first / "curve.csv").read_text() == curve  # same kind: copied
    stored = json.loads((weight_runs["nm"] / "run.json").read_text())
    assert stored["nm"] == [2, 4] and "speed_up" not in stored
    assert stored["config"]["prune"]["nm"] == [2, 4] and "speed_up" not in stored["config"]["prune"]
    assert run(setup["config"], setup["network"], "none", weight_runs["none"], None,
               "--weight_sparsity", "0.6", "--reuse_first_stage", str(runs["none"])) == 0
    _expect(setup, tmp_path, r"--reuse_first_stage .*differs in kind", method="sparse", meta=None,
            extra=("--weight_sparsity", "0.5", "--reuse_first_stage", str(runs["sparse"])))


def test_channel_runs_record_what_they_recorded_before(runs: dict[str, Path]) -> None:
    """A speed-up run's run.json and report.json hold exactly the keys they held before weight
    targets existed, so run folders from before still resume and answer "done already"."""
    stored = json.loads((runs["none"] / "run.json").read_text())
    assert list(stored) == ["method", "speed_up", "seed", "network", "network_sha256",
                            "metanetwork", "metanetwork_sha256", "config"]
    assert list(stored["config"]["prune"]) == [
        "speed_up", "dir", "iterative_steps", "input_size", "reg", "alpha", "seed", "bn_batches",
        "bn_batch_size", "curve_range", "curve_every"]
    report = json.loads((runs["none"] / "report.json").read_text())
    assert list(report) == ["format", "method", "network", "metanetwork", "architecture",
                            "speed_up", "latency", "onnx", "macs", "params", "accuracy",
                            "stage1_curve", "seeds", "files", "config", "time_s"]
    assert list(report["stage1_curve"]) == ["range", "area", "split", "bn_batches", "csv"]
    assert runs["none"].name == "none" and (runs["none"] / "finetune" / "curve.csv").read_text() \
        .startswith("curve,speed_up,macs,accuracy")
    cfg = pipeline_run.load_prune_config(runs["none"].parent / "prune.yaml")
    assert pipeline_run.run_dir(cfg, "net.pt", "none", None).name == "net_none_1.6x_seed0"


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


def test_sparse_training_for_weights_adds_the_l1_gradient_before_the_step(setup: dict) -> None:
    from callbacks import SparseTraining
    from lightning_modules import ImageClassifier

    module = ImageClassifier(ARCH["name"], 3, weights=str(setup["network"]))
    callback = SparseTraining(reg=0.5, sparsity="weights", exclude=["fc"])
    callback.on_fit_start(None, module)
    for p in module.network.parameters():
        p.grad = torch.zeros_like(p)
    callback.on_before_optimizer_step(None, module, None)
    layers = {f"{name}.weight" for name in _prunable(module.network) if name != "fc"}
    for name, p in module.network.named_parameters():
        expected = 0.5 * torch.sign(p.detach()) if name in layers else torch.zeros_like(p)
        assert torch.equal(p.grad, expected), name


def test_a_weight_runs_tensorboard_holds_its_sparsity(weight_runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.curve import read_curves

    out = weight_runs["sparse"]
    report = json.loads((out / "report.json").read_text())
    events = EventAccumulator(str(out / "summary"))
    events.Reload()
    value = {t: {e.step: e.value for e in events.Scalars(t)} for t in events.Tags()["scalars"]}
    assert value["pruning/weight_sparsity"][0] == pytest.approx(report["weight_sparsity"]["reached"])
    assert value["pruning/weight_sparsity_target"][0] == pytest.approx(0.5)
    assert "pruning/speed_up" not in value
    (points,) = read_curves(out / "sparse" / "curve.csv").values()
    assert value["curve/stage1"] == pytest.approx({round(1000 * p[0]): p[-1] for p in points}, abs=1e-5)
    stage = EventAccumulator(str(out / pipeline_run.SECOND_STAGE))
    stage.Reload()
    assert "pruning/weight_sparsity" in stage.Tags()["scalars"]


# ---- a latency target -------------------------------------------------------------------------
def test_a_latency_target_prunes_stage_2_until_the_clock_reaches_it(
        setup: dict, runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """--latency_speed_up 1.5 --latency_batch 2 --prune.round_to 2, stage 1 taken from the
    speed-up run: a deterministic clock (time proportional to MACs, as
    tests/test_structured_pruning.py uses) stands in for networks.latency_probe, so stage 2 must
    stop where networks.prune_to_latency stops on the stage-1 network against the *unpruned
    architecture*'s time, every layer it narrows a multiple of 2; the folder, run.json and
    report.json name the latency target, the report's measured speed-up reaches it, the curves
    are in MACs (the final one from the MACs speed-up reached), a rerun is answered from the
    files, and two targets are refused."""
    batch, target = 2, 1.5
    readings: list[tuple[int, float]] = []

    def probe(input_size, batch_size=1, device="cpu", min_run_time=0.2):
        assert list(input_size) == [3, 32, 32] and batch_size == batch
        assert torch.device(device).type == "cpu"  # the stage's device, and the report's

        def clock(model: nn.Module) -> float:
            readings.append((batch_size, networks.count_macs(model, X32) * batch_size / 1e6))
            return readings[-1][1]
        return clock

    monkeypatch.setattr(networks, "latency_probe", probe)
    folder = Path(yaml.safe_load(setup["config"].read_text())["prune"]["dir"])
    out = folder / f"net_none_lat{target:g}b{batch}_seed0"
    argv = ["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
            "--method", "none", "--latency_speed_up", str(target), "--latency_batch", str(batch),
            "--prune.round_to", "2", "--reuse_first_stage", str(runs["none"])]
    assert prune.main(argv) == 0
    assert out.is_dir() and len(readings) > 4

    stored = json.loads((out / "run.json").read_text())
    assert list(stored) == ["method", "latency_speed_up", "latency_batch", "seed", "network",
                            "network_sha256", "metanetwork", "metanetwork_sha256", "config"]
    assert stored["latency_speed_up"] == target and stored["latency_batch"] == batch
    prune_cfg = stored["config"]["prune"]
    assert "speed_up" not in prune_cfg and prune_cfg["latency_speed_up"] == target
    assert prune_cfg["latency_batch"] == batch and prune_cfg["round_to"] == 2

    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["format", "method", "network", "metanetwork", "architecture", "target",
                            "latency_speed_up", "speed_up", "latency", "onnx", "macs", "params",
                            "accuracy", "stage1_curve", "seeds", "files", "config", "time_s"]
    assert report["target"] == {"latency_speed_up": target, "latency_batch": batch}
    macs = report["macs"]
    mac_speed_up = macs["unpruned"] / macs["after"]
    latency = report["latency_speed_up"]
    assert latency["target"] == target and latency["batch_size"] == batch
    assert latency["device"] == "cpu"
    assert latency["reached"] == pytest.approx(mac_speed_up) and latency["reached"] >= target
    assert latency["unpruned_latency_ms"] == pytest.approx(macs["unpruned"] * batch / 1e6)
    assert "target" not in report["speed_up"]
    assert report["speed_up"]["reached"] == pytest.approx(mac_speed_up)
    assert [r["batch_size"] for r in report["latency"]] == [1, 64]  # the table, as before

    # Oracle: the stage-1 network (reused, not trained) pruned by prune_to_latency with the
    # same clock against the unpruned architecture's time and round_to 2 stops at the same widths
    first = pipeline_run.FIRST_STAGE["none"]
    assert (out / first / "network.pt").read_bytes() == (runs["none"] / first / "network.pt").read_bytes()
    assert not (out / first / "checkpoints").exists()
    start = networks.load_network(out / first / "network.pt")[0].eval()
    before = widths(start)
    clock = probe([3, 32, 32], batch)
    base_ms = clock(networks.build(ARCH["name"], 3, **ARCH["kwargs"]))
    pruner = networks.criterion_pruner(start, X32, STEPS, round_to=2)
    assert networks.prune_to_latency(start, X32, target, base_ms, clock, STEPS, pruner=pruner) \
        == pytest.approx(latency["reached"])
    final = networks.load_network(out / "network.pt")[0]
    assert widths(final) == widths(start)
    pruned = networks.load_network(out / pipeline_run.SECOND_STAGE / "pruned.pt")[0]
    assert widths(pruned) == widths(final)
    narrowed = {k: (before[k], w) for k, w in widths(final).items() if w != before[k]}
    assert narrowed and all(w % 2 == 0 for _, w in narrowed.values()), narrowed  # round_to held
    callback = report["config"]["stages"][pipeline_run.SECOND_STAGE]["trainer"]["callbacks"][-2]
    assert callback["class_path"] == "callbacks.PruneToSpeedUp"
    assert {k: callback["init_args"][k] for k in ("latency_speed_up", "latency_batch", "round_to")} \
        == {"latency_speed_up": target, "latency_batch": batch, "round_to": 2}
    assert "speed_up" not in callback["init_args"]

    # curves in MACs: the stage-1 one copied (same kind), the final one from the speed-up reached
    from pipeline.curve import read_curves
    from pipeline.summary import scalars

    assert (out / first / "curve.csv").read_text() == (runs["none"] / first / "curve.csv").read_text()
    (points,) = read_curves(out / "curve.csv").values()
    assert points[0][0] == pytest.approx(mac_speed_up) and points[0][1] == macs["after"]
    tags = {tag: value for tag, value, _ in scalars(report, {})}
    assert tags["pruning/latency_speed_up"] == pytest.approx(latency["reached"])
    assert tags["pruning/latency_speed_up_target"] == target and "pruning/speed_up_target" not in tags

    # a rerun is answered from the files; a second target is refused before anything loads
    fit_stage = run_stages.fit_stage
    monkeypatch.setattr(run_stages, "fit_stage", lambda *a, **k: pytest.fail("a stage was refit"))
    count = len(readings)
    assert prune.main(argv) == 0 and len(readings) == count
    capsys.readouterr()
    bad = tmp_path / "two"
    for extra, message in (
            (["--prune.latency_speed_up", "1.5"],
             "prune.speed_up 1.6 and prune.latency_speed_up 1.5 are two targets; a run has one"),
            (["--speed_up", "2", "--latency_speed_up", "2"],
             "--speed_up and --latency_speed_up are two targets"),
            (["--latency_batch", "2"], "--latency_batch 2 goes with a latency target")):
        assert prune.cli(["run", "--config", str(setup["config"]), "--network",
                          str(setup["network"]), "--method", "none", "--out", str(bad), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (message, err)
    assert not bad.exists()
    # a target the clock never reaches is known only in stage 2: named in one line, stage 1 kept
    far = tmp_path / "far"
    monkeypatch.setattr(run_stages, "fit_stage", fit_stage)
    assert prune.cli(["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
                      "--method", "none", "--out", str(far), "--latency_speed_up", "1000",
                      "--latency_batch", str(batch), "--reuse_first_stage", str(runs["none"])]) == 2
    err = capsys.readouterr().err
    assert "prune.py: error: stage 2: latency speed-up target 1000.000x is unreachable: 40 " \
        "pruning steps reach" in err and f"Stage 1 is kept: pass another --latency_speed_up " \
        f"with --reuse_first_stage {far}" in err, err
    assert (far / first / "network.pt").is_file() and not (far / "report.json").exists()
