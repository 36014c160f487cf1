"""The two Lightning stages of ``prune.py run``: the input network converted and checked, each
stage's LightningCLI config built, stage 1 reused from a run that differs only in what stage 2
reads, and each stage fitted unless its network exists."""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

from .common import (
    fit_stage,
    merged,
    tensorboard_logger,
    wait_for,
    write_bytes,
    write_json,
)
from .options import REGULARIZED
from .run_config import (
    CLASSIFIER,
    CRITERION_KEYS,
    EVAL_FILE,
    FIRST_STAGE,
    RUN_FILE,
    SECOND_STAGE,
    SECOND_STAGE_ONLY,
    PruneConfig,
    PruneRunError,
    PruneSettings,
    RunRequest,
)


def input_network(args: RunRequest, cfg: PruneConfig, folder: Path) -> Path:
    """The network to prune as this project's network file: ``--network`` in that format as
    it is; a Lightning checkpoint of ``ImageClassifier`` (pruned or not), or ``--arch NAME
    --weights FILE`` (a plain state_dict, loaded with weights_only=True), converted into
    ``folder/input_network.pt``."""
    import networks

    if args.arch is not None:
        classes = args.num_classes or (cfg.base["data"].get("init_args") or {}).get("num_classes")
        if not isinstance(classes, int):
            raise PruneRunError("--arch needs the class count: pass --num_classes N (the config's "
                                "data does not set num_classes)")
        state = networks.safe_load(args.source, "weights file")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        arch, pruned, source = {"name": args.arch, "num_classes": classes,
                                "kwargs": dict(args.arch_kwargs or {})}, False, \
            f"weights file {str(args.weights)!r}"
    else:
        record = networks.safe_load(args.source, "network file")
        hp = record.get("hyper_parameters") if isinstance(record, dict) else None
        if not (isinstance(hp, dict) and "network" in hp and "state_dict" in record):
            return Path(args.source)  # this project's format (load_network explains anything else)
        arch = {"name": hp["network"], "num_classes": int(hp["num_classes"]),
                "kwargs": dict(hp.get("network_kwargs") or {})}
        state = {k.removeprefix("network."): v for k, v in record["state_dict"].items()
                 if k.startswith("network.")}
        pruned, source = True, f"Lightning checkpoint {str(args.network)!r}"
    try:
        model = networks.network_from_state_dict(arch, state, source, pruned=pruned)
    except networks.CheckpointError:
        raise
    except ValueError as e:  # an unknown --arch
        raise PruneRunError(f"{source}: {e}") from e
    return networks.save_network(model, folder / "input_network.pt", arch,
                                 metadata={"source": str(args.weights or args.network)})


