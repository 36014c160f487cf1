"""``prune.py run`` (docs/pruning.md): prune one network to ``S`` x fewer MACs than its unpruned
architecture, or zero its weights to a weight sparsity (magnitude or N:M). Stage 1 (metanetwork
feedforward, the identity, or sparse training) + finetune, stage 2 prune (or mask weights) +
finetune, each a Lightning fit through ``pipeline.train.main``; then evaluation, export
(network file, ``torch.export`` program, ``curve.png``) and ``report.json``. Inputs are checked
before any training; finished stages are skipped.

This module runs the command and is its public face (``__all__``); the settings and their checks
are in ``pipeline.run_config``, the two stages' configs and their reuse in ``pipeline.run_stages``."""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from .common import (
    atomic_write,
    check_stage_config,
    is_rank_zero,
    write_json,
)
from .console import Stages
from .options import METHODS, RunRequest
from .run_config import (
    EVAL_FILE,
    FIRST_STAGE,
    LATENCY_BATCH_SIZES,
    REPORT,
    RUN_FILE,
    SECOND_STAGE,
    PruneConfig,
    PruneRunError,
    PruneSettings,
    load_prune_config,
    run_dir,
    run_settings,
    stored_settings_check,
)
from .run_stages import (
    check_inputs,
    input_network,
    reuse_first_stage,
    run_stage,
    run_stage_config,
    stage_configs,
)
from .summary import write_summary

__all__ = ["FIRST_STAGE", "METHODS", "REPORT", "RUN_FILE", "SECOND_STAGE", "PruneRunError", "RunRequest",
           "load_prune_config", "prune_run"]

