"""The options of every ``prune.py`` subcommand, each declared once: a dataclass whose fields are
the command line's ``--<field>`` (jsonargparse builds the parser from it, ``pipeline.cli``) and
whose instance is what the command runs on (Python callers such as the demo build it directly).

The field's type is its check: a constrained type (``SpeedUp``, ``PositiveInt``, ...) is checked
once, by the parser, before anything loads, and a bad value is refused in one line naming the
option. Checks across fields live in ``__post_init__``. Torch-free, like everything the parser
imports, so that ``prune.py <command> --help`` answers at once.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeAlias, Union, get_args

from jsonargparse.typing import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from metaprune.errors import UserError

Method = Literal["metanetwork", "none", "sparse"]
METHODS: tuple[str, ...] = get_args(Method)
# the pruning criteria of networks.IMPORTANCES by name (l2 is the paper's), listed here so that
# the command line needs no torch; a test keeps the two equal
Importance = Literal["l2", "l1", "fpgm", "lamp", "bn_scale"]
IMPORTANCES: tuple[str, ...] = get_args(Importance)
# what a latency is timed in (networks.latency.RUNTIMES; a test keeps the two equal)
Runtime = Literal["torch", "onnxruntime"]
REGULARIZED = ("l2", "bn_scale")  # those with a torch_pruning sparse-training regularizer
# Adaptive BN before every curve point (networks.recalibrate_batchnorm): 8 batches of 128
# training images re-estimate a small network's statistics (docs/pruning.md has the measured
# effect); 0 gives the raw curve.
BN_BATCHES, BN_BATCH_SIZE = 8, 128
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "demo.yaml"
DEFAULT_DATA = "data/cifar10"    # the demo downloads CIFAR-10 here without a data root
# Every command's data root defaults to this environment variable: one way to point them all at
# a data set.
DATA_ENV = "METAPRUNE_DATA"

# Constrained numbers: the parser checks them (a type checker sees plain numbers' aliases).
# MACs of the unpruned architecture over MACs after pruning: above 1.
SpeedUp: TypeAlias = restricted_number_type("SpeedUp", float, (">", 1.0))  # type: ignore[valid-type]
# The largest share of a layer's channels pruning may remove: (0, 1], 1 for no cap.
PruningCap: TypeAlias = restricted_number_type(  # type: ignore[valid-type]
    "PruningCap", float, [(">", 0.0), ("<=", 1.0)], join="and")
# The fraction of zero weights over the prunable convolutions and dense layers: in (0, 1)
# (jsonargparse's own type for that interval; a second name for it cannot be registered).
WeightFraction: TypeAlias = OpenUnitInterval
# N:M sparsity: the N largest of every M consecutive weights along the input channels stay (0 < N < M,
# checked with the pair: nm_pair).
NM = tuple[PositiveInt, PositiveInt]
# How magnitude weight sparsity ranks: one threshold over all prunable layers, or the same share in each.
SparsityScope = Literal["global", "layer"]
Shape = tuple[PositiveInt, PositiveInt, PositiveInt]  # one input: channels, height, width


class OptionError(UserError):
    """Options that do not go together; the message names them and the fix."""


def nm_pair(nm: Any, where: str = "--nm") -> tuple[int, int] | None:
    """``nm`` as ``(n, m)`` with ``0 < n < m``; None stays None. ``where`` names the option in
    the error."""
    if nm is None:
        return None
    n, m = (int(v) for v in nm)
    if not 0 < n < m:
        raise OptionError(f"{where} [{n}, {m}]: N:M sparsity keeps N of every M weights, so it "
                          "needs 0 < N < M, e.g. [2, 4]")
    return n, m


def one_target(speed_up: Any, weight_sparsity: Any, nm: Any, latency_speed_up: Any = None) -> None:
    """Refuse more than one of the four targets given on the command line."""
    given = [flag for flag, value in (("--speed_up", speed_up), ("--weight_sparsity", weight_sparsity),
                                      ("--nm", nm), ("--latency_speed_up", latency_speed_up))
             if value is not None]
    if len(given) > 1:
        raise OptionError(f"{' and '.join(given)} are two targets; a run has one: a speed-up "
                          "(channels removed: --speed_up S in MACs or --latency_speed_up L in "
                          "measured time) or a weight sparsity (--weight_sparsity S or --nm "
                          "[N,M], weights zeroed)")


def plain(value: Any) -> Any:
    """``value`` with the parser's constrained numbers (subclasses of int and float, which YAML
    cannot write) made plain ints and floats again, through lists, tuples, dicts and dataclasses."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: plain(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def data_root_from_env() -> str | None:
    """The default of every ``--data_root`` on the command line: ``$METAPRUNE_DATA`` when set
    (pipeline.cli fills it in; a Python caller's None stays None, so that the variable never
    overrides the data a config or the demo chose)."""
    return os.environ.get(DATA_ENV) or None


