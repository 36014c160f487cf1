"""``prune.py run``'s last part (docs/pruning.md): every network of a run evaluated, the result
saved and exported (network file, ``torch.export`` program, ONNX checked in onnxruntime), the
curves of the final and the stage-1 network, the measured latency, and the report."""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .common import write_json
from .options import RunRequest
from .run_config import (
    EVAL_FILE,
    FIRST_STAGE,
    LATENCY_BATCH_SIZES,
    SECOND_STAGE,
    PruneConfig,
    PruneSettings,
    latency_target,
)
from .run_stages import run_stage_config

# Seconds of timing per reading of report.json's latency speed-up of a latency target
LATENCY_REPORT_S = 0.5


def eval_cli(cfg: PruneConfig, arch: dict, weights: str | os.PathLike, out: Path) -> Any:
    """A LightningCLI (not run) holding the config's data and a classifier, on one device
    (exact val/test accuracy: no distributed sampler padding), for evaluating network files."""
    from .train import main

    config = run_stage_config(cfg, "final", out, "eval", weights, arch, [])
    config["trainer"].update(logger=False, callbacks=[], devices=1, num_nodes=1,
                             strategy="auto", enable_progress_bar=False,
                             enable_model_summary=False)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return main(["--config", yaml.safe_dump(config, sort_keys=False)], run=False)


def evaluate_networks(get_cli: Callable[[], Any], files: dict[str, Path], cache: Path) -> dict:
    """``{name: {"file", "val_acc", "test_acc"}}`` of network files on the val and test
    splits; cached in ``cache`` (each network is evaluated once, even across reruns)."""
    import networks

    results = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, file in files.items():
        if name in results:
            continue
        cli = get_cli()
        cli.model.network = networks.load_network(file)[0]
        val = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        results[name] = {"file": str(file), "val_acc": float(val["val/acc"]),
                         "test_acc": float(test["test/acc"])}
        write_json(cache, results)
    return results


def network_curve(get_cli: Callable[[], Any], network: Any, compute: Callable[..., list],
                  p: PruneSettings, out: Path, label: str, chance: float, split: str = "val",
                  axis: str = "speed_up") -> list:
    """``curve.csv``/``curve.png`` in ``out`` (computed once): ``split`` accuracy of ``network``
    pruned progressively without finetuning, each point after BN recalibration on
    ``prune.bn_batches`` training batches (pipeline/curve.py). ``compute(network, evaluate,
    calibration, device)`` returns the points: ``channel_curve`` or ``weight_curve``; ``axis``
    what their first items are (``pipeline.curve.AXES``)."""
    from .curve import calibration, evaluator, read_curves, save_curves

    if (out / "curve.csv").is_file() and (out / "curve.png").is_file():
        return next(iter(read_curves(out / "curve.csv").values()))
    dm = get_cli().datamodule
    dm.setup("validate")
    if split == "test":
        dm.setup("test")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    device = get_cli().trainer.strategy.root_device
    points = compute(network.to(device).eval(), evaluator(loader, device),
                     calibration(dm, p.bn_batches, p.bn_batch_size), device)
    save_curves({label: points}, out, f"{label} (BN recalibrated on {p.bn_batches} batches)"
                if p.bn_batches else label, axis=axis, chance=chance, split=split)
    return points


def channel_curve(p: PruneSettings, example: Any, base: int, max_speed_up: float) -> Callable[..., list]:
    """A ``network_curve`` computation: channels pruned by the run's criterion every
    ``prune.curve_every``-th step up to ``max_speed_up`` (``networks.accuracy_curve``)."""
    from networks import accuracy_curve

    return lambda network, evaluate, batches, device: accuracy_curve(
        network, example.to(device), base, evaluate, max_speed_up, p.iterative_steps,
        p.curve_every, batches, p.cap, p.criterion)


def weight_curve(p: PruneSettings, top: float) -> Callable[..., list]:
    """A ``network_curve`` computation: the smallest weights zeroed by magnitude
    (``prune.sparsity_scope``, ``sparsity_exclude``) at every ``prune.sparsity_step`` of weight
    sparsity and at the ends of ``prune.sparsity_range``, up to ``top``
    (``networks.sparsity_curve``)."""
    from networks import sparsity_curve, sparsity_levels

    levels = sparsity_levels(p.weight_step, p.weight_range, top)
    return lambda network, evaluate, batches, device: sparsity_curve(
        network, evaluate, levels, batches, p.scope, p.exclude)