# What `prune.py run` prints, one line each (pipeline.console.Stages; output in <out>/logs/)
# Seconds of timing per reading of report.json's latency speed-up of a latency target
LATENCY_REPORT_S = 0.5
RUN_STAGES = ("stage 1 (finetune)", "stage 2 (prune, finetune)", "evaluate, export, curves, latency")


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
    ``prune.latency_batch_sizes`` (pipeline.measure; on CUDA when there is one), so the report
    holds the measured speed-up beside the MACs one."""
    import torch

    import networks
    from networks.latency import compare_latency

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = LATENCY_BATCH_SIZES if p.latency_batch_sizes is None else p.latency_batch_sizes
    unpruned = networks.build_arch(arch)
    return compare_latency(copy.deepcopy(network), unpruned, p.input_size, list(sizes), device,
                           min_run_time=0.25) if sizes else []


def prune_run(args: RunRequest) -> int:
    """Prune one network to one target with one method (``prune.py run``); returns 0, also
    when the run was complete already. Writes ``<out>/report.json`` last."""
    t0 = time.perf_counter()
    cfg = load_prune_config(args.config, args.speed_up, args.seed, args.data_root, args.overrides,
                            args.weight_sparsity, args.nm, args.latency_speed_up, args.latency_batch)
    out = run_dir(cfg, args.source, args.method, args.out)
    settings = run_settings(cfg, args)
    if stored_settings_check(out, settings):
        return 0  # before anything imports torch: a finished run loads nothing

    with tempfile.TemporaryDirectory() as tmp:  # a converted input reaches --out after the checks
        given = input_network(args, cfg, Path(tmp))
        info = check_inputs(cfg, str(given), settings["metanetwork"])
        if info.get("transfer") and is_rank_zero():
            print(transfer_line(info["transfer"]), file=sys.stderr)
        if args.network is None or given != Path(args.network):
            args.network = str(out / "input_network.pt")
        p, arch, first = cfg.prune, info["arch"], FIRST_STAGE[args.method]
        stage1, stage2 = stage_configs(cfg, args, out, arch, info.get("dense_layers"))
        for section, stage in (("finetune", stage1), ("final", stage2)):  # before anything trains
            check_stage_config(stage, f"prune config {str(args.config)!r}, section {section!r} "
                               "(merged over 'base')", PruneRunError)
        if given != Path(args.network) and is_rank_zero():
            data = given.read_bytes()
            atomic_write(Path(args.network), lambda tmp_file: Path(tmp_file).write_bytes(data))
    if args.reuse_first_stage and not (out / first / "network.pt").is_file() and is_rank_zero():
        reuse_first_stage(Path(args.reuse_first_stage), settings, out, first)
    if is_rank_zero():
        write_json(out / RUN_FILE, settings)
    console = Stages(list(RUN_STAGES), out / "logs")
    print(f"run: {args.method} to {p.target_text}, outputs in {out}", file=sys.stderr)
    if info.get("dense_layers"):
        print(f"run: {p.target_text} leaves dense the layers whose input channels per output are "
              f"not a multiple of {p.nm[1] if p.nm else 0}: {', '.join(info['dense_layers'])}",
              file=sys.stderr)
    with console.stage(RUN_STAGES[0], 1, "fit") as step:
        run_stage(stage1, out / first / "network.pt", first)
        step()
    with console.stage(RUN_STAGES[1], 1, "fit") as step:
        try:
            run_stage(stage2, out / SECOND_STAGE / "network.pt", SECOND_STAGE)
        except ValueError as e:  # known only by timing: after stage 1, which is kept
            if not (p.latency and str(e).startswith("latency speed-up target")):
                raise
            raise PruneRunError(
                f"stage 2: {e} (timed on the CPU at batch {p.batch}). Stage 1 is kept: pass "
                f"another --latency_speed_up with --reuse_first_stage {out}") from e
        step()
    if not is_rank_zero():
        return 0
    with console.stage(RUN_STAGES[2], 3, "parts") as step:
        report = finish_run(cfg, args, out, info, settings, {first: stage1, SECOND_STAGE: stage2},
                            step)
    report["time_s"] = time.perf_counter() - t0
    write_summary(out, report, report.pop("_points"))
    write_json(out / REPORT, report)
    fin = report["accuracy"]["final"]
    if p.weights:
        sparsity = report["weight_sparsity"]
        outcome = (f"weight sparsity {sparsity['before']:.3f} -> {sparsity['reached']:.3f} "
                   f"(target {p.target_text}"
                   + (f", pattern {'holds' if sparsity['nm']['satisfied'] else 'VIOLATED'}"
                      if p.nm else "") + ")")
    elif p.latency:
        outcome = (f"{info['macs']:,} -> {report['macs']['after']:,} MACs, speed-up "
                   f"{report['speed_up']['reached']:.3f}x in MACs, measured latency speed-up "
                   f"{report['latency_speed_up']['reached']:.3f}x (target {p.target_text})")
    else:
        outcome = (f"{info['macs']:,} -> {report['macs']['after']:,} MACs, speed-up "
                   f"{report['speed_up']['reached']:.3f}x (target {p.target:g}x)")
    print(f"{out}: {args.method} {arch['name']} {outcome}, final val/acc {fin['val']:.4f} "
          f"test/acc {fin['test']:.4f} [{time.perf_counter() - t0:.0f} s]")
    return 0


def finish_run(cfg: PruneConfig, args: RunRequest, out: Path, info: dict, settings: dict,
               stages: dict, step: Callable[[], None]) -> dict:
    """After the two ``stages``: every network evaluated, the result saved and exported, both
    curves and the latency measured; the report (its ``_points``: the curves, for the
    summary), ``step()`` after each of the three parts."""
    import networks
    from networks.export import export_program

    p, arch, first = cfg.prune, info["arch"], FIRST_STAGE[args.method]
    finetuned, final = out / first / "network.pt", out / SECOND_STAGE / "network.pt"
    assert args.network is not None  # prune_run points it at the (converted) input

    # Evaluation, export, report (report.json last: its presence means the run is complete).
    files = {"original": Path(args.network), "feedforward": out / first / "feedforward.pt",
             "finetuned": finetuned, "pruned": out / SECOND_STAGE / "pruned.pt", "final": final}
    files = {k: f for k, f in files.items() if f.is_file()}
    cli: list = []  # built on first use: a finished run whose evaluations exist loads no data

    def get_cli() -> Any:
        if not cli:
            cli.append(eval_cli(cfg, arch, args.source, out))
        return cli[0]

    acc = evaluate_networks(get_cli, files, out / EVAL_FILE)

    example = networks.example_input(p.input_size)
    network, final_record = networks.load_network(final)
    macs, params = networks.count_macs(network, example), networks.count_params(network)
    reached = info["base_macs"] / macs
    if not (out / "network.pt").is_file():
        target = weight_target(p) if p.weights else {"speed_up": reached}
        if p.latency:
            target["latency_target"] = latency_target(p)
        networks.save_network(network, out / "network.pt", arch=arch, metadata={
            "method": args.method, **target, "macs": macs, "base_macs": info["base_macs"],
            "val_acc": acc["final"]["val_acc"], "test_acc": acc["final"]["test_acc"],
            "trained_on": final_record["metadata"].get("trained_on", [])})
    if not (out / "network.pt2").is_file():
        export_program(network, example, out / "network.pt2")
    onnx = export_checked_onnx(network, example, out / "network.onnx") if p.onnx is not False else None
    step()
    accuracy = {k: ({"val": acc[k]["val_acc"], "test": acc[k]["test_acc"]} if k in acc else None)
                for k in ("original", "feedforward", "finetuned", "pruned", "final")}
    chance, stage1_network = 1 / arch["num_classes"], networks.load_network(finetuned)[0]
    if p.weights:
        # the reached sparsity, counted on the exported file's weights (not the callback's masks)
        sparsity = weight_sparsity_record(p, networks.load_network(out / "network.pt")[0], info)
        result: dict = {"target": weight_target(p), "weight_sparsity": sparsity}
        lo, hi = p.weight_range
        final_points = network_curve(
            get_cli, copy.deepcopy(network), weight_curve(p, 1 - (1 - sparsity["reached"]) / 2), p,
            out, f"{args.method}: final network, no finetuning", chance,
            axis="weight_sparsity")
        # "Easier to prune": the stage-1 network's curve in weight sparsity over sparsity_range
        stage1_points = network_curve(
            get_cli, stage1_network, weight_curve(p, hi), p, out / first,
            f"{args.method}: after stage 1, no finetuning ({p.curve_split})",
            chance, p.curve_split, axis="weight_sparsity")
        stage1_curve = {"axis": "weight_sparsity", "range": [lo, hi],
                        "area": networks.curve_area(stage1_points, lo, hi), "split": p.curve_split,
                        "bn_batches": p.bn_batches, "scope": p.scope, "exclude": p.exclude,
                        "csv": f"{first}/curve.csv"}
    else:
        # up to twice the speed-up in MACs: the target's, or for a latency target the one reached
        top = 2 * (reached if p.latency else p.target)
        final_points = network_curve(
            get_cli, copy.deepcopy(network), channel_curve(p, example, info["base_macs"], top),
            p, out, f"{args.method}: final network, no finetuning", chance)
        # "Easier to prune": the stage-1 network's curve over prune.curve_range (docs/method.md).
        lo, hi = p.curve_range
        stage1_points = network_curve(
            get_cli, stage1_network, channel_curve(p, example, info["base_macs"], hi), p,
            out / first, f"{args.method}: after stage 1, no finetuning ({p.curve_split})",
            chance, p.curve_split)
        stage1_curve = {"range": [lo, hi], "area": networks.curve_area(stage1_points, lo, hi),
                        "split": p.curve_split, "bn_batches": p.bn_batches,
                        "csv": f"{first}/curve.csv"}
    step()
    latency = measured_latency(network, arch, p)
    step()
    if not p.weights:
        measured = {str(r["batch_size"]): r["speed_up_measured"] for r in latency}
        if p.latency:  # the MACs speed-up reached has no target of its own
            result = {"target": latency_target(p),
                      "latency_speed_up": latency_reached(network, arch, p),
                      "speed_up": {"reached": reached, "before": info["speed_up"],
                                   "measured": measured}}
        else:
            result = {"speed_up": {"target": p.target, "reached": reached,
                                   "before": info["speed_up"], "measured": measured}}
    return {
        "format": "metaprune.prune_run/v1", "method": args.method,
        "network": settings["network"], "metanetwork": settings["metanetwork"],
        # present only for a metanetwork meta-trained on other architectures (earlier reports
        # keep their keys)
        **({"transfer": info["transfer"]} if info.get("transfer") else {}),
        "architecture": arch,
        **result,
        "latency": latency,
        "onnx": onnx,
        "macs": {"unpruned": info["base_macs"], "before": info["macs"], "after": macs},
        "params": {"before": info["params"], "after": params},
        "accuracy": accuracy,
        "stage1_curve": stage1_curve,
        "seeds": {"seed_everything": p.seed,
                  "data_split": (cfg.base["data"].get("init_args") or {}).get("seed")},
        "files": {"network": "network.pt", "exported": "network.pt2",
                  "onnx": "network.onnx" if onnx else None, "curve": "curve.png",
                  "curve_csv": "curve.csv", "stage1_curve": f"{first}/curve.png",
                  "stages": {k: str(Path(f).resolve()) for k, f in files.items()}},
        "config": {"prune": p.record(), "stages": stages},
        "_points": {"stage1": stage1_points, "final": final_points},
    }


def transfer_line(transfer: dict) -> str:
    """The line a run prints when its metanetwork was meta-trained on other architectures."""
    import networks

    trained = "; ".join(networks.describe_arch(a) for a in transfer["trained_on"])
    return (f"transfer: the metanetwork was meta-trained on {trained} and is applied to "
            f"{networks.describe_arch(transfer['applied_to'])}; its effect on another "
            "architecture is not the measured one (docs/pruning.md, \"Transfer\"); report.json "
            "records this under 'transfer'")


def latency_target(p: PruneSettings) -> dict:
    """A latency run's target as its report and network file record it."""
    return {"latency_speed_up": p.latency_speed_up, "latency_batch": p.batch}


