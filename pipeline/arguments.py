"""The options of every ``prune.py`` subcommand, in one torch-free module: ``prune.py <command>
--help`` and argument errors answer without importing torch or Lightning (the commands
themselves live in their own modules and are imported only to run)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .common import DATA_ENV, add_data_root_argument

METHODS = ("metanetwork", "none", "sparse")
# the pruning criteria of networks.IMPORTANCES by name (l2 is the paper's), listed here so that
# the command line needs no torch; a test keeps the two equal
IMPORTANCES = ("l2", "l1", "fpgm", "lamp", "bn_scale")
REGULARIZED = ("l2", "bn_scale")  # those with a torch_pruning sparse-training regularizer
# Adaptive BN before every curve point (networks.recalibrate_batchnorm): 8 batches of 128
# training images re-estimate a small network's statistics (docs/pruning.md has the measured
# effect); 0 gives the raw curve.
BN_BATCHES, BN_BATCH_SIZE = 8, 128
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "demo.yaml"
DEFAULT_DATA = "data/cifar10"    # the demo downloads CIFAR-10 here without a data root
# Commands whose config file can be overridden key by key on the command line
# (``--section.key VALUE``, pipeline.common.parse_overrides), and what that file is.
CONFIG_OVERRIDES = {"run": "prune.yaml"}


def _number(kind: type, low: float, inclusive: bool) -> Callable[[str], Any]:
    """An argparse type: ``kind`` at or above ``low`` (above it when not ``inclusive``); a bad
    value is refused by argparse with the option named, before anything loads."""
    word = "at least" if inclusive else "above"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text} must be {word} {low:g}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int, non_negative_int = _number(int, 1, True), _number(int, 0, True)
positive_float = _number(float, 0.0, False)
def mapping(text: str) -> dict:
    """An argparse type: a YAML (or JSON) mapping such as ``{width: 0.5}``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not YAML: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mapping (e.g. '{{width: 0.5}}')")
    return value


speed_up_factor = _number(float, 1.0, False)  # MACs of the unpruned architecture over MACs after


def add_zoo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py zoo``."""
    parser.add_argument("--config", required=True, help="configs/<task>/zoo.yaml")
    parser.add_argument("--seed", type=int, default=None,
                        help="member seed (seeds both stages); default zoo.seed or 0")
    parser.add_argument("--zoo_dir", default=None, help="zoo directory; default zoo.dir")
    add_data_root_argument(parser, what="overrides data.init_args.root")
    parser.add_argument("--pretrained", default=None,
                        help="network file to start from; skips stage 1 (overrides zoo.pretrained)")
    parser.add_argument("--speed_up", type=speed_up_factor, default=None,
                        help="initial pruning target (overrides zoo.speed_up); with --variant")
    parser.add_argument("--variant", default=None,
                        help="name of another member of the same trained network (e.g. s1.6 "
                             "for --speed_up 1.6): member seed<N>-<variant>, stage 1 shared")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py run``."""
    parser.epilog = ("Any key of the prune config can be overridden: --SECTION.KEY VALUE (VALUE "
                     "read as YAML), e.g. --base.trainer.limit_train_batches 2 --prune.onnx false "
                     "--final.trainer.max_epochs 1; the run records the merged config.")
    parser.add_argument("--config", required=True, help="configs/<task>/prune.yaml")
    parser.add_argument("--network", default=None,
                        help="network to prune: this project's network file, or a Lightning "
                             "checkpoint of ImageClassifier (or use --arch with --weights)")
    parser.add_argument("--arch", default=None,
                        help="with --weights: a registry/torchvision architecture name (e.g. "
                             "resnet50), a timm model as timm:NAME (e.g. timm:convnext_atto) "
                             "or your own nn.Module class as package.module:Class")
    parser.add_argument("--arch_kwargs", type=mapping, default=None, metavar="YAML",
                        help="with --arch: constructor arguments as a YAML/JSON mapping, e.g. "
                             "'{width: 0.5}' (num_classes is passed when the class takes it)")
    parser.add_argument("--weights", default=None,
                        help="with --arch: a plain state_dict file (torch.save(model.state_dict()))")
    parser.add_argument("--num_classes", type=positive_int, default=None,
                        help="with --arch: the class count (default the config data's num_classes)")
    parser.add_argument("--metanetwork", default=None,
                        help="meta-training checkpoint (needed by --method metanetwork)")
    parser.add_argument("--method", choices=METHODS, default="metanetwork",
                        help="metanetwork: feedforward+finetune; none: finetune only; "
                             "sparse: DepGraph sparse training (default metanetwork)")
    parser.add_argument("--speed_up", type=speed_up_factor, default=None,
                        help="target, above 1 (e.g. 2); default prune.speed_up")
    parser.add_argument("--out", default=None,
                        help="run directory; default <prune.dir>/<network>_<method>_<S>x_seed<N>")
    add_data_root_argument(parser, what="overrides data.init_args.root")
    parser.add_argument("--seed", type=int, default=None, help="seeds every stage; default prune.seed or 0")
    parser.add_argument("--reuse_first_stage", default=None, metavar="RUN_DIR",
                        help="take stage 1 from a run of the same network, method, metanetwork, "
                             "seed and config that differs only in the speed-up target or "
                             "prune.max_pruning_ratio")