def check_inputs(cfg: PruneConfig, network_path: str, metanetwork_path: str | None) -> dict:
    """Every check that can fail before training, so bad input costs seconds, not epochs.

    Returns ``{"arch", "base_macs", "macs", "params", "speed_up"}`` of the input network."""
    import networks
    from graph import check_layout, network_graph
    from lightning_modules import load_metanetwork, trained_criterion, trained_sparsity

    p = cfg.prune
    example = networks.example_input(p.input_size)
    network, record = networks.load_network(network_path)  # missing, corrupt, not a network
    arch, source = record["arch"], f"network file {network_path!r}"
    classes = (cfg.base["data"].get("init_args") or {}).get("num_classes")
    if isinstance(classes, int) and classes != arch["num_classes"]:
        raise PruneRunError(f"{source} has {arch['num_classes']} classes but the config's data "
                            f"has num_classes={classes}; use the config of the network's task")
    data = cfg.base["data"]
    if str(data.get("class_path", "")).endswith("ImageDataModule"):  # data found, no leakage
        from datamodules import ImageDataModule

        ImageDataModule(**(data.get("init_args") or {})).check_held_out(
            {source: record["metadata"].get("trained_on") or []})
    if metanetwork_path is not None:
        if trained_sparsity(metanetwork_path) != "channels":
            raise PruneRunError(
                f"metanetwork checkpoint {metanetwork_path!r} was meta-trained for weight "
                "sparsity (model.init_args.sparsity: weights), but prune.py run prunes channels; "
                "use a metanetwork meta-trained with sparsity: channels (the default)")
        trained_for = trained_criterion(metanetwork_path)
        if trained_for != p.criterion and not p.allow_other_criterion:
            raise PruneRunError(
                f"metanetwork checkpoint {metanetwork_path!r} was meta-trained for the pruning "
                f"criterion {trained_for!r}, but this run prunes by {p.criterion!r} "
                "(prune.importance); set prune.importance to match, or prune.allow_other_criterion: "
                "true to run it anyway")
        metanetwork = load_metanetwork(metanetwork_path)
        graph = network_graph(network.eval(), example, source, metanetwork.graph_options)
        check_layout(metanetwork, graph, f"metanetwork checkpoint {metanetwork_path!r}", source)
    base, macs = networks.base_macs(arch, example), networks.count_macs(network, example)
    target, current = p.target, base / macs
    if target <= current:
        raise PruneRunError(
            f"speed-up target {target:g}x is not above the network's current speed-up "
            f"{current:.3f}x ({source} is already pruned: {macs:,} of {base:,} MACs of the "
            f"unpruned {arch['name']}); pass a --speed_up above {current:.3f}")
    # Dry run on a copy: an unreachable target fails now rather than after the first finetune.
    # (The real prune acts on finetuned weights; reachability depends on the structure.)
    try:
        networks.prune_to_speed_up(copy.deepcopy(network).eval(), example, target, base,
                                   p.iterative_steps, max_pruning_ratio=p.cap,
                                   importance=p.criterion)
    except ValueError as e:
        raise PruneRunError(
            f"speed-up target {target:g}x is unreachable for {source}: {e}. Lower --speed_up, "
            "or raise prune.iterative_steps") from e
    return {"arch": arch, "base_macs": base, "macs": macs,
            "params": networks.count_params(network), "speed_up": current}


def run_stage_config(cfg: PruneConfig, section: str, out: Path, stage: str, weights: str | os.PathLike,
                     arch: dict, callbacks: list[dict]) -> dict:
    """The LightningCLI config of one stage: ``section`` merged over ``base``, the classifier
    built from ``weights`` (architecture from the file), logs in ``<out>/<stage>``."""
    config = merged(cfg.base, getattr(cfg, section))
    config["seed_everything"] = cfg.prune.seed
    model = config.setdefault("model", {})
    model.setdefault("class_path", CLASSIFIER)
    model.setdefault("init_args", {}).update(
        network=arch["name"], num_classes=arch["num_classes"],
        network_kwargs=dict(arch["kwargs"]), weights=str(weights))
    trainer = config.setdefault("trainer", {})
    trainer["logger"] = tensorboard_logger(out, version=stage)
    trainer["default_root_dir"] = str(out / stage)
    trainer["callbacks"] = list(trainer.get("callbacks") or [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
         "init_args": {"logging_interval": "epoch"}}]) + callbacks
    return config


def _first_stage_settings(settings: dict) -> dict:
    """A run's settings minus those only stage 2 and the curves read (the speed-up target, the
    per-layer cap, the criterion unless sparse training regularizes by it): what stage 1
    depends on."""
    out = copy.deepcopy(settings)
    out.pop("speed_up", None)
    for key in SECOND_STAGE_ONLY + (("importance",) if settings["method"] != "sparse" else ()):
        out["config"]["prune"].pop(key, None)
    return out