@dataclass
class ZooOptions:
    """Train, prune and finetune one zoo member (docs/zoo.md). Any key of the zoo config can also
    be overridden as --SECTION.KEY VALUE, e.g. --pretrain.trainer.max_epochs 1.

    Args:
        config: configs/<task>/zoo.yaml.
        seed: member seed (seeds both stages); default zoo.seed or 0.
        zoo_dir: zoo directory; default zoo.dir.
        data_root: the image data (overrides data.init_args.root); default $METAPRUNE_DATA.
        pretrained: network file to start from; skips stage 1 (overrides zoo.pretrained).
        speed_up: initial pruning target above 1 (overrides zoo.speed_up); with variant.
        variant: name of another member of the same trained network (e.g. s1.6 for speed_up
            1.6): member seed<N>-<variant>, stage 1 shared.
        overrides: a nested mapping merged over the config file (the command line's
            --SECTION.KEY VALUE).
    """

    config: str
    seed: Optional[int] = None
    zoo_dir: Optional[str] = None
    data_root: Optional[str] = None
    pretrained: Optional[str] = None
    speed_up: Optional[SpeedUp] = None
    variant: Optional[str] = None
    overrides: Optional[dict] = None


@dataclass
class RunRequest:
    """Prune a network to a speed-up (channels removed, in MACs or in measured latency) or to a
    weight sparsity (weights zeroed, magnitude or N:M): metanetwork, none or sparse, finetunes,
    export (docs/pruning.md). Any
    key of the prune config can also be overridden as --SECTION.KEY VALUE (VALUE read as YAML),
    e.g. --prune.max_pruning_ratio 0.67 --final.trainer.max_epochs 1; the run records the
    merged config.

    Args:
        config: configs/<task>/prune.yaml.
        network: the network to prune: this project's network file, or a Lightning checkpoint
            of ImageClassifier (or use arch with weights).
        arch: with weights: a registry/torchvision architecture name (e.g. resnet50), a timm
            model as timm:NAME (e.g. timm:convnext_atto) or your own nn.Module class as
            package.module:Class.
        arch_kwargs: with arch: constructor arguments as a mapping, e.g. '{width: 0.5}'
            (num_classes is passed when the class takes it).
        weights: with arch: a plain state_dict file (torch.save(model.state_dict())).
        num_classes: with arch: the class count (default the config data's num_classes).
        metanetwork: meta-training checkpoint (needed by method metanetwork).
        method: metanetwork: feedforward + finetune; none: finetune only; sparse: DepGraph
            sparse training.
        speed_up: the target, above 1 (e.g. 2): MACs of the unpruned architecture over MACs
            after pruning channels; default the config's target.
        weight_sparsity: the target, in (0, 1): the fraction of zero weights over the prunable
            convolutions and dense layers, by magnitude (prune.sparsity_scope); replaces the
            config's target.
        nm: the target [N, M]: N of every M consecutive weights along the input channels kept
            (e.g. [2, 4]); replaces the config's target. One target per run.
        latency_speed_up: the target, above 1 (e.g. 1.5): the measured forward latency of the
            unpruned architecture over that of the pruned network, timed on the CPU at
            latency_batch while stage 2 prunes channels; replaces the config's target.
        latency_batch: the batch size a latency_speed_up target is timed at (default
            prune.latency_batch, else 1).
        out: the run folder; default <prune.dir>/<network>_<method>_<target>_seed<N>, the
            target as 2x, w0.5, 2of4 or lat1.5b1.
        data_root: the image data (overrides data.init_args.root); default $METAPRUNE_DATA.
        seed: seeds every stage; default prune.seed or 0.
        reuse_first_stage: a run folder of the same network, method, metanetwork, seed and
            config that differs only in the target (speed-up, latency speed-up, weight sparsity
            or N:M; for sparse, of the same kind), prune.max_pruning_ratio or prune.round_to:
            stage 1 is taken from it.
        overrides: a nested mapping merged over the config file (the command line's
            --SECTION.KEY VALUE).
    """

    config: str
    network: Optional[str] = None
    arch: Optional[str] = None
    arch_kwargs: Optional[dict] = None
    weights: Optional[str] = None
    num_classes: Optional[PositiveInt] = None
    metanetwork: Optional[str] = None
    method: Method = "metanetwork"
    speed_up: Optional[SpeedUp] = None
    weight_sparsity: Optional[WeightFraction] = None
    nm: Optional[NM] = None
    latency_speed_up: Optional[SpeedUp] = None
    latency_batch: Optional[PositiveInt] = None
    out: Optional[str] = None
    data_root: Optional[str] = None
    seed: Optional[int] = None
    reuse_first_stage: Optional[str] = None
    overrides: Optional[dict] = None

    def __post_init__(self) -> None:
        if (self.network is None) == (self.arch is None) or \
                (self.arch is None) != (self.weights is None):
            raise OptionError("give the network to prune as --network FILE (this project's "
                              "network file or a Lightning checkpoint of ImageClassifier), or "
                              "as --arch NAME --weights FILE (a plain state_dict)")
        if self.arch_kwargs and self.arch is None:
            raise OptionError("--arch_kwargs goes with --arch NAME --weights FILE (a network "
                              "file records its own architecture arguments)")
        if self.method not in METHODS:
            raise OptionError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        one_target(self.speed_up, self.weight_sparsity, self.nm, self.latency_speed_up)
        if self.latency_batch is not None and any(
                t is not None for t in (self.speed_up, self.weight_sparsity, self.nm)):
            raise OptionError("--latency_batch goes with a latency target (--latency_speed_up L), "
                              "not with --speed_up, --weight_sparsity or --nm")
        self.nm = nm_pair(self.nm)

    @property
    def source(self) -> str:
        """The file the network comes from: ``network``, else ``weights``."""
        source = self.network or self.weights
        assert source is not None  # __post_init__ requires one of them
        return source