def export_checked_onnx(network: Any, example: Any, path: Path) -> dict:
    """``network.onnx`` (written once), checked in onnxruntime in a fresh process against the
    PyTorch network on 4 seeded random images (max abs difference <= 1e-4)."""
    import torch

    from networks.export import ONNX_OPSET, check_onnx, export_onnx

    if not path.is_file():
        export_onnx(network, example, path)
    inputs = torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    return {"file": path.name, "opset": ONNX_OPSET, **check_onnx(path, network, inputs)}


def measured_latency(network: Any, arch: dict, p: PruneSettings) -> list[dict]:
    """Forward latency of the final network and of its unpruned architecture at each of
    ``prune.latency_batch_sizes`` (pipeline.measure; on CUDA when there is one, in ONNX Runtime
    on the CPU for a target timed there), so the report holds the measured speed-up beside the
    MACs one."""
    import torch

    import networks
    from networks.latency import compare_latency

    device = "cuda" if torch.cuda.is_available() and p.runtime == "torch" else "cpu"
    sizes = LATENCY_BATCH_SIZES if p.latency_batch_sizes is None else p.latency_batch_sizes
    unpruned = networks.build_arch(arch)
    return compare_latency(copy.deepcopy(network), unpruned, p.input_size, list(sizes), device,
                           min_run_time=0.25, runtime=p.runtime) if sizes else []


def finish_run(cfg: PruneConfig, args: RunRequest, out: Path, info: dict, settings: dict,
               stages: dict, step: Callable[[], None]) -> dict:
    """After the two ``stages``: every network evaluated, the result saved and exported, both
    curves and the latency measured; the report (its ``_points``: the curves, for the
    summary), ``step()`` after each of the three parts."""
    import networks

    p, arch, first = cfg.prune, info["arch"], FIRST_STAGE[args.method]
    assert args.network is not None  # prune_run points it at the (converted) input
    files = {"original": Path(args.network), "feedforward": out / first / "feedforward.pt",
             "finetuned": out / first / "network.pt", "pruned": out / SECOND_STAGE / "pruned.pt",
             "final": out / SECOND_STAGE / "network.pt"}
    files = {k: f for k, f in files.items() if f.is_file()}
    get_cli = _lazy_cli(cfg, arch, args.source, out)
    acc = evaluate_networks(get_cli, files, out / EVAL_FILE)

    example = networks.example_input(p.input_size)
    network, final_record = networks.load_network(files["final"])
    macs, params = networks.count_macs(network, example), networks.count_params(network)
    reached = info["base_macs"] / macs
    _save_final(network, example, out, p, metadata={
        "method": args.method, **(weight_target(p) if p.weights else {"speed_up": reached}),
        **({"latency_target": latency_target(p)} if p.latency else {}),
        "macs": macs, "base_macs": info["base_macs"], "val_acc": acc["final"]["val_acc"],
        "test_acc": acc["final"]["test_acc"],
        "trained_on": final_record["metadata"].get("trained_on", [])}, arch=arch)
    onnx = export_checked_onnx(network, example, out / "network.onnx") if p.onnx is not False else None
    step()
    accuracy = {k: ({"val": acc[k]["val_acc"], "test": acc[k]["test_acc"]} if k in acc else None)
                for k in ("original", "feedforward", "finetuned", "pruned", "final")}
    curves = _Curves(p, get_cli, out, args.method, first, 1 / arch["num_classes"])
    stage1_network = networks.load_network(files["finetuned"])[0]
    if p.weights:
        # the reached sparsity, counted on the exported file's weights (not the callback's masks)
        sparsity = weight_sparsity_record(p, networks.load_network(out / "network.pt")[0], info)
        result: dict = {"target": weight_target(p), "weight_sparsity": sparsity}
        final_points, stage1_points, stage1_curve = curves.weights(network, stage1_network,
                                                                   sparsity["reached"])
    else:
        # up to twice the speed-up in MACs: the target's, or for a latency target the one reached
        final_points, stage1_points, stage1_curve = curves.channels(
            network, stage1_network, example, info["base_macs"],
            2 * (reached if p.latency else p.target))
    step()
    latency = measured_latency(network, arch, p)
    step()
    if not p.weights:
        result = speed_up_result(p, network, arch, info["speed_up"], reached, latency)
    return {
        "format": "metaprune.prune_run/v1", "method": args.method,
        "network": settings["network"], "metanetwork": settings["metanetwork"],
        # present only for a metanetwork meta-trained on other architectures (earlier reports
        # keep their keys)
        **({"transfer": info["transfer"]} if info.get("transfer") else {}),
        "architecture": arch,
        **result,
        "latency": latency,
        **round_to_record(out),
        "onnx": onnx,
        "macs": {"unpruned": info["base_macs"], "before": info["macs"], "after": macs},
        "params": {"before": info["params"], "after": params},
        "accuracy": accuracy,
        "stage1_curve": stage1_curve,
        "seeds": {"seed_everything": p.seed,
                  "data_split": (cfg.base["data"].get("init_args") or {}).get("seed")},
        "files": {"network": "network.pt",
                  "exported": "network.pt2" if p.program is not False else None,
                  "onnx": "network.onnx" if onnx else None, "curve": "curve.png",
                  "curve_csv": "curve.csv", "stage1_curve": f"{first}/curve.png",
                  "stages": {k: str(Path(f).resolve()) for k, f in files.items()}},
        "config": {"prune": p.record(), "stages": stages},
        "_points": {"stage1": stage1_points, "final": final_points},
    }


