"""The ``prune.py`` command line: one subcommand per pipeline step (see prune.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from metaprune.errors import UserError

from . import arguments
from .common import parse_overrides

DESCRIPTION = ("Meta pruning, one subcommand per step: zoo -> (train.py meta-training) -> select -> "
               "run; demo runs them all on a built-in default (docs/pruning.md).")
Subcommand = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]


def _lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on the first call: the commands import torch and Lightning,
    their options (pipeline.arguments) do not, so ``--help`` stays fast."""
    def call(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args)
    return call


SUBCOMMANDS: dict[str, Subcommand] = {
    "zoo": (arguments.add_zoo_arguments, _lazy("pipeline.zoo", "zoo_command"),
            "train, prune and finetune one zoo member (docs/zoo.md)"),
    "run": (arguments.add_run_arguments, _lazy("pipeline.run", "run_command"),
            "prune a network to a speed-up: metanetwork/none/sparse, finetunes, export (docs/pruning.md)"),
    "curve": (arguments.add_curve_arguments, _lazy("pipeline.curve", "curve_command"),
              "accuracy-vs-speed-up curve of a network, no finetuning (docs/pruning.md)"),
    "select": (arguments.add_select_arguments, _lazy("pipeline.select", "select_command"),
               "pick the best metanetwork checkpoint of a meta-training run by curve area"),
    "import_paper": (arguments.add_import_paper_arguments,
                     _lazy("pipeline.import_paper", "import_paper_command"),
                     "convert the paper's saved metanetwork into a checkpoint for run/select"),
    "measure": (arguments.add_measure_arguments, _lazy("pipeline.measure", "measure_command"),
                "measured forward latency of a network file and of its unpruned architecture"),
    "demo": (arguments.add_demo_arguments, _lazy("pipeline.demo", "demo_command"),
             "the whole pipeline on a built-in default: zoo, meta-train, select, prune 3 ways, table"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are added (all when None)."""
    parser = argparse.ArgumentParser(prog="prune.py", description=DESCRIPTION)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show everything: Lightning's messages, model summaries, warnings, "
                             "every stage's own output (default: a quiet console)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _, help_text) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if command in (None, name):
            add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in SUBCOMMANDS else "")
    if command not in arguments.CONFIG_OVERRIDES:
        args = parser.parse_args(argv)
        return SUBCOMMANDS[args.command][1](args)
    args, rest = parser.parse_known_args(argv)
    try:
        args.overrides = parse_overrides(rest)
    except ValueError as e:
        parser.error(f"{command}: {e}")
    return SUBCOMMANDS[args.command][1](args)


def cli(argv: list[str] | None = None) -> int:
    """The console entry point: a quiet console unless ``--verbose`` (pipeline.console), and
    bad input reported as one line with exit status 2."""
    from .console import configure

    argv = sys.argv[1:] if argv is None else list(argv)
    configure(verbose="--verbose" in argv)
    try:
        return main(argv)
    except UserError as e:
        print(f"prune.py: error: {e}", file=sys.stderr)
        return 2
