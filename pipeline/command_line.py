"""Command lines built by jsonargparse from typed Python: the scripts in benchmarks/ (``cli``),
and the pieces ``prune.py``'s parser (pipeline.cli) shares with them (``bare_flags``,
``option_message``). Each command is declared once, as a function whose typed signature and docstring
("Args:") are its options and their help, or as a function of one dataclass, whose fields are.
Parameters before a ``*`` are positional, keyword-only ones are ``--options``; constrained types
(pipeline.options, jsonargparse.typing) are checked by the parser; lists are YAML
(``--seeds [1,2]``); a bool option given bare (``--flag``) means true. A bad value fails in one
line naming the option, as does a ``UserError`` raised by the command (exit status 2 for both).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metaprune.errors import UserError

from .common import one_line
from .options import plain

if typing.TYPE_CHECKING:
    from jsonargparse import ArgumentParser

Command = Callable[..., Any]


def summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring (or of ``obj``, a string)."""
    text = obj if isinstance(obj, str) else inspect.getdoc(obj) or ""
    return text.strip().split("\n\n")[0]


def options_class(command: Command) -> type | None:
    """The dataclass whose fields are ``command``'s options, when it takes one alone."""
    params = list(inspect.signature(command).parameters)
    if len(params) != 1:
        return None
    hint = typing.get_type_hints(command).get(params[0])
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def command_parser(command: Command, prog: str, description: str | None = None) -> ArgumentParser:
    """The parser of one command (its options from its signature or its dataclass)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description or summary(command),
                            exit_on_error=False)
    options = options_class(command)
    if options is not None:
        parser.add_class_arguments(options, as_group=False, as_positional=True)
    else:
        parser.add_function_arguments(command, as_group=False, as_positional=True)
    return parser


def bare_flags(argv: list[str], command: Command | type) -> list[str]:
    """``--flag`` of a bool option of ``command`` (a function, or an options dataclass) with no
    value (last, or before another option) read as ``--flag=true``."""
    hints = typing.get_type_hints(options_class(command) or command)
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    return [f"{arg}=true" if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
            else arg for i, arg in enumerate(argv)]


def option_message(error: Exception, command: str | None, positional: Sequence[str] = ()) -> str:
    """The parser's error as one line: ``--option[ VALUE]: reason`` (positionals bare)."""
    text = one_line(str(error)).removeprefix(f"{command}.")

    def flag(name: str) -> str:
        name = name.removeprefix(f"{command}.")
        return name if name in positional or name.startswith("-") else f"--{name}"

    if str(error).startswith("Parser key"):  # "key[ VALUE]: reason"
        key = text.split(":")[0].split(" ")[0]
        return flag(key) + text[len(key):]
    required = "the following arguments are required: "
    if text.startswith(required):
        return required + ", ".join(map(flag, text.removeprefix(required).split(", ")))
    return text


def cli(commands: Command | dict[str, Command], argv: Sequence[str] | None = None,
        prog: str | None = None, description: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) for ``commands`` (one command, or subcommand
    name -> command) and call the command chosen; its exit status (None counts as 0)."""
    from jsonargparse import ArgumentParser

    prog = prog or Path(sys.argv[0]).name
    argv = list(sys.argv[1:] if argv is None else argv)
    name: str | None = None
    if callable(commands):
        command: Command | None = commands
        parser = chosen = command_parser(commands, prog, description)
    else:
        parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
        sub = parser.add_subcommands(required=True, dest="command")
        parsers = {key: command_parser(function, f"{prog} {key}") for key, function in commands.items()}
        for key, function in commands.items():
            sub.add_subcommand(key, parsers[key], help=summary(function))
        name = next((a for a in argv if a in commands), None)
        command = commands[name] if name else None
        chosen = parsers[name] if name else parser
    if command is not None:
        argv = bare_flags(argv, command)
    try:
        cfg = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        positional = [a.dest for a in chosen._actions if not a.option_strings]
        print(f"{prog}{f' {name}' if name else ''}: error: {option_message(e, name, positional)}",
              file=sys.stderr)
        raise SystemExit(2) from None
    assert command is not None
    kwargs = plain((cfg[name] if name else cfg).as_dict())
    options = options_class(command)
    try:
        status = command(options(**kwargs)) if options is not None else command(**kwargs)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return int(status or 0)
