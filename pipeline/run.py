"""``prune.py run`` (docs/pruning.md): prune one network to ``S`` x fewer MACs than its unpruned
architecture. Stage 1 (metanetwork feedforward, the identity, or sparse training) + finetune,
stage 2 prune + finetune, each a Lightning fit through ``pipeline.train.main``; then evaluation, export
(network file, ``torch.export`` program, ``curve.png``) and ``report.json``. Inputs are checked
before any training; finished stages are skipped."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from metaprune.errors import UserError

from .arguments import IMPORTANCES, METHODS, REGULARIZED
from .common import (
    atomic_write,
    check_stage_config,
    fit_stage,
    is_rank_zero,
    merged,
    read_config,
    refuse_stage_seeds,
    request_from,
    tensorboard_logger,
    wait_for,
    write_bytes,
    write_json,
)
from .console import Stages
from .summary import write_summary

# The first stage's name per method: everything after it is shared by all methods.
FIRST_STAGE = {"metanetwork": "feedforward_finetune", "none": "finetune", "sparse": "sparse"}
SECOND_STAGE = "prune_finetune"
# What `prune.py run` prints, one line each (pipeline.console.Stages; output in <out>/logs/)
RUN_STAGES = ("stage 1 (finetune)", "stage 2 (prune, finetune)", "evaluate, export, curves, latency")
# prune settings stage 1 does not read; the criterion is read by sparse training's regularizer
SECOND_STAGE_ONLY = ("speed_up", "max_pruning_ratio", "allow_other_criterion")
CRITERION_KEYS = ("max_pruning_ratio", "importance")  # what the curves prune by
REPORT, RUN_FILE, EVAL_FILE = "report.json", "run.json", "eval.json"
CURVE_SPLITS = ("test", "val")
# Batch sizes timed for report.json's measured speed-up (prune.latency_batch_sizes; [] skips):
# a default, not written into the stored settings, so runs from before it keep their settings.
LATENCY_BATCH_SIZES = (1, 64)
CLASSIFIER = "lightning_modules.ImageClassifier"


class PruneRunError(UserError):
    """Bad input to ``prune.py run``: the message names the problem and the fix."""


@dataclass
class PruneSettings:
    """The ``prune`` section of a prune.yaml (docs/pruning.md).

    Args:
        speed_up: the target, MACs of the unpruned architecture over MACs of the pruned
            network (``--speed_up`` overrides it; one of the two is required).
        dir: where runs go without ``--out``; empty: ``runs/prune/<the config's folder>``.
        iterative_steps: pruning steps to the target (and for the curves).
        input_size: one input's shape (channels, height, width).
        reg, alpha: the sparse method's regularizer (DepGraph's sparse learning).
        seed: seeds every stage (``--seed`` overrides it).
        bn_batches, bn_batch_size: BN statistics re-estimated on this many training batches
            before every curve point (0: raw curves).
        curve_range: the speed-ups the stage-1 curve area averages over.
        stage1_curve_split: the images the stage-1 curve is evaluated on: "test" (unset), so
            that its area, a reported outcome, never uses the val images that select
            checkpoints and settings; "val" when the area itself selects something (tuning).
            The final network's curve is a diagnostic and stays on val.
        curve_every: evaluate every N-th pruning step of a curve.
        importance: the pruning criterion of stage 2, the curves and (for ``sparse``) the
            regularizer (``networks.IMPORTANCES``); unset: l2, the paper's.
        allow_other_criterion: run a metanetwork meta-trained for another criterion than
            ``importance`` (refused unless true).
        max_pruning_ratio: the criterion's per-layer cap for stage 2 and the curves
            (``networks.criterion_pruner``); unset: 1, the paper's setting (no cap). Stage 1
            does not depend on it (``--reuse_first_stage`` across caps works).
        latency_batch_sizes: batch sizes of the measured speed-up (unset: 1 and 64; []: none).
        onnx: export and check ``network.onnx`` (unset: yes).
    """

    speed_up: float | None = None
    dir: str = ""
    iterative_steps: int = 200
    input_size: list[int] = field(default_factory=lambda: [3, 32, 32])
    reg: float = 5e-4
    alpha: float = 4.0
    seed: int = 0
    bn_batches: int = 8
    bn_batch_size: int = 128
    curve_range: tuple[float, float] = (2.0, 3.0)
    curve_every: int = 5
    stage1_curve_split: str | None = None
    importance: str | None = None
    allow_other_criterion: bool | None = None
    max_pruning_ratio: float | None = None
    latency_batch_sizes: list[int] | None = None
    onnx: bool | None = None

    @property
    def target(self) -> float:
        """The speed-up target (``load_prune_config`` makes sure there is one)."""
        assert self.speed_up is not None
        return self.speed_up

    @property
    def criterion(self) -> str:
        """``importance``, l2 when unset."""
        return self.importance or "l2"

    @property
    def curve_split(self) -> str:
        """``stage1_curve_split``, "test" when unset."""
        return self.stage1_curve_split or "test"

    @property
    def cap(self) -> float:
        """``max_pruning_ratio``, 1 when unset."""
        return 1.0 if self.max_pruning_ratio is None else self.max_pruning_ratio

    def record(self) -> dict:
        """The settings as stored in run.json and report.json; the options left unset are
        left out, so runs from before an option existed keep their stored settings."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class PruneConfig:
    """A prune.yaml: the run's settings and its stages' LightningCLI configs (``finetune``,
    stage 1, and ``final``, stage 2, are each merged over ``base``)."""

    prune: PruneSettings
    base: dict
    finetune: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)

    def record(self) -> dict:
        """Every section as stored in run.json."""
        return {"prune": self.prune.record(), "base": self.base, "finetune": self.finetune,
                "final": self.final}


