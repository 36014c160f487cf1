"""``prune.py run`` (docs/pruning.md): prune one network to ``S`` x fewer MACs than its unpruned
architecture, or zero its weights to a weight sparsity (magnitude or N:M). Stage 1 (metanetwork
feedforward, the identity, or sparse training) + finetune, stage 2 prune (or mask weights) +
finetune, each a Lightning fit through ``pipeline.train.main``; then evaluation, export
(network file, ``torch.export`` program, ``curve.png``) and ``report.json``. Inputs are checked
before any training; finished stages are skipped.

This module runs the command and is its public face (``__all__``); the settings and their checks
are in ``pipeline.run_config``, the two stages' configs and their reuse in ``pipeline.run_stages``,
evaluation, export, curves and the report in ``pipeline.run_report``."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .common import (
    atomic_write,
    check_stage_config,
    is_rank_zero,
    write_json,
)
from .console import Stages
from .options import METHODS, RunRequest
from .run_config import (
    FIRST_STAGE,
    REPORT,
    RUN_FILE,
    SECOND_STAGE,
    PruneRunError,
    PruneSettings,
    load_prune_config,
    run_dir,
    run_settings,
    stored_settings_check,
)
from .run_report import finish_run
from .run_stages import (
    check_inputs,
    input_network,
    reuse_first_stage,
    run_stage,
    stage_configs,
)
from .summary import write_summary

__all__ = ["FIRST_STAGE", "METHODS", "REPORT", "RUN_FILE", "SECOND_STAGE", "PruneRunError", "RunRequest",
           "load_prune_config", "prune_run"]

# What `prune.py run` prints, one line each (pipeline.console.Stages; output in <out>/logs/)
RUN_STAGES = ("stage 1 (finetune)", "stage 2 (prune, finetune)", "evaluate, export, curves, latency")


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
                f"stage 2: {e} (timed on the CPU in {p.runtime} at batch {p.batch}). Stage 1 is kept: pass "
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
    print(f"{out}: {args.method} {arch['name']} {outcome(p, info, report)}, final val/acc "
          f"{fin['val']:.4f} test/acc {fin['test']:.4f} [{time.perf_counter() - t0:.0f} s]")
    return 0


def outcome(p: PruneSettings, info: dict, report: dict) -> str:
    """What a run reached, as its last line says it."""
    if p.weights:
        sparsity = report["weight_sparsity"]
        pattern = (f", pattern {'holds' if sparsity['nm']['satisfied'] else 'VIOLATED'}"
                   if p.nm else "")
        return (f"weight sparsity {sparsity['before']:.3f} -> {sparsity['reached']:.3f} "
                f"(target {p.target_text}{pattern})")
    macs = (f"{info['macs']:,} -> {report['macs']['after']:,} MACs, speed-up "
            f"{report['speed_up']['reached']:.3f}x")
    if p.latency:
        return (f"{macs} in MACs, measured latency speed-up "
                f"{report['latency_speed_up']['reached']:.3f}x (target {p.target_text})")
    return f"{macs} (target {p.target:g}x)"


def transfer_line(transfer: dict) -> str:
    """The line a run prints when its metanetwork was meta-trained on other architectures."""
    import networks

    trained = "; ".join(networks.describe_arch(a) for a in transfer["trained_on"])
    return (f"transfer: the metanetwork was meta-trained on {trained} and is applied to "
            f"{networks.describe_arch(transfer['applied_to'])}; its effect on another "
            "architecture is not the measured one (docs/pruning.md, \"Transfer\"); report.json "
            "records this under 'transfer'")
