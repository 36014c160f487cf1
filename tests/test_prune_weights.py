"""`prune.py run` to a weight-sparsity or N:M target (issue 31): each method end to end, the
sparsity counted on the exported network, the 2:4 pattern by brute force, the curve in weight
sparsity by hand, stage 1 reused across targets, TensorBoard."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from pruning_helpers import ARCH, _expect, _prunable, plain_accuracy, run

import networks
from datamodules import ImageDataModule
from datamodules.zoo_manifest import widths
from pipeline import run as pipeline_run

pytestmark = pytest.mark.usefixtures("cli_argv")


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