@dataclass
class RunRequest:
    """One ``prune.py run``: its options as typed fields (the command line's ``--<field>``;
    ``prune_run`` is the same command for Python callers such as the demo).

    Args:
        config: configs/<task>/prune.yaml.
        network: the network to prune: this project's network file, or a Lightning checkpoint
            of ImageClassifier (or use ``arch`` with ``weights``).
        arch: with ``weights``: a registry/torchvision architecture name, or a user's
            ``nn.Module`` class as ``package.module:Class``.
        arch_kwargs: with ``arch``: its constructor arguments.
        weights: with ``arch``: a plain state_dict file.
        num_classes: with ``arch``: the class count (default the config data's num_classes).
        metanetwork: meta-training checkpoint (needed by method "metanetwork").
        method: "metanetwork" (feedforward + finetune), "none" (finetune only) or "sparse"
            (DepGraph sparse training).
        speed_up: the target; default ``prune.speed_up``.
        out: the run folder; default ``<prune.dir>/<network>_<method>_<S>x_seed<N>``.
        data_root: overrides ``data.init_args.root``.
        seed: seeds every stage; default ``prune.seed`` or 0.
        reuse_first_stage: a run folder of the same network, method, metanetwork, seed and
            config that differs only in the speed-up or the per-layer cap: stage 1 is taken
            from it.
        overrides: a nested mapping merged over the config file (command line
            ``--section.key VALUE``).
    """

    config: str
    network: str | None = None
    arch: str | None = None
    arch_kwargs: dict | None = None
    weights: str | None = None
    num_classes: int | None = None
    metanetwork: str | None = None
    method: str = "metanetwork"
    speed_up: float | None = None
    out: str | None = None
    data_root: str | None = None
    seed: int | None = None
    reuse_first_stage: str | None = None
    overrides: dict | None = None

    def __post_init__(self) -> None:
        if (self.network is None) == (self.arch is None) or \
                (self.arch is None) != (self.weights is None):
            raise PruneRunError("give the network to prune as --network FILE (this project's "
                                "network file or a Lightning checkpoint of ImageClassifier), or "
                                "as --arch NAME --weights FILE (a plain state_dict)")
        if self.arch_kwargs and self.arch is None:
            raise PruneRunError("--arch_kwargs goes with --arch NAME --weights FILE (a network file "
                                "records its own architecture arguments)")
        if self.method not in METHODS:
            raise PruneRunError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")

    @property
    def source(self) -> str:
        """The file the network comes from: ``network``, else ``weights``."""
        source = self.network or self.weights
        assert source is not None  # __post_init__ requires one of them
        return source