def add_shared_curve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every curve point shared by ``curve`` and ``select``: BN recalibration and
    the pruning criterion's per-layer cap."""
    parser.add_argument("--bn_batches", type=non_negative_int, default=BN_BATCHES,
                        help="re-estimate BN statistics on this many training batches before "
                             f"every curve point (default {BN_BATCHES}; 0: raw curve, statistics "
                             "as pruned)")
    parser.add_argument("--bn_batch_size", type=positive_int, default=BN_BATCH_SIZE,
                        help=f"images per recalibration batch (default {BN_BATCH_SIZE})")
    parser.add_argument("--max_pruning_ratio", type=float, default=1.0,
                        help="per-layer cap of the pruning criterion, in (0, 1] (default 1: none, "
                             "the paper's; as prune.max_pruning_ratio of a run)")


def add_importance_argument(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """``--importance``: the pruning criterion (networks.IMPORTANCES)."""
    parser.add_argument("--importance", choices=IMPORTANCES, default=default,
                        help=f"pruning criterion: {', '.join(IMPORTANCES)} ({what})")


def add_curve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py curve``."""
    parser.add_argument("--network", required=True, nargs="+",
                        help="network file(s) (networks.save_network); several give one overlay plot")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one legend label per --network; default the file names")
    add_data_root_argument(parser, required=True, what="the networks' image data")
    parser.add_argument("--dataset", default=None,
                        help="cifar10 | cifar100 | imagenet | imagefolder; default the networks' own "
                             "(recorded in their files), else cifar10")
    parser.add_argument("--max_speed_up", type=positive_float, default=4.0,
                        help="stop at the first point reaching this speed-up (default 4)")
    parser.add_argument("--out", default=None, help="output folder; default next to the first --network")
    parser.add_argument("--subset", type=positive_int, default=None,
                        help="training images per class the val split is carved from; default the "
                             "networks' own split (recorded in their files), else all")
    parser.add_argument("--val_fraction", type=float, default=None,
                        help="share of those images in the val split; default the networks' own, else 0.1")
    parser.add_argument("--seed", type=int, default=None,
                        help="data split seed; default the networks' own, else 0")
    parser.add_argument("--iterative_steps", type=positive_int, default=200,
                        help="pruning steps from the network to --max_speed_up (default 200)")
    parser.add_argument("--every", type=positive_int, default=10,
                        help="evaluate every N-th pruning step (default 10: about 20 points)")
    parser.add_argument("--batch_size", type=positive_int, default=500,
                        help="evaluation batch size (default 500)")
    parser.add_argument("--title", default=None, help="plot title; default names the networks")
    add_shared_curve_arguments(parser)
    add_importance_argument(parser, "l2", "default l2, the paper's")


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py select``."""
    parser.add_argument("--config", required=True, help="configs/<task>/meta.yaml (data section)")
    parser.add_argument("--run", required=True, help="meta-training run dir holding *.ckpt")
    parser.add_argument("--checkpoints", default="all",
                        help="all | N (evenly spaced, first and last included) | a.ckpt,b.ckpt")
    parser.add_argument("--finetune_steps", type=non_negative_int, default=50,
                        help="finetune steps after the metanetwork, per member and checkpoint "
                             "(default 50)")
    parser.add_argument("--finetune_lr", type=positive_float, default=0.01,
                        help="learning rate of those steps (default 0.01)")
    parser.add_argument("--speed_up_range", type=float, nargs=2, default=(2.0, 3.0),
                        metavar=("LO", "HI"),
                        help="the score is the mean accuracy over these speed-ups (default 2 3)")
    parser.add_argument("--iterative_steps", type=positive_int, default=200,
                        help="pruning steps from each member to HI (default 200)")
    parser.add_argument("--every", type=positive_int, default=1,
                        help="evaluate every N-th pruning step (default 1)")
    parser.add_argument("--out", default=None, help="output folder; default <run>/selection")
    parser.add_argument("--zoo_dir", default=None, help="overrides data.init_args.zoo")
    add_data_root_argument(parser, what="overrides the image data root")
    parser.add_argument("--seed", type=int, default=0, help="seeds every finetune alike")
    add_shared_curve_arguments(parser)
    add_importance_argument(parser, None, "default: the criterion the run was meta-trained for")


def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py measure``."""
    parser.add_argument("--network", required=True, help="network file (networks.save_network)")
    parser.add_argument("--batch_sizes", type=positive_int, nargs="+", default=[1, 64],
                        help="batch sizes to time (default 1 64: latency and throughput)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where to run the forward passes (default cpu)")
    parser.add_argument("--input_size", type=positive_int, nargs=3, default=[3, 32, 32],
                        metavar=("C", "H", "W"),
                        help="one input image (default 3 32 32; ImageNet: 3 224 224)")
    parser.add_argument("--min_run_time", type=positive_float, default=1.0,
                        help="seconds of timing per network and batch size (default 1)")
    parser.add_argument("--out", default=None, help="also write the measurements to this JSON file")


def add_import_paper_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py import_paper``."""
    parser.add_argument("--state_dict", required=True,
                        help="file saved by the paper's code: its metanetwork's state_dict (or a "
                             "dict holding it under 'state_dict'); loaded with weights_only=True")
    parser.add_argument("--arch", required=True,
                        help="architecture the metanetwork was trained for, e.g. resnet56_cifar, "
                             "vgg19_bn_cifar, resnet50 (networks.available())")
    parser.add_argument("--num_classes", type=positive_int, required=True, help="e.g. 10 for CIFAR-10")
    parser.add_argument("--input_size", type=positive_int, nargs=3, default=[3, 32, 32],
                        metavar=("C", "H", "W"), help="one input image (default 3 32 32)")
    parser.add_argument("--identity_edges", choices=("dense", "diagonal"), required=True,
                        help="the paper's identity layout: dense for the CIFAR ResNets, diagonal "
                             "for ResNet-50 (VGG has none: either)")
    parser.add_argument("--node_res_ratio", type=float, required=True,
                        help="the paper's node residual ratio (ResNet-56 0.01, ResNet-50 0.002)")
    parser.add_argument("--edge_res_ratio", type=float, required=True,
                        help="the paper's edge residual ratio (ResNet-56 0.01, VGG-19 0.05)")
    parser.add_argument("--out", required=True, help="checkpoint to write (.ckpt)")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py demo``."""
    parser.add_argument("--data_root", default=None,
                        help=f"CIFAR-10 (ImageFolder train/ test/, or torchvision's folder); default "
                             f"${DATA_ENV}, else downloaded to {DEFAULT_DATA}")
    parser.add_argument("--out", default=None,
                        help="output folder; default runs/demo_pipeline "
                             "(runs/demo_pipeline_fast with --fast)")
    parser.add_argument("--fast", action="store_true",
                        help="smoke run: every stage on a few batches (minutes; numbers mean nothing)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (configs/demo/demo.yaml)")