@dataclass(kw_only=True)
class CurvePointOptions:
    """What every curve point of ``curve`` and ``select`` shares.

    Args:
        bn_batches: re-estimate BN statistics on this many training batches before every curve
            point (0: the raw curve, statistics as pruned).
        bn_batch_size: images per recalibration batch.
        max_pruning_ratio: the pruning criterion's per-layer cap, in (0, 1] (1: none, the
            paper's; as prune.max_pruning_ratio of a run).
    """

    bn_batches: NonNegativeInt = BN_BATCHES
    bn_batch_size: PositiveInt = BN_BATCH_SIZE
    max_pruning_ratio: PruningCap = 1.0


@dataclass
class CurveOptions(CurvePointOptions):
    """Accuracy-vs-speed-up curve of one or more networks, no finetuning (docs/pruning.md).

    Args:
        network: a network file (networks.save_network), or several as [a.pt,b.pt]: one
            overlay plot.
        labels: one legend label per network; default the file names.
        data_root: the networks' image data; default $METAPRUNE_DATA (one of the two is
            required).
        dataset: default the networks' own (recorded in their files), else cifar10.
        max_speed_up: stop at the first point reaching this speed-up.
        out: output folder; default next to the first network.
        subset: training images per class the val split is carved from; default the networks'
            own split (recorded in their files), else all.
        val_fraction: share of those images in the val split; default the networks' own, else
            0.1.
        seed: data split seed; default the networks' own, else 0.
        iterative_steps: pruning steps from the network to max_speed_up.
        every: evaluate every N-th pruning step (10: about 20 points).
        batch_size: evaluation batch size.
        title: plot title; default names the networks.
        importance: pruning criterion (l2 is the paper's).
        latency_batch: also time every point's forward at this batch size on the CPU and
            write the curves against the measured latency speed-up (over the unpruned
            architecture, timed alternately with each point, three readings each):
            curve_latency.csv / curve_latency.png.
        latency_runtime: what latency_batch times in: torch (PyTorch eager) or onnxruntime
            (each point exported to ONNX and run by ONNX Runtime, as it would be served).
    """

    network: Union[list[str], str]
    labels: Optional[list[str]] = None
    data_root: Optional[str] = None
    dataset: Optional[Literal["cifar10", "cifar100", "imagenet", "imagefolder"]] = None
    max_speed_up: SpeedUp = 4.0
    out: Optional[str] = None
    subset: Optional[PositiveInt] = None
    val_fraction: Optional[OpenUnitInterval] = None
    seed: Optional[int] = None
    iterative_steps: PositiveInt = 200
    every: PositiveInt = 10
    batch_size: PositiveInt = 500
    title: Optional[str] = None
    importance: Importance = "l2"
    latency_batch: Optional[PositiveInt] = None
    latency_runtime: Runtime = "torch"

    def __post_init__(self) -> None:
        self.network = [self.network] if isinstance(self.network, str) else self.network
        if self.data_root is None:
            raise OptionError(f"curve needs the networks' images: pass --data_root PATH or set "
                              f"${DATA_ENV}")
        if self.labels is not None and len(self.labels) != len(self.network):
            raise OptionError(f"--labels gives {len(self.labels)} labels for "
                              f"{len(self.network)} networks; give one per network")