def load_prune_config(path: str | os.PathLike, speed_up: float | None = None,
                      seed: int | None = None, data_root: str | None = None,
                      overrides: dict | None = None) -> PruneConfig:
    """Read a prune.yaml and apply the command-line overrides (``prune.dir`` filled in)."""
    path = Path(path)
    where = f"prune config {str(path)!r}" + (" with the command-line overrides" if overrides else "")
    cfg = read_config(path, PruneConfig, PruneRunError, "prune", overrides=overrides)
    refuse_stage_seeds((cfg.base, cfg.finetune, cfg.final), where, PruneRunError,
                       "--seed (or prune.seed) seeds every stage")
    if not cfg.base.get("data"):
        raise PruneRunError(f"{where}: section 'base' needs a data section (a train.py fit config)")
    prune = cfg.prune
    prune.dir = prune.dir or f"runs/prune/{path.parent.name}"
    prune.speed_up = prune.speed_up if speed_up is None else float(speed_up)
    prune.seed = prune.seed if seed is None else int(seed)
    if prune.speed_up is None:
        raise PruneRunError(f"{where}: no speed-up target; set prune.speed_up or pass --speed_up")
    if not prune.speed_up > 1.0:
        raise PruneRunError(f"{where}: speed-up target {prune.speed_up:g} must be above 1 (a "
                            "factor of fewer MACs than the unpruned architecture, e.g. 2)")
    lo, hi = prune.curve_range
    if not 1.0 <= lo < hi:
        raise PruneRunError(f"{where}: prune.curve_range {[lo, hi]} must be [LO, HI] with "
                            "1 <= LO < HI, e.g. [2.0, 3.0]")
    if prune.importance is not None and prune.importance not in IMPORTANCES:
        raise PruneRunError(f"{where}: prune.importance {prune.importance!r} is unknown; use one of "
                            f"{list(IMPORTANCES)}")
    if prune.curve_split not in CURVE_SPLITS:
        raise PruneRunError(f"{where}: prune.stage1_curve_split {prune.stage1_curve_split!r} must "
                            f"be one of {list(CURVE_SPLITS)} (test: an outcome no selection "
                            "touched; val: when the curve area selects something)")
    if prune.max_pruning_ratio is not None and not 0.0 < prune.max_pruning_ratio <= 1.0:
        raise PruneRunError(f"{where}: prune.max_pruning_ratio {prune.max_pruning_ratio:g} must be "
                            "in (0, 1]: the largest fraction of a layer's channels pruning may "
                            "remove (leave it unset for no cap)")
    if data_root is not None:
        cfg.base["data"].setdefault("init_args", {})["root"] = data_root
    return cfg


def run_dir(cfg: PruneConfig, network: str | os.PathLike, method: str, out: str | None) -> Path:
    """``--out``, else ``<prune.dir>/<network file stem>_<method>_<S>x_seed<N>``."""
    if out:
        return Path(out)
    p = cfg.prune
    return Path(p.dir) / f"{Path(network).stem}_{method}_{p.target:g}x_seed{p.seed}"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()



def run_settings(cfg: PruneConfig, args: RunRequest) -> dict:
    """What defines a run (``run.json``): a run dir never mixes outputs of two settings."""
    source = args.source
    for what, value in (("network file", args.network), ("weights file", args.weights),
                        ("metanetwork checkpoint", args.metanetwork)):
        if value is not None and not Path(value).is_file():
            raise PruneRunError(f"{what} {value!r} does not exist; check the path")
    if args.method == "metanetwork" and not args.metanetwork:
        raise PruneRunError("--method metanetwork needs --metanetwork PATH (a meta-training "
                            "checkpoint); or use --method none / sparse")
    meta = args.metanetwork if args.method == "metanetwork" else None
    return json.loads(json.dumps({
        "method": args.method, "speed_up": cfg.prune.target, "seed": cfg.prune.seed,
        "network": str(Path(source).resolve()), "network_sha256": _sha256(Path(source)),
        **({"arch": {"name": args.arch, "num_classes": args.num_classes,
                     **({"kwargs": args.arch_kwargs} if args.arch_kwargs else {})}}
           if args.arch else {}),
        "metanetwork": str(Path(meta).resolve()) if meta else None,
        "metanetwork_sha256": _sha256(Path(meta)) if meta else None,
        "config": cfg.record()}))


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
    from lightning_modules import load_metanetwork, trained_criterion

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