def _lazy_cli(cfg: PruneConfig, arch: dict, source: str, out: Path) -> Callable[[], Any]:
    """``eval_cli`` built on first call, then the same one: a finished run whose evaluations
    exist loads no data."""
    cli: list = []

    def get_cli() -> Any:
        if not cli:
            cli.append(eval_cli(cfg, arch, source, out))
        return cli[0]
    return get_cli


def _save_final(network: Any, example: Any, out: Path, p: PruneSettings, metadata: dict,
                arch: dict) -> None:
    """The result as ``network.pt`` (with ``metadata``) and, unless ``prune.program`` is false,
    as a ``torch.export`` program ``network.pt2``, each written once."""
    import networks
    from networks.export import export_program

    if not (out / "network.pt").is_file():
        networks.save_network(network, out / "network.pt", arch=arch, metadata=metadata)
    if p.program is not False and not (out / "network.pt2").is_file():
        export_program(network, example, out / "network.pt2")


@dataclass(frozen=True)
class _Curves:
    """The final network's curve (``<out>/curve.csv``) and the stage-1 network's ("easier to
    prune", ``<out>/<first>/curve.csv``, on ``prune.curve_split``), in MACs or weight sparsity."""

    p: PruneSettings
    get_cli: Callable[[], Any]
    out: Path
    method: str
    first: str
    chance: float

    def _pair(self, network: Any, stage1_network: Any, final: Callable[..., list],
              stage1: Callable[..., list], axis: str) -> tuple[list, list]:
        p = self.p
        final_points = network_curve(self.get_cli, copy.deepcopy(network), final, p, self.out,
                                     f"{self.method}: final network, no finetuning", self.chance,
                                     axis=axis)
        stage1_points = network_curve(
            self.get_cli, stage1_network, stage1, p, self.out / self.first,
            f"{self.method}: after stage 1, no finetuning ({p.curve_split})", self.chance,
            p.curve_split, axis=axis)
        return final_points, stage1_points

    def channels(self, network: Any, stage1_network: Any, example: Any, base_macs: int,
                 top: float) -> tuple[list, list, dict]:
        """Both curves in speed-up, the final one up to ``top``, the stage-1 one over
        ``prune.curve_range`` (docs/method.md), and report.json's ``stage1_curve``."""
        import networks

        lo, hi = self.p.curve_range
        final, stage1 = self._pair(network, stage1_network,
                                   channel_curve(self.p, example, base_macs, top),
                                   channel_curve(self.p, example, base_macs, hi), "speed_up")
        return final, stage1, {"range": [lo, hi], "area": networks.curve_area(stage1, lo, hi),
                               "split": self.p.curve_split, "bn_batches": self.p.bn_batches,
                               "csv": f"{self.first}/curve.csv"}

    def weights(self, network: Any, stage1_network: Any, reached: float
                ) -> tuple[list, list, dict]:
        """Both curves in weight sparsity, the final one from its ``reached`` sparsity halfway
        to 1, the stage-1 one over ``prune.sparsity_range``, and ``stage1_curve``."""
        import networks

        p = self.p
        lo, hi = p.weight_range
        final, stage1 = self._pair(network, stage1_network, weight_curve(p, 1 - (1 - reached) / 2),
                                   weight_curve(p, hi), "weight_sparsity")
        return final, stage1, {"axis": "weight_sparsity", "range": [lo, hi],
                               "area": networks.curve_area(stage1, lo, hi),
                               "split": p.curve_split, "bn_batches": p.bn_batches,
                               "scope": p.scope, "exclude": p.exclude,
                               "csv": f"{self.first}/curve.csv"}


