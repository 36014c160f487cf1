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
    LATENCY_KEYS,
    REPORT_ONLY,
    RUN_FILE,
    SECOND_STAGE,
    SECOND_STAGE_ONLY,
    SPARSITY_CURVE_KEYS,
    TARGET_KEYS,
    WEIGHT_TARGETS,
    PruneConfig,
    PruneRunError,
    PruneSettings,
    RunRequest,
    latency_target,
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

    Returns ``{"arch", "base_macs", "macs", "params", "speed_up"}`` of the input network,
    ``"transfer"`` (:func:`transfer_of`) when a metanetwork is given, and
    for a weight run ``"weight_sparsity"`` (its zeros now) and ``"dense_layers"`` (the prunable
    layers an N:M pattern cannot cover, left dense)."""
    import networks
    from graph import check_layout, network_graph
    from lightning_modules import load_metanetwork

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
        check_metanetwork_kind(p, metanetwork_path)
        metanetwork = load_metanetwork(metanetwork_path)
        graph = network_graph(network.eval(), example, source, metanetwork.graph_options)
        check_layout(metanetwork, graph, f"metanetwork checkpoint {metanetwork_path!r}", source)
    base, macs = networks.base_macs(arch, example), networks.count_macs(network, example)
    info = {"arch": arch, "base_macs": base, "macs": macs,
            "params": networks.count_params(network), "speed_up": base / macs}
    if metanetwork_path is not None:
        info["transfer"] = transfer_of(arch, metanetwork_path)
    if p.weights:
        return {**info, **check_weight_target(p, network, source)}
    if p.latency:
        # Time is known only by timing: stage 2 measures it (the network as finetuned, on the
        # CPU at prune.latency_batch); the types checked the target (> 1) and the batch (>= 1).
        return info
    target, current = p.target, base / macs
    if target <= current:
        raise PruneRunError(
            f"speed-up target {target:g}x is not above the network's current speed-up "
            f"{current:.3f}x ({source} is already pruned: {macs:,} of {base:,} MACs of the "
            f"unpruned {arch['name']}); pass a --speed_up above {current:.3f}")
    # Dry run on a copy: an unreachable target fails now rather than after the first finetune.
    # (The real prune acts on finetuned weights; reachability depends on the structure.)
    try:
        dry = copy.deepcopy(network).eval()
        networks.prune_to_speed_up(dry, example, target, base, p.iterative_steps,
                                   pruner=round_to_pruner(p, dry, example),
                                   max_pruning_ratio=p.cap, importance=p.criterion)
    except ValueError as e:
        raise PruneRunError(
            f"speed-up target {target:g}x is unreachable for {source}: {e}. Lower --speed_up, "
            "or raise prune.iterative_steps") from e
    return info


def round_to_pruner(p: PruneSettings, network, example):
    """The criterion's pruner with ``prune.round_to`` for ``network``; None (the default pruner
    of ``networks.prune_to_speed_up``) when ``round_to`` is unset, or ``auto`` (stage 2 measures
    which multiple to use, and no rounding is among the candidates: the dry run's)."""
    import networks

    if p.round_to is None or p.round_to == "auto":
        return None
    return networks.criterion_pruner(network, example, p.iterative_steps, max_pruning_ratio=p.cap,
                                     importance=p.criterion, round_to=p.round_to)


def transfer_of(arch: dict, path: str) -> dict | None:
    """When the metanetwork checkpoint at ``path`` was meta-trained on other architectures than
    ``arch`` (another depth, width, class count or family), what it was trained on and what it
    is applied to; None when ``arch`` is among them, or the checkpoint predates the record. A
    transfer is allowed (the graph layouts match, ``check_layout``) but its effect is a
    measurement of its own, so the run says so and the report records it."""
    import networks
    from lightning_modules import trained_architectures

    trained = trained_architectures(path)
    applied = networks.plain_arch(arch)
    if trained is None or applied in trained:
        return None
    return {"trained_on": trained, "applied_to": applied}


def check_metanetwork_kind(p: PruneSettings, path: str) -> None:
    """A metanetwork meta-trained for what this run prunes (channels or weights, and for
    channels, the criterion): refused in one line otherwise, naming both and the fix."""
    from lightning_modules import trained_criterion, trained_sparsity

    trained = trained_sparsity(path)
    if trained != ("weights" if p.weights else "channels"):
        if p.weights:
            raise PruneRunError(
                f"metanetwork checkpoint {path!r} was meta-trained for channel pruning "
                f"(model.init_args.sparsity: channels), but this run zeroes weights "
                f"({p.target_text}); use a metanetwork meta-trained with sparsity: weights, or "
                "a --speed_up target to prune channels with this one")
        raise PruneRunError(
            f"metanetwork checkpoint {path!r} was meta-trained for weight sparsity "
            f"(model.init_args.sparsity: weights), but this run prunes channels (a speed-up "
            f"target, {p.target_text}); pass --weight_sparsity S or --nm [N,M] to zero weights "
            "with it, or use a metanetwork meta-trained with sparsity: channels (the default)")
    if p.weights:
        return  # weight sparsity ranks single weights by magnitude: no channel criterion
    trained_for = trained_criterion(path)
    if trained_for != p.criterion and not p.allow_other_criterion:
        raise PruneRunError(
            f"metanetwork checkpoint {path!r} was meta-trained for the pruning "
            f"criterion {trained_for!r}, but this run prunes by {p.criterion!r} "
            "(prune.importance); set prune.importance to match, or prune.allow_other_criterion: "
            "true to run it anyway")


def check_weight_target(p: PruneSettings, network, source: str) -> dict:
    """A weight target's checks on the input network: the excluded layers exist, some layer
    is prunable, an N:M pattern fits at least one of them, a sparsity is above the network's
    current one. Returns ``{"weight_sparsity", "dense_layers"}``."""
    from networks.sparsity import nm_dense_layers, sparse_layers, weight_sparsity

    unknown = [name for name in p.exclude if name not in dict(network.named_modules())]
    if unknown:
        raise PruneRunError(f"prune.sparsity_exclude {p.exclude}: {source} has no module named "
                            f"{unknown[0]!r}; use the names of network.named_modules(), e.g. "
                            f"{list(sparse_layers(network))[-1]!r}")
    layers = sparse_layers(network, tuple(p.exclude))
    if not layers:
        raise PruneRunError(f"{source} has no convolution or dense layer left to sparsify "
                            f"(prune.sparsity_exclude {p.exclude}); exclude fewer layers")
    current = weight_sparsity(network, tuple(p.exclude))
    dense: list[str] = []
    if p.nm is not None:
        n, m = p.nm
        dense = nm_dense_layers(network, m, tuple(p.exclude))
        if len(dense) == len(layers):
            raise PruneRunError(f"{n}:{m} sparsity fits no layer of {source}: no convolution or "
                                f"dense layer has a multiple of {m} input channels per output; "
                                "choose another M")
    elif p.weight_sparsity is not None and p.weight_sparsity <= current:
        raise PruneRunError(
            f"weight sparsity target {p.weight_sparsity:g} is not above the network's current "
            f"weight sparsity {current:.4f} ({source} already has that share of zero weights); "
            f"pass a --weight_sparsity above {current:.4f}")
    return {"weight_sparsity": current, "dense_layers": dense}


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


def run_kind(settings: dict) -> str:
    """``weights`` for a run with a weight-sparsity or N:M target, else ``channels`` (a
    speed-up in MACs or in measured latency)."""
    return "weights" if any(k in settings for k in WEIGHT_TARGETS) else "channels"


def _first_stage_settings(settings: dict) -> dict:
    """A run's settings minus those only stage 2, the curves and the report read (the target
    of either kind, the per-layer cap, the criterion, the weight curves' settings, ONNX and
    latency, but what sparse training regularizes by): what stage 1 depends on. Sparse
    training regularizes by the kind (groups or single weights), so for ``sparse`` the kind
    stays, and the criterion or the layers kept dense."""
    out = copy.deepcopy(settings)
    for key in TARGET_KEYS + LATENCY_KEYS:
        out.pop(key, None)
    if settings["method"] == "sparse":
        out["kind"] = run_kind(settings)
    # sparse training reads the criterion (channels) or the layers kept dense (weights)
    sparse = ("importance", "sparsity_exclude") if settings["method"] == "sparse" else ()
    for key in (SECOND_STAGE_ONLY + REPORT_ONLY + TARGET_KEYS + LATENCY_KEYS + ("importance",)
                + SPARSITY_CURVE_KEYS):
        if key not in sparse:
            out["config"]["prune"].pop(key, None)
    return out


def same_stage1_curve(settings: dict, other: dict) -> bool:
    """Whether the stage-1 curve of ``other`` is this run's: the same kind of curve (speed-up
    or weight sparsity), pruned by the same settings."""
    keys = SPARSITY_CURVE_KEYS if run_kind(settings) == "weights" else CRITERION_KEYS
    return run_kind(settings) == run_kind(other) and all(
        other["config"]["prune"].get(k) == settings["config"]["prune"].get(k) for k in keys)


def _differing_keys(mine: dict, theirs: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, e.g. ``config.final.trainer.max_epochs``; a nested
    mapping is named by its own differing keys, not as a whole."""
    out: list[str] = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def reuse_first_stage(source: Path, settings: dict, out: Path, stage: str) -> None:
    """Copy stage 1's output networks from ``source``, a run whose settings differ from
    ``settings`` in the target (of either kind, but for ``sparse``, whose regularizer depends
    on the kind), the per-layer cap, the weight curves' settings and (but for ``sparse``) the
    criterion and the layers kept dense at most (stage 1 reads none of them): pruning one
    finetuned network to several targets, or under another cap or criterion, then trains stage
    1 once, budgets unchanged. Its curve is copied only when it is this run's
    (``same_stage1_curve``: the curve prunes)."""
    stored = source / RUN_FILE
    if not stored.is_file():
        raise PruneRunError(f"--reuse_first_stage {str(source)!r} is not a prune run directory "
                            f"(no {RUN_FILE}); pass the --out of an earlier `prune.py run`")
    other = json.loads(stored.read_text())
    if _first_stage_settings(other) != _first_stage_settings(settings):
        mine, theirs = _first_stage_settings(settings), _first_stage_settings(other)
        diff = _differing_keys(mine, theirs)
        if "method" in diff and "kind" in diff:  # the kind of target matters to sparse only
            diff.remove("kind")
        raise PruneRunError(f"--reuse_first_stage {str(source)!r} ran with other settings (differs "
                            f"in {', '.join(diff)}); only the speed-up target (in MACs or "
                            "latency, or a weight sparsity target; for sparse, of the same kind), "
                            "prune.max_pruning_ratio, prune.round_to, prune.sparsity_scope, "
                            "_range and _step, what the report measures (prune.onnx, prune.program, "
                            "prune.latency_batch_sizes), "
                            "and (but for sparse) prune.importance and prune.sparsity_exclude "
                            "may differ")
    if not (source / stage / "network.pt").is_file():
        raise PruneRunError(f"--reuse_first_stage {str(source)!r} has not finished stage 1 "
                            f"({stage}/network.pt is missing); finish that run first")
    # network.pt last: it marks stage 1 done; the curve prunes, so another cap gives another one
    names = [*(("curve.csv", "curve.png") if same_stage1_curve(settings, other) else ()),
             "feedforward.pt", "network.pt"]
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


def stage_configs(cfg: PruneConfig, args: RunRequest, out: Path, arch: dict,
                  dense_layers: list[str] | None = None) -> tuple[dict, dict]:
    """The two Lightning stages of a run: stage 1 (feedforward + finetune, finetune, or sparse
    training) and stage 2 (prune to S against the unpruned architecture, or zero weights to the
    weight target, + finetune). ``dense_layers``: the prunable layers an N:M target leaves
    dense (``check_inputs``)."""
    p, first = cfg.prune, FIRST_STAGE[args.method]
    extra: list[dict] = []
    if args.method == "metanetwork":
        extra = [{"class_path": "callbacks.MetanetworkFeedforward",
                  "init_args": {"checkpoint": str(args.metanetwork), "input_size": p.input_size}},
                 {"class_path": "callbacks.SaveNetwork", "init_args": {"filename": "feedforward.pt"}}]
    elif args.method == "sparse" and p.weights:  # L1 on the weights magnitude pruning ranks
        extra = [{"class_path": "callbacks.SparseTraining",
                  "init_args": {"reg": p.reg, "input_size": p.input_size, "sparsity": "weights",
                                **({"exclude": p.exclude} if p.exclude else {})}}]
    elif args.method == "sparse":
        if p.criterion not in REGULARIZED:
            raise PruneRunError(f"--method sparse: prune.importance {p.criterion!r} has no "
                                "sparse-training regularizer in torch_pruning; use one of "
                                f"{list(REGULARIZED)}, or --method none")
        extra = [{"class_path": "callbacks.SparseTraining",
                  "init_args": {"reg": p.reg, "alpha": p.alpha, "input_size": p.input_size,
                                **criterion_args(p)}}]
    stage1 = run_stage_config(cfg, "finetune", out, first, args.source, arch, extra)
    stage2 = run_stage_config(cfg, "final", out, SECOND_STAGE, out / first / "network.pt", arch,
                              weight_callbacks(p, dense_layers or []) if p.weights else
                              prune_callbacks(p))
    return stage1, stage2


def prune_callbacks(p: PruneSettings) -> list[dict]:
    """Stage 2 of a channel run: prune to the speed-up (in MACs, or in latency measured on the
    stage's device, the CPU) in ``setup``, keep the pruned network. Only the keys a run sets
    are written, so the stage configs of earlier runs stay as they were."""
    target = latency_target(p) if p.latency else {"speed_up": p.target}
    return [{"class_path": "callbacks.PruneToSpeedUp",
             "init_args": {**target, "iterative_steps": p.iterative_steps,
                           "input_size": p.input_size, **criterion_args(p),
                           **({"max_pruning_ratio": p.cap} if p.cap < 1 else {}),
                           **({"round_to": p.round_to} if p.round_to is not None else {})}},
            {"class_path": "callbacks.SaveNetwork", "init_args": {"filename": "pruned.pt"}}]


def weight_callbacks(p: PruneSettings, dense_layers: list[str]) -> list[dict]:
    """Stage 2 of a weight run: the weights masked at the start of epoch 0 (magnitude or N:M,
    masks kept through the finetune and folded into plain weights at its end), and the network
    right after masking kept as ``pruned.pt``."""
    target = {"nm": list(p.nm)} if p.nm is not None else \
        {"sparsity": p.weight_sparsity, "scope": p.scope}
    exclude = p.exclude + [name for name in dense_layers if name not in p.exclude]
    return [{"class_path": "callbacks.WeightSparsity",
             "init_args": {**target, "exclude": exclude, "epoch": 0, "module": "network"}},
            {"class_path": "callbacks.SaveNetwork",
             "init_args": {"filename": "pruned.pt", "when": "train_start"}}]


def criterion_args(p: PruneSettings) -> dict:
    """The callbacks' ``importance`` argument when the config sets one (unset: their default,
    l2, and the stage configs of earlier runs stay as they were)."""
    return {"importance": p.importance} if p.importance is not None else {}