def network_curve(get_cli: Callable[[], Any], network: Any, example: Any, base: int,
                  max_speed_up: float, p: PruneSettings, out: Path, label: str, chance: float,
                  split: str = "val") -> list:
    """``curve.csv``/``curve.png`` in ``out`` (computed once): ``split`` accuracy of ``network``
    pruned progressively without finetuning, up to ``max_speed_up``, every
    ``prune.curve_every``-th step after BN recalibration on ``prune.bn_batches`` training
    batches (pipeline/curve.py)."""
    from networks import accuracy_curve

    from .curve import calibration, evaluator, read_curves, save_curves

    if (out / "curve.csv").is_file() and (out / "curve.png").is_file():
        return next(iter(read_curves(out / "curve.csv").values()))
    dm = get_cli().datamodule
    dm.setup("validate")
    if split == "test":
        dm.setup("test")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    device = get_cli().trainer.strategy.root_device
    points = accuracy_curve(network.to(device).eval(), example.to(device), base,
                            evaluator(loader, device), max_speed_up,
                            p.iterative_steps, p.curve_every,
                            calibration(dm, p.bn_batches, p.bn_batch_size), p.cap, p.criterion)
    save_curves({label: points}, out, f"{label} (BN recalibrated on {p.bn_batches} batches)"
                if p.bn_batches else label, chance=chance, split=split)
    return points


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
    unpruned = networks.build(arch["name"], arch["num_classes"], **arch.get("kwargs", {}))
    return compare_latency(copy.deepcopy(network), unpruned, p.input_size, list(sizes), device,
                           min_run_time=0.25) if sizes else []




def stored_settings_check(out: Path, settings: dict) -> bool:
    """Compare ``settings`` with the run already in ``out``; True when that run is complete.

    Other settings are refused, except a changed ``final`` section before stage 2 finished:
    stage 1 does not depend on it, so it is kept and stage 2 starts over (a partial stage-2
    folder is moved aside to ``prune_finetune.superseded-<n>``, nothing is deleted)."""
    if not (out / RUN_FILE).is_file():
        return False
    stored = json.loads((out / RUN_FILE).read_text())
    if stored == settings:
        if (out / REPORT).is_file():
            print(f"done already: {out / REPORT}", file=sys.stderr)
            return True
        return False
    stage1 = lambda s: {**s, "config": {k: v for k, v in s["config"].items() if k != "final"}}  # noqa: E731
    if stage1(stored) == stage1(settings) and not (out / SECOND_STAGE / "network.pt").is_file():
        if (out / SECOND_STAGE).exists() and is_rank_zero():
            n = 1 + sum(1 for _ in out.glob(f"{SECOND_STAGE}.superseded-*"))
            (out / SECOND_STAGE).rename(out / f"{SECOND_STAGE}.superseded-{n}")
        print(f"{out}: section 'final' changed; stage 1 kept, stage 2 starts over", file=sys.stderr)
        return False
    diff = sorted(k for k in settings if stored.get(k) != settings[k])
    raise PruneRunError(
        f"run directory {str(out)!r} holds a run with other settings (differs in "
        f"{', '.join(diff)}); pass another --out, or delete the directory to start over")


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


def run_command(args: argparse.Namespace) -> int:
    """``prune.py run``: prune one network to one speed-up with one method."""
    return prune_run(request_from(args, RunRequest))


