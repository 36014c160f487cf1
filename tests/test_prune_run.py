"""`prune.py run` (issue 5) to a speed-up target: each method end to end on a tiny network,
outputs checked against independent oracles, the report, ONNX and TensorBoard files, config
overrides and bring-your-own networks. Reruns, resumes and stage 1 reused:
test_prune_run_resume.py; bad input: test_prune_run_errors.py; weight targets:
test_prune_weights.py; a latency target: test_prune_latency.py; the runs all of them share:
conftest.py."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pruning_helpers import ARCH, QUICK, STEPS, TARGET, X32, plain_accuracy, run
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
from pipeline.config_files import load_config_file

pytestmark = pytest.mark.usefixtures("cli_argv")


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
    for name in ("network.pt", "curve.png", "report.json", "run.json"):
        assert (out / name).is_file(), name
    # the metanetwork's run has prune.program false (QUICK): no torch.export program
    program = method != "metanetwork"
    assert (out / "network.pt2").is_file() == program
    assert report["files"]["exported"] == ("network.pt2" if program else None)
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
    out = runs["sparse"]
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


PRUNE_CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/prune.yaml"))


@pytest.mark.parametrize("config", PRUNE_CONFIGS, ids=lambda p: p.parent.name)
def test_every_prune_config_builds_both_stages(config: Path, tiny_cifar: Path,
                                               tiny_imagenet: Path, tmp_path: Path) -> None:
    """Each shipped prune.yaml parses and both of its stages build through train.py's CLI with
    the config's own budgets (parse only: the full runs are the benchmarks' job)."""
    from pipeline import train

    large = "imagenet" in config.parent.name
    cfg = pipeline_run.load_prune_config(config, data_root=str(tiny_imagenet if large else tiny_cifar))
    raw = load_config_file(config)
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
    report = json.loads((runs["none"] / "report.json").read_text())
    assert report["onnx"]["file"] == "network.onnx" and (runs["none"] / "network.onnx").is_file()
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
    config["prune"].update(latency_batch_sizes=[], onnx=False, program=False)
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

    path, quick = setup["config"], list(QUICK)
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
    assert run(config, setup["network"], "none", out, None, "--reuse_first_stage", str(runs["none"]),
               *QUICK) == 0
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