def reuse_first_stage(source: Path, settings: dict, out: Path, stage: str) -> None:
    """Copy stage 1's output networks from ``source``, a run whose settings differ from
    ``settings`` in the speed-up target, the per-layer cap and (but for ``sparse``) the
    criterion at most (stage 1 reads none of them): pruning one finetuned network to several
    targets, or under another cap or criterion, then trains stage 1 once, budgets unchanged. Its
    curve is copied only under the same cap and criterion (the curve prunes)."""
    stored = source / RUN_FILE
    if not stored.is_file():
        raise PruneRunError(f"--reuse_first_stage {str(source)!r} is not a prune run directory "
                            f"(no {RUN_FILE}); pass the --out of an earlier `prune.py run`")
    other = json.loads(stored.read_text())
    if _first_stage_settings(other) != _first_stage_settings(settings):
        mine, theirs = _first_stage_settings(settings), _first_stage_settings(other)
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        raise PruneRunError(f"--reuse_first_stage {str(source)!r} ran with other settings (differs "
                            f"in {', '.join(diff)}); only the speed-up target, "
                            "prune.max_pruning_ratio and (but for sparse) prune.importance may "
                            "differ")
    if not (source / stage / "network.pt").is_file():
        raise PruneRunError(f"--reuse_first_stage {str(source)!r} has not finished stage 1 "
                            f"({stage}/network.pt is missing); finish that run first")
    same_cap = all(other["config"]["prune"].get(k) == settings["config"]["prune"].get(k)
                   for k in CRITERION_KEYS)
    # network.pt last: it marks stage 1 done; the curve prunes, so another cap gives another one
    names = [*(("curve.csv", "curve.png") if same_cap else ()), "feedforward.pt", "network.pt"]
    for name in names:
        if (source / stage / name).is_file():
            write_bytes(out / stage / name, (source / stage / name).read_bytes())
    if (source / EVAL_FILE).is_file() and not (out / EVAL_FILE).is_file():
        shared = {k: v for k, v in json.loads((source / EVAL_FILE).read_text()).items()
                  if k in ("original", "feedforward", "finetuned")}
        write_json(out / EVAL_FILE, shared)
    print(f"stage {stage} reused from {source}", file=sys.stderr)


def run_stage(config: dict, output: Path, name: str) -> Path:
    """Fit one stage unless its output network file exists (a killed fit resumes)."""
    if output.is_file():
        print(f"stage {name} done already: {output}", file=sys.stderr)
        return output
    fit_stage(config)
    wait_for(output)
    if not output.is_file():
        raise RuntimeError(f"stage {name} finished without writing {output}")
    return output


def stage_configs(cfg: PruneConfig, args: RunRequest, out: Path, arch: dict) -> tuple[dict, dict]:
    """The two Lightning stages of a run: stage 1 (feedforward + finetune, finetune, or sparse
    training) and stage 2 (prune to S against the unpruned architecture + finetune)."""
    p, first = cfg.prune, FIRST_STAGE[args.method]
    extra: list[dict] = []
    if args.method == "metanetwork":
        extra = [{"class_path": "callbacks.MetanetworkFeedforward",
                  "init_args": {"checkpoint": str(args.metanetwork), "input_size": p.input_size}},
                 {"class_path": "callbacks.SaveNetwork", "init_args": {"filename": "feedforward.pt"}}]
    elif args.method == "sparse":
        if p.criterion not in REGULARIZED:
            raise PruneRunError(f"--method sparse: prune.importance {p.criterion!r} has no "
                                "sparse-training regularizer in torch_pruning; use one of "
                                f"{list(REGULARIZED)}, or --method none")
        extra = [{"class_path": "callbacks.SparseTraining",
                  "init_args": {"reg": p.reg, "alpha": p.alpha, "input_size": p.input_size,
                                **criterion_args(p)}}]
    stage1 = run_stage_config(cfg, "finetune", out, first, args.source, arch, extra)
    prune_cb = [{"class_path": "callbacks.PruneToSpeedUp",
                 "init_args": {"speed_up": p.target, "iterative_steps": p.iterative_steps,
                               "input_size": p.input_size, **criterion_args(p),
                               **({"max_pruning_ratio": p.cap} if p.cap < 1 else {})}},
                {"class_path": "callbacks.SaveNetwork", "init_args": {"filename": "pruned.pt"}}]
    stage2 = run_stage_config(cfg, "final", out, SECOND_STAGE, out / first / "network.pt", arch,
                              prune_cb)
    return stage1, stage2


def criterion_args(p: PruneSettings) -> dict:
    """The callbacks' ``importance`` argument when the config sets one (unset: their default,
    l2, and the stage configs of earlier runs stay as they were)."""
    return {"importance": p.importance} if p.importance is not None else {}

