"""The ``prune.py`` command line: one subcommand per pipeline step (see prune.py), each parsed by
jsonargparse from its options dataclass (pipeline.options) and run by its command function."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from metaprune.errors import UserError

from . import options
from .command_line import bare_flags, option_message
from .common import parse_overrides, split_overrides

DESCRIPTION = ("Meta pruning, one subcommand per step: zoo -> (train.py meta-training) -> select -> "
               "run; demo runs them all on a built-in default (docs/pruning.md).")


def _lazy(module: str, name: str) -> Callable[[Any], int]:
    """``module.name``, imported on the first call: the commands import torch and Lightning,
    their options (pipeline.options) do not, so ``--help`` stays fast."""
    def call(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args)
    return call


# name -> (its options, the command run on them)
SUBCOMMANDS: dict[str, tuple[type, Callable[[Any], int]]] = {
    "zoo": (options.ZooOptions, _lazy("pipeline.zoo", "zoo_command")),
    "run": (options.RunRequest, _lazy("pipeline.run", "prune_run")),
    "curve": (options.CurveOptions, _lazy("pipeline.curve", "curve_command")),
    "select": (options.SelectRequest, _lazy("pipeline.select", "select_checkpoint")),
    "import_paper": (options.ImportPaperOptions, _lazy("pipeline.import_paper", "import_paper_command")),
    "measure": (options.MeasureOptions, _lazy("pipeline.measure", "measure_command")),
    "demo": (options.DemoOptions, _lazy("pipeline.demo", "demo_command")),
}
# Commands whose config file can be overridden key by key (--SECTION.KEY VALUE); the field of
# their options that receives the overrides.
OVERRIDES = {"run": "overrides", "zoo": "overrides"}


def _summary(cls: type, sentences: int = 1) -> str:
    """The first sentence(s) of an options class's docstring: its command's help."""
    text = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    return "".join(text.partition(". ")[:2]).strip() if sentences == 1 else text


def command_parser(name: str, with_options: bool = True) -> Any:
    """The parser of one subcommand: ``--verbose`` and, ``with_options``, its options class."""
    from jsonargparse import ArgumentParser

    cls = SUBCOMMANDS[name][0]
    parser = ArgumentParser(description=_summary(cls, sentences=0), exit_on_error=False)
    # the one flag that is not an option of a command: how much the console shows
    parser.add_argument("--verbose", action="store_true",
                        help="show everything: Lightning's messages, model summaries, warnings, "
                             "every stage's own output (default: a quiet console)")
    if with_options:
        parser.add_class_arguments(cls, as_group=False, skip=set(OVERRIDES.values()))
    return parser


def build_parser(command: str | None = None) -> Any:
    """The jsonargparse parser; only ``command``'s options are added (all when None)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="prune.py", description=DESCRIPTION, exit_on_error=False)
    sub = parser.add_subcommands(dest="command", required=True)
    for name, (cls, _) in SUBCOMMANDS.items():
        sub.add_subcommand(name, command_parser(name, command in (None, name)), help=_summary(cls))
    return parser


def _option_error(command: str, error: Exception) -> UserError:
    """jsonargparse's report of a bad option as one line naming it."""
    return UserError(f"{command}: {option_message(error, command)}; see prune.py {command} --help")


def parse(argv: list[str]) -> tuple[str, Any]:
    """``argv`` as (command, its options instance); a bad option raises UserError naming it."""
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in SUBCOMMANDS else "")
    if command not in SUBCOMMANDS:  # no command, or an unknown one: --help, else the usage error
        try:
            parser.parse_args(argv)
        except argparse.ArgumentError as e:
            raise UserError(f"{e}; see prune.py --help") from None
    cls = SUBCOMMANDS[command][0]
    argv, overrides = (split_overrides(argv) if command in OVERRIDES else (argv, []))
    try:
        namespace = parser.parse_args(bare_flags(argv, cls))
        extra = {OVERRIDES[command]: parse_overrides(overrides) or None} if command in OVERRIDES else {}
    except (argparse.ArgumentError, ValueError) as e:
        raise _option_error(command, e) from None
    values = options.plain(namespace[command].as_dict())
    values.pop("verbose", None)
    if "data_root" in values and values["data_root"] is None:
        values["data_root"] = options.data_root_from_env()
    return command, cls(**values, **extra)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns its exit status."""
    command, opts = parse(sys.argv[1:] if argv is None else list(argv))
    return SUBCOMMANDS[command][1](opts)


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