@dataclass
class SelectRequest(CurvePointOptions):
    """Pick the best metanetwork checkpoint of a meta-training run by curve area on the
    meta-val members.

    Args:
        config: configs/<task>/meta.yaml (its data section: the zoo and the images).
        run: the meta-training run folder holding the *.ckpt candidates.
        checkpoints: all, N (evenly spaced, first and last included) or a.ckpt,b.ckpt.
        finetune_steps: finetune steps after the metanetwork, per member and candidate.
        finetune_lr: their learning rate.
        speed_up_range: [LO, HI]: the score is the mean val accuracy over these speed-ups.
        iterative_steps: pruning steps from each member to HI.
        every: evaluate every N-th pruning step.
        out: the output folder; default <run>/selection.
        zoo_dir: overrides data.init_args.zoo.
        data_root: overrides the image data root; default $METAPRUNE_DATA.
        seed: seeds every finetune alike.
        importance: the curves' pruning criterion; default the one the checkpoints were
            meta-trained for (all of a run's must agree).
        sparsity_range: [LO, HI]: for checkpoints meta-trained for weight sparsity, the
            score is the mean val accuracy over these weight sparsities (speed_up_range,
            iterative_steps, every and importance are then unused).
        sparsity_step: weight sparsity between the points of their curves.
        sparsity_scope: global (one magnitude threshold over all layers) or layer.
        sparsity_exclude: module paths left dense, e.g. [fc].
    """

    config: str
    run: str
    checkpoints: str = "all"
    finetune_steps: NonNegativeInt = 50
    finetune_lr: PositiveFloat = 0.01
    speed_up_range: tuple[float, float] = (2.0, 3.0)
    iterative_steps: PositiveInt = 200
    every: PositiveInt = 1
    out: Optional[str] = None
    zoo_dir: Optional[str] = None
    data_root: Optional[str] = None
    seed: int = 0
    importance: Optional[Importance] = None
    sparsity_range: tuple[float, float] = (0.5, 0.9)
    sparsity_step: WeightFraction = 0.05
    sparsity_scope: SparsityScope = "global"
    sparsity_exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        lo, hi = self.speed_up_range
        if not 1.0 <= lo < hi:
            raise OptionError(f"--speed_up_range [{lo:g}, {hi:g}] needs 1 <= LO < HI, e.g. [2, 3]")
        lo, hi = self.sparsity_range
        if not 0.0 <= lo < hi < 1.0:
            raise OptionError(f"--sparsity_range [{lo:g}, {hi:g}] needs 0 <= LO < HI < 1, "
                              "e.g. [0.5, 0.9]")
        self.checkpoints = str(self.checkpoints)  # N may come as an int from a YAML file