def latency_reached(network: Any, arch: dict, p: PruneSettings) -> dict:
    """The latency speed-up of a latency run's final ``network``, measured again as stage 2
    measured it (``networks.latency_probe``: CPU, ``prune.latency_batch``, the process's
    threads), longer: the median of ``LATENCY_REPORT_S`` seconds of timing per network, the
    pruned network and the unpruned architecture alternating twice, the slower reading of the
    pruned one over the faster of the unpruned one (the stopping rule's conservative ratio)."""
    import torch

    import networks

    probe = networks.latency_probe(p.input_size, p.batch, "cpu", min_run_time=LATENCY_REPORT_S)
    pruned = copy.deepcopy(network).cpu().eval()
    unpruned = networks.build_arch(arch).eval()
    readings: dict[str, list[float]] = {"pruned": [], "unpruned": []}
    for _ in range(2):
        readings["pruned"].append(probe(pruned))
        readings["unpruned"].append(probe(unpruned))
    ms, base_ms = max(readings["pruned"]), min(readings["unpruned"])
    return {"target": p.latency_speed_up, "batch_size": p.batch, "device": "cpu",
            "threads": torch.get_num_threads(), "reached": base_ms / ms, "latency_ms": ms,
            "unpruned_latency_ms": base_ms}


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
