"""The settings of ``prune.py run`` (docs/pruning.md) and their checks: the prune.yaml schema
(``PruneConfig``), the command's options (``RunRequest``), the run folder and what defines a
run (``run.json``), and the file names a run folder holds."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from metaprune.errors import UserError

from .common import (
    is_rank_zero,
    read_config,
    refuse_stage_seeds,
)
from .options import (
    NM,
    Importance,
    OptionError,
    PruningCap,
    RunRequest,
    Runtime,
    SparsityScope,
    SpeedUp,
    WeightFraction,
    nm_pair,
)

# The first stage's name per method: everything after it is shared by all methods.
FIRST_STAGE = {"metanetwork": "feedforward_finetune", "none": "finetune", "sparse": "sparse"}
SECOND_STAGE = "prune_finetune"
# prune settings stage 1 does not read; the criterion is read by sparse training's regularizer
SECOND_STAGE_ONLY = ("speed_up", "max_pruning_ratio", "allow_other_criterion", "round_to")
# what the report measures and exports after the stages; no stage reads them
REPORT_ONLY = ("latency_batch_sizes", "onnx", "program")
CRITERION_KEYS = ("max_pruning_ratio", "importance")  # what the curves prune by
# The targets of a run: a speed-up (channels removed; in MACs or in measured latency) or a
# weight sparsity (weights zeroed), one per run; stage 1 reads none of them.
TARGET_KEYS = ("speed_up", "weight_sparsity", "nm", "latency_speed_up")
WEIGHT_TARGETS = ("weight_sparsity", "nm")
# what a latency target is measured with besides its value (part of the target)
LATENCY_KEYS = ("latency_speed_up", "latency_batch", "latency_runtime")
# weight runs: what the stage-1 curve (magnitude, in sparsity) is computed with
SPARSITY_CURVE_KEYS = ("sparsity_scope", "sparsity_exclude", "sparsity_range", "sparsity_step")
SPARSITY_RANGE, SPARSITY_STEP = (0.5, 0.9), 0.05  # their defaults (docs/decisions.md)
REPORT, RUN_FILE, EVAL_FILE = "report.json", "run.json", "eval.json"
# Batch sizes timed for report.json's measured speed-up (prune.latency_batch_sizes; [] skips):
# a default, not written into the stored settings, so runs from before it keep their settings.
LATENCY_BATCH_SIZES = (1, 64)
CLASSIFIER = "lightning_modules.ImageClassifier"


class PruneRunError(UserError):
    """Bad input to ``prune.py run``: the message names the problem and the fix."""


@dataclass
class PruneSettings:
    """The ``prune`` section of a prune.yaml (docs/pruning.md).

    A run has one target: ``speed_up`` or ``latency_speed_up`` (channels removed), or
    ``weight_sparsity`` or ``nm`` (weights zeroed, the network keeps its shape). A command-line
    target (``--speed_up``, ``--latency_speed_up``, ``--weight_sparsity``, ``--nm``) replaces
    the file's, whichever kind it is.

    Args:
        speed_up: the target, MACs of the unpruned architecture over MACs of the pruned
            network.
        latency_speed_up: the target, the measured forward latency of the unpruned
            architecture over that of the pruned network, timed on the CPU at
            ``latency_batch`` while stage 2 prunes (``networks.prune_to_latency``); a channel
            run in every other respect (curves in MACs).
        latency_batch: the batch size a ``latency_speed_up`` target is timed at (unset: 1).
        latency_runtime: what a ``latency_speed_up`` target is timed in (unset: ``torch``,
            PyTorch eager; ``onnxruntime``: the network exported to ONNX and run by ONNX
            Runtime, as it would be served); the report's measured speed-ups use it too.
        round_to: every channel run's stage 2 keeps the width of every layer it prunes a
            multiple of this (e.g. 8, as fast kernels like); unset: any width; ``auto``: the
            multiple of 1, 2, 4, 8, 16 chosen by measurement in stage 2 (timed at
            ``latency_batch`` in ``latency_runtime``; ``networks.choose_round_to``). The curves
            do not read it.
        weight_sparsity: the target, in (0, 1): the fraction of zero weights over the prunable
            layers (every convolution and dense layer but ``sparsity_exclude``), the smallest
            ``|w|`` zeroed (``sparsity_scope``).
        nm: the target ``[N, M]``: in every run of M consecutive weights along a layer's input
            channels the N largest ``|w|`` stay (``[2, 4]``: what sparse tensor cores run); a
            prunable layer whose input channels per output are not a multiple of M stays dense
            (named in the report).
        sparsity_scope: weight runs: ``global`` (unset: one magnitude threshold over all
            prunable layers, as channels are ranked globally) or ``layer`` (the same fraction in
            each); also the stage-1 curve's.
        sparsity_exclude: weight runs: module paths (``named_modules``) left dense, e.g.
            ``[fc]``; unset: none (every convolution and dense layer is prunable).
        sparsity_range: weight runs: the weight sparsities the stage-1 curve area averages over
            (unset: [0.5, 0.9]).
        sparsity_step: weight runs: the curves' spacing in weight sparsity (unset: 0.05).
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
        program: export the ``torch.export`` program ``network.pt2`` (unset: yes; false saves
            its tracing, a second or more per run, where only ``network.pt`` is wanted).
    """

    speed_up: Optional[SpeedUp] = None
    weight_sparsity: Optional[WeightFraction] = None
    nm: Optional[NM] = None
    latency_speed_up: Optional[SpeedUp] = None
    latency_batch: Optional[PositiveInt] = None
    latency_runtime: Optional[Runtime] = None
    round_to: Optional[Union[PositiveInt, Literal["auto"]]] = None
    dir: str = ""
    iterative_steps: PositiveInt = 200
    input_size: list[PositiveInt] = field(default_factory=lambda: [3, 32, 32])
    reg: NonNegativeFloat = 5e-4
    alpha: PositiveFloat = 4.0
    seed: int = 0
    bn_batches: NonNegativeInt = 8
    bn_batch_size: PositiveInt = 128
    curve_range: tuple[float, float] = (2.0, 3.0)
    curve_every: PositiveInt = 5
    stage1_curve_split: Optional[Literal["test", "val"]] = None
    importance: Optional[Importance] = None
    allow_other_criterion: Optional[bool] = None
    max_pruning_ratio: Optional[PruningCap] = None
    latency_batch_sizes: Optional[list[PositiveInt]] = None
    onnx: Optional[bool] = None
    program: Optional[bool] = None
    sparsity_scope: Optional[SparsityScope] = None
    sparsity_exclude: Optional[list[str]] = None
    sparsity_range: Optional[tuple[float, float]] = None
    sparsity_step: Optional[WeightFraction] = None

    @property
    def target(self) -> float:
        """The MACs speed-up target of a channel run (``load_prune_config`` makes sure there is
        one; a latency run has none: ``latency``)."""
        assert self.speed_up is not None
        return self.speed_up

    @property
    def latency(self) -> bool:
        """Whether the target is a measured latency speed-up (a channel run)."""
        return self.latency_speed_up is not None

    @property
    def batch(self) -> int:
        """``latency_batch``, 1 when unset."""
        return int(self.latency_batch or 1)

    @property
    def runtime(self) -> Runtime:
        """``latency_runtime``, torch when unset."""
        return self.latency_runtime or "torch"

    @property
    def weights(self) -> bool:
        """Whether the run zeroes weights (a weight sparsity or N:M target) instead of removing
        channels."""
        return self.weight_sparsity is not None or self.nm is not None

    @property
    def target_name(self) -> str:
        """The target as a run folder names it: ``2x``, ``w0.5`` (``w0.5-layer`` per layer),
        ``2of4`` or ``lat1.5b1`` (latency speed-up 1.5 at batch 1; ``lat1.5b1-ort`` timed in
        ONNX Runtime)."""
        if self.latency_speed_up is not None:
            return f"lat{self.latency_speed_up:g}b{self.batch}" + \
                ("-ort" if self.runtime == "onnxruntime" else "")
        if self.nm is not None:
            return f"{self.nm[0]}of{self.nm[1]}"
        if self.weight_sparsity is not None:
            return f"w{self.weight_sparsity:g}" + ("-layer" if self.scope == "layer" else "")
        return f"{self.target:g}x"

    @property
    def target_text(self) -> str:
        """The target in words, for the console."""
        if self.latency_speed_up is not None:
            return (f"latency speed-up {self.latency_speed_up:g}x (CPU, "
                    f"{'ONNX Runtime, ' if self.runtime == 'onnxruntime' else ''}batch {self.batch})")
        if self.nm is not None:
            return f"{self.nm[0]}:{self.nm[1]} weight sparsity"
        if self.weight_sparsity is not None:
            return f"weight sparsity {self.weight_sparsity:g} ({self.scope})"
        return f"{self.target:g}x"

    @property
    def scope(self) -> str:
        """``sparsity_scope``, global when unset."""
        return self.sparsity_scope or "global"

    @property
    def exclude(self) -> list[str]:
        """``sparsity_exclude``, none when unset."""
        return list(self.sparsity_exclude or [])

    @property
    def weight_range(self) -> tuple[float, float]:
        """``sparsity_range``, [0.5, 0.9] when unset."""
        lo, hi = self.sparsity_range or SPARSITY_RANGE
        return float(lo), float(hi)

    @property
    def weight_step(self) -> float:
        """``sparsity_step``, 0.05 when unset."""
        return float(self.sparsity_step or SPARSITY_STEP)

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


def load_prune_config(path: str | os.PathLike, speed_up: float | None = None,
                      seed: int | None = None, data_root: str | None = None,
                      overrides: dict | None = None, weight_sparsity: float | None = None,
                      nm: tuple[int, int] | list[int] | None = None,
                      latency_speed_up: float | None = None,
                      latency_batch: int | None = None) -> PruneConfig:
    """Read a prune.yaml and apply the command-line overrides (``prune.dir`` filled in). A
    target given here (``speed_up``, ``weight_sparsity``, ``nm`` or ``latency_speed_up``, at
    most one) replaces the file's; without one the file must set exactly one. ``latency_batch``
    (with a latency target) replaces ``prune.latency_batch``."""
    path = Path(path)
    where = f"prune config {str(path)!r}" + (" with the command-line overrides" if overrides else "")
    cfg = read_config(path, PruneConfig, PruneRunError, "prune", overrides=overrides)
    refuse_stage_seeds((cfg.base, cfg.finetune, cfg.final), where, PruneRunError,
                       "--seed (or prune.seed) seeds every stage")
    if not cfg.base.get("data"):
        raise PruneRunError(f"{where}: section 'base' needs a data section (a train.py fit config)")
    prune = cfg.prune
    prune.dir = prune.dir or f"runs/prune/{path.parent.name}"
    prune.seed = prune.seed if seed is None else int(seed)
    try:
        choose_target(prune, where, speed_up, weight_sparsity, nm, latency_speed_up, latency_batch)
    except OptionError as e:
        raise PruneRunError(str(e)) from None
    lo, hi = prune.curve_range
    if not 1.0 <= lo < hi:
        raise PruneRunError(f"{where}: prune.curve_range {[lo, hi]} must be [LO, HI] with "
                            "1 <= LO < HI, e.g. [2.0, 3.0]")
    lo, hi = prune.weight_range
    if not 0.0 <= lo < hi < 1.0:
        raise PruneRunError(f"{where}: prune.sparsity_range {[lo, hi]} must be [LO, HI] with "
                            "0 <= LO < HI < 1, e.g. [0.5, 0.9]")
    if data_root is not None:
        cfg.base["data"].setdefault("init_args", {})["root"] = data_root
    return cfg


def choose_target(prune: PruneSettings, where: str, speed_up: float | None = None,
                  weight_sparsity: float | None = None,
                  nm: tuple[int, int] | list[int] | None = None,
                  latency_speed_up: float | None = None,
                  latency_batch: int | None = None) -> None:
    """Leave ``prune`` with exactly one target: the one given (at most one: the command line's,
    which replaces the file's of any kind), else the file's only one; refused in one line
    otherwise, naming what was set. A latency target's batch (``latency_batch``, else the
    file's, else 1) is written into ``prune.latency_batch``, so the run records it."""
    from .options import one_target

    one_target(speed_up, weight_sparsity, nm, latency_speed_up)
    given = (speed_up, weight_sparsity, nm, latency_speed_up)
    if any(t is not None for t in given):
        prune.speed_up = None if speed_up is None else float(speed_up)
        prune.weight_sparsity = None if weight_sparsity is None else float(weight_sparsity)
        prune.nm = nm_pair(nm)
        prune.latency_speed_up = None if latency_speed_up is None else float(latency_speed_up)
    else:
        set_ = [f"prune.{k} {getattr(prune, k)}" for k in TARGET_KEYS
                if getattr(prune, k) is not None]
        if not set_:
            raise PruneRunError(f"{where}: no target; set prune.speed_up or "
                                "prune.latency_speed_up (channels removed), prune.weight_sparsity "
                                "or prune.nm (weights zeroed), or pass --speed_up, "
                                "--latency_speed_up, --weight_sparsity or --nm")
        if len(set_) > 1:
            raise PruneRunError(f"{where}: {' and '.join(set_)} are two targets; a run has one: "
                                "keep one in the file, or pass --speed_up, --latency_speed_up, "
                                "--weight_sparsity or --nm, which replaces the file's")
        prune.nm = nm_pair(prune.nm, f"{where}: prune.nm")
    if prune.latency_speed_up is None:
        if latency_batch is not None:
            raise PruneRunError(f"--latency_batch {latency_batch} goes with a latency target "
                                f"(--latency_speed_up L or prune.latency_speed_up); this run's "
                                f"target is {prune.target_text}")
        return
    prune.latency_batch = int(latency_batch or prune.latency_batch or 1)


def latency_target(p: PruneSettings) -> dict:
    """A latency run's target as its settings, report and network file record it (the runtime
    only when set, so the records of runs from before it stay as they were)."""
    return {"latency_speed_up": p.latency_speed_up, "latency_batch": p.batch,
            **({"latency_runtime": p.latency_runtime} if p.latency_runtime else {})}


def run_dir(cfg: PruneConfig, network: str | os.PathLike, method: str, out: str | None) -> Path:
    """``--out``, else ``<prune.dir>/<network file stem>_<method>_<target>_seed<N>``, the
    target as ``<S>x``, ``w<S>`` (``w<S>-layer``), ``<N>of<M>`` or ``lat<L>b<B>``."""
    if out:
        return Path(out)
    p = cfg.prune
    return Path(p.dir) / f"{Path(network).stem}_{method}_{p.target_name}_seed{p.seed}"


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
    p = cfg.prune
    target = {"weight_sparsity": p.weight_sparsity} if p.weight_sparsity is not None else \
        {"nm": list(p.nm)} if p.nm is not None else \
        latency_target(p) if p.latency else {"speed_up": p.target}
    return json.loads(json.dumps({
        "method": args.method, **target, "seed": cfg.prune.seed,
        "network": str(Path(source).resolve()), "network_sha256": _sha256(Path(source)),
        **({"arch": {"name": args.arch, "num_classes": args.num_classes,
                     **({"kwargs": args.arch_kwargs} if args.arch_kwargs else {})}}
           if args.arch else {}),
        "metanetwork": str(Path(meta).resolve()) if meta else None,
        "metanetwork_sha256": _sha256(Path(meta)) if meta else None,
        "config": cfg.record()}))


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