def prune_run(args: RunRequest) -> int:
    """Prune one network to one speed-up with one method (``prune.py run``); returns 0, also
    when the run was complete already. Writes ``<out>/report.json`` last."""
    t0 = time.perf_counter()
    cfg = load_prune_config(args.config, args.speed_up, args.seed, args.data_root, args.overrides)
    out = run_dir(cfg, args.source, args.method, args.out)
    settings = run_settings(cfg, args)
    if stored_settings_check(out, settings):
        return 0  # before anything imports torch: a finished run loads nothing

    with tempfile.TemporaryDirectory() as tmp:  # a converted input reaches --out after the checks
        given = input_network(args, cfg, Path(tmp))
        info = check_inputs(cfg, str(given), settings["metanetwork"])
        if args.network is None or given != Path(args.network):
            args.network = str(out / "input_network.pt")
        p, arch, first = cfg.prune, info["arch"], FIRST_STAGE[args.method]
        stage1, stage2 = stage_configs(cfg, args, out, arch)
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
    print(f"run: {args.method} to {p.target:g}x, outputs in {out}", file=sys.stderr)
    with console.stage(RUN_STAGES[0], 1, "fit") as step:
        run_stage(stage1, out / first / "network.pt", first)
        step()
    with console.stage(RUN_STAGES[1], 1, "fit") as step:
        run_stage(stage2, out / SECOND_STAGE / "network.pt", SECOND_STAGE)
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
    print(f"{out}: {args.method} {arch['name']} {info['macs']:,} -> {report['macs']['after']:,} "
          f"MACs, speed-up {report['speed_up']['reached']:.3f}x (target {p.target:g}x), final "
          f"val/acc {fin['val']:.4f} test/acc {fin['test']:.4f} [{time.perf_counter() - t0:.0f} s]")
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
        networks.save_network(network, out / "network.pt", arch=arch, metadata={
            "method": args.method, "speed_up": reached, "macs": macs, "base_macs": info["base_macs"],
            "val_acc": acc["final"]["val_acc"], "test_acc": acc["final"]["test_acc"],
            "trained_on": final_record["metadata"].get("trained_on", [])})
    if not (out / "network.pt2").is_file():
        export_program(network, example, out / "network.pt2")
    onnx = export_checked_onnx(network, example, out / "network.onnx") if p.onnx is not False else None
    step()
    accuracy = {k: ({"val": acc[k]["val_acc"], "test": acc[k]["test_acc"]} if k in acc else None)
                for k in ("original", "feedforward", "finetuned", "pruned", "final")}
    final_points = network_curve(get_cli, copy.deepcopy(network), example, info["base_macs"],
                                 2 * p.target, p, out, f"{args.method}: final network, no finetuning",
                                 1 / arch["num_classes"])
    # "Easier to prune": the stage-1 network's curve over prune.curve_range (docs/method.md).
    lo, hi = p.curve_range
    stage1_points = network_curve(get_cli, networks.load_network(finetuned)[0], example,
                                  info["base_macs"], hi, p, out / first,
                                  f"{args.method}: after stage 1, no finetuning ({p.curve_split})",
                                  1 / arch["num_classes"], p.curve_split)
    step()
    latency = measured_latency(network, arch, p)
    step()
    return {
        "format": "metaprune.prune_run/v1", "method": args.method,
        "network": settings["network"], "metanetwork": settings["metanetwork"],
        "architecture": arch,
        "speed_up": {"target": p.target, "reached": reached, "before": info["speed_up"],
                     "measured": {str(r["batch_size"]): r["speed_up_measured"] for r in latency}},
        "latency": latency,
        "onnx": onnx,
        "macs": {"unpruned": info["base_macs"], "before": info["macs"], "after": macs},
        "params": {"before": info["params"], "after": params},
        "accuracy": accuracy,
        "stage1_curve": {"range": [lo, hi], "area": networks.curve_area(stage1_points, lo, hi),
                         "split": p.curve_split, "bn_batches": p.bn_batches,
                         "csv": f"{first}/curve.csv"},
        "seeds": {"seed_everything": p.seed,
                  "data_split": (cfg.base["data"].get("init_args") or {}).get("seed")},
        "files": {"network": "network.pt", "exported": "network.pt2",
                  "onnx": "network.onnx" if onnx else None, "curve": "curve.png",
                  "curve_csv": "curve.csv", "stage1_curve": f"{first}/curve.png",
                  "stages": {k: str(Path(f).resolve()) for k, f in files.items()}},
        "config": {"prune": p.record(), "stages": stages},
        "_points": {"stage1": stage1_points, "final": final_points},
    }