def speed_up_result(p: PruneSettings, network: Any, arch: dict, before: float, reached: float,
                    latency: list[dict]) -> dict:
    """A channel run's target and what it reached: the speed-up in MACs (and as measured at
    each latency batch size), for a latency target also the latency speed-up measured again."""
    measured = {str(r["batch_size"]): r["speed_up_measured"] for r in latency}
    if p.latency:  # the MACs speed-up reached has no target of its own
        return {"target": latency_target(p), "latency_speed_up": latency_reached(network, arch, p),
                "speed_up": {"reached": reached, "before": before, "measured": measured}}
    return {"speed_up": {"target": p.target, "reached": reached, "before": before,
                         "measured": measured}}


def round_to_record(out: Path) -> dict:
    """``{"round_to": ...}``: for ``prune.round_to: auto``, the multiple stage 2 measured and
    chose, with its trials (``callbacks.PruneToSpeedUp``); empty otherwise."""
    from callbacks.pruning import ROUND_TO_FILE

    path = out / SECOND_STAGE / ROUND_TO_FILE
    return {"round_to": json.loads(path.read_text())} if path.is_file() else {}


def latency_reached(network: Any, arch: dict, p: PruneSettings) -> dict:
    """The latency speed-up of a latency run's final ``network``, measured again as stage 2
    confirms its stop (``networks.paired_latency``: CPU, ``prune.latency_batch``, the
    target's runtime, the process's threads; the pruned network and the unpruned architecture
    timed alternately, the median reading of each), longer: ``LATENCY_REPORT_S`` seconds per
    reading."""
    import torch

    import networks

    probe = networks.latency_probe(p.input_size, p.batch, "cpu", min_run_time=LATENCY_REPORT_S,
                                   runtime=p.runtime)
    paired = networks.paired_latency(probe, networks.build_arch(arch).eval(),
                            copy.deepcopy(network).cpu().eval())
    return {"target": p.latency_speed_up, "batch_size": p.batch, "device": "cpu",
            "runtime": p.runtime, "threads": torch.get_num_threads(), "reached": paired.speed_up,
            "latency_ms": paired.model_ms, "unpruned_latency_ms": paired.reference_ms}


def weight_target(p: PruneSettings) -> dict:
    """A weight run's target as its report and network file record it."""
    if p.nm is not None:
        return {"nm": list(p.nm)}
    return {"weight_sparsity": p.weight_sparsity, "scope": p.scope}


def weight_sparsity_record(p: PruneSettings, network: Any, info: dict) -> dict:
    """What a weight run reached, counted on ``network`` (the exported file's): zeros per
    prunable layer and over all of them, and for N:M whether every run of M weights of every
    N:M layer holds at most N non-zero weights."""
    from networks.sparsity import nm_violations, zero_counts

    exclude = tuple(p.exclude)
    counts = zero_counts(network, exclude)
    zeros, total = sum(z for z, _ in counts.values()), sum(n for _, n in counts.values())
    record = {"target": p.weight_sparsity, "reached": zeros / total, "before": info["weight_sparsity"],
              **({"scope": p.scope} if p.nm is None else {}),
              "exclude": p.exclude, "dense_layers": info["dense_layers"],
              "zeros": zeros, "weights": total,
              "layers": {name: {"zeros": z, "weights": n} for name, (z, n) in counts.items()}}
    if p.nm is not None:
        n, m = p.nm
        dense = exclude + tuple(info["dense_layers"])
        violations = nm_violations(network, n, m, dense)
        covered = [counts[name] for name in violations]
        record["nm"] = {"n": n, "m": m, "layers": list(violations),
                        "sparsity": sum(z for z, _ in covered) / sum(k for _, k in covered),
                        "satisfied": not any(violations.values()),
                        "violating_runs": sum(violations.values())}
    return record