@dataclass
class MeasureOptions:
    """Measured forward latency of a network file and of its unpruned architecture.

    Args:
        network: network file (networks.save_network).
        batch_sizes: batch sizes to time ([1, 64]: latency and throughput).
        device: where to run the forward passes.
        runtime: what runs them: torch (PyTorch eager) or onnxruntime (the network exported to
            ONNX and run by ONNX Runtime's CPU provider, as it would be served).
        input_size: one input image [C, H, W] (ImageNet: [3, 224, 224]).
        min_run_time: seconds of timing per network and batch size.
        out: also write the measurements to this JSON file.
    """

    network: str
    batch_sizes: list[PositiveInt] = field(default_factory=lambda: [1, 64])
    device: Literal["cpu", "cuda"] = "cpu"
    runtime: Runtime = "torch"
    input_size: Shape = (3, 32, 32)
    min_run_time: PositiveFloat = 1.0
    out: Optional[str] = None

    def __post_init__(self) -> None:
        if self.device == "cuda" and self.runtime == "onnxruntime":
            raise OptionError("--runtime onnxruntime times on the CPU (ONNX Runtime's CPU "
                              "provider); use --device cpu with it, or --runtime torch on CUDA")


@dataclass
class ImportPaperOptions:
    """Convert the paper's saved metanetwork into a checkpoint for run and select.

    Args:
        state_dict: file saved by the paper's code: its metanetwork's state_dict (or a dict
            holding it under 'state_dict'); loaded with weights_only=True.
        arch: the architecture the metanetwork was trained for, e.g. resnet56_cifar,
            vgg19_bn_cifar, resnet50 (networks.available()).
        num_classes: e.g. 10 for CIFAR-10.
        identity_edges: the paper's identity layout: dense for the CIFAR ResNets, diagonal for
            ResNet-50 (VGG has none: either).
        node_res_ratio: the paper's node residual ratio (ResNet-56 0.01, ResNet-50 0.002).
        edge_res_ratio: the paper's edge residual ratio (ResNet-56 0.01, VGG-19 0.05).
        out: the checkpoint to write (.ckpt).
        input_size: one input image [C, H, W].
    """

    state_dict: str
    arch: str
    num_classes: PositiveInt
    identity_edges: Literal["dense", "diagonal"]
    node_res_ratio: float
    edge_res_ratio: float
    out: str
    input_size: Shape = (3, 32, 32)


@dataclass
class DemoOptions:
    """The whole pipeline on a built-in default: zoo, meta-train, select, prune three ways, table.

    Args:
        data_root: CIFAR-10 (ImageFolder train/ test/, or torchvision's folder); default
            $METAPRUNE_DATA, else downloaded to data/cifar10.
        out: output folder; default runs/demo_pipeline (runs/demo_pipeline_fast with fast).
        fast: smoke run: every stage on a few batches (minutes; the numbers mean nothing).
        config: the demo config.
    """

    data_root: Optional[str] = None
    out: Optional[str] = None
    fast: bool = False
    config: str = str(DEMO_CONFIG)
