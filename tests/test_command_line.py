"""The command lines of benchmarks/ (pipeline.command_line, issue 30): every script answers
``--help``, every option has help text, a bad value is refused in one line naming the option
before anything runs, lists are YAML and a bool option may be given bare."""
from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_helpers import BENCHMARKS, benchmark_module
from jsonargparse.typing import PositiveInt

from pipeline.command_line import cli, command_parser
from pipeline.options import PruningCap

SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.fixture(autouse=True)
def scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripts that import another by name find it (as when run from benchmarks/)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def commands(name: str) -> dict:
    """A script's commands: subcommand name -> function (one command: its name alone)."""
    module = benchmark_module(name)
    return getattr(module, "COMMANDS", None) or {"": getattr(module, name)}


def test_every_script_is_listed() -> None:
    assert SCRIPTS == ["census", "graph_speed", "latency", "latency_methods", "meta_effect", "meta_step",
                       "prune_speed", "quality", "registered", "tune_baselines", "tune_weights"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_every_option_has_help_text(name: str, capsys: pytest.CaptureFixture) -> None:
    main = benchmark_module(name).main
    for command, function in commands(name).items():
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"] if command else ["--help"])
        assert stop.value.code == 0
        assert f"usage: {name}.py" in capsys.readouterr().out
        parser = command_parser(function, name)
        bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert bare == [], f"{name} {command}: options without help"


@pytest.mark.parametrize("name, argv, message", [
    ("quality", ["rerun", "--runs", "r", "--out", "o", "--max_pruning_ratio", "1.5"],
     "quality.py rerun: error: --max_pruning_ratio: Not of type PruningCap: 1.5 does not conform"),
    ("quality", ["run", "--data_root", "d", "--speed_ups", "[2,1]"],
     "quality.py run: error: --speed_ups [2.0, 1]: Not of type SpeedUp"),
    ("quality", ["run", "--data_root", "d", "--methods", "[pruned]"],
     "--methods ['pruned']: Expected a typing.Literal"),
    ("quality", ["run", "--data_root", "d", "--meta_epochs", "0"],
     "--meta_epochs 0: Not of type PositiveInt"),
    ("quality", ["pool"], "quality.py pool: error: the following arguments are required: --runs"),
    ("registered", ["run", "r.yaml", "--data_root", "d", "--seeds", "203", "204"],
     "registered.py run: error: --seeds 203: Expected a <class 'list'>; a list is written in YAML"),
    ("registered", ["hash"], "registered.py hash: error: the following arguments are required: "
     "registration"),
    ("tune_baselines", ["--data_root", "d", "--part", "all"], "tune_baselines.py: error: --part all: "),
    ("tune_baselines", ["--data_root", "d", "--lrs", "[0.1,-1]"], "--lrs: "),
    ("tune_weights", ["--data_root", "d", "--weight_sparsity", "1"], "tune_weights.py: error: "
     "--weight_sparsity: "),
    ("tune_weights", ["--data_root", "d", "--meta_regs", "[0.1,0]"], "--meta_regs: "),
    ("census", ["--size", "0"], "census.py: error: --size 0: Not of type PositiveInt"),
    ("latency", ["--min_run_time", "0"], "latency.py: error: --min_run_time: Not of type PositiveFloat"),
    ("latency", ["--device", "tpu"], "latency.py: error: --device: "),
    ("meta_step", ["--batches", "[1,0]"], "meta_step.py: error: --batches: "),
    ("prune_speed", ["--only", "resnet18"], "prune_speed.py: error: --only resnet18: "),
    ("graph_speed", ["--repeats", "x"], "graph_speed.py: error: --repeats: "),
])
def test_a_bad_value_is_refused_in_one_line_naming_the_option(
        name: str, argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        benchmark_module(name).main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def toy(target: str, *, seeds: list[int] | None = None, flag: bool = False,
        cap: PruningCap = 1.0, steps: PositiveInt = 3, out: Path | None = None) -> int:  # type: ignore[valid-type]
    """A toy command.

    Args:
        target: a positional
        seeds: a list
        flag: a bool
        cap: a cap in (0, 1]
        steps: a positive count
        out: a path
    """
    toy.seen = dict(target=target, seeds=seeds, flag=flag, cap=cap, steps=steps, out=out)  # type: ignore[attr-defined]
    return 3 if flag else 0


@pytest.mark.parametrize("argv, seen", [
    (["t", "--seeds", "[1,2]", "--flag"], {"seeds": [1, 2], "flag": True}),
    (["t", "--flag", "--cap", "0.5"], {"flag": True, "cap": 0.5}),
    (["t", "--flag", "false", "--steps", "2"], {"flag": False, "steps": 2}),
    (["t", "--flag=true", "--out", "x/y"], {"flag": True, "out": Path("x/y")}),
    (["t"], {"flag": False, "cap": 1.0, "seeds": None}),
])
def test_options_from_a_signature(argv: list[str], seen: dict) -> None:
    status = cli(toy, argv, prog="toy.py")
    assert {k: toy.seen[k] for k in seen} == seen and toy.seen["target"] == "t"  # type: ignore[attr-defined]
    assert type(toy.seen["cap"]) is float and type(toy.seen["steps"]) is int  # type: ignore[attr-defined]
    assert status == (3 if seen["flag"] else 0)


def test_subcommands_and_user_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    from metaprune.errors import UserError

    def fail(*, why: str = "no") -> None:
        """Fails.

        Args:
            why: the reason
        """
        raise UserError(f"refused: {why}")

    assert cli({"toy": toy, "fail": fail}, ["fail", "--why", "bad input"], prog="x.py") == 2
    assert capsys.readouterr().err == "x.py: error: refused: bad input\n"
    assert cli({"toy": toy, "fail": fail}, ["toy", "t", "--steps", "4"], prog="x.py") == 0
    assert toy.seen["steps"] == 4  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        cli({"toy": toy, "fail": fail}, ["nothing"], prog="x.py")
    assert capsys.readouterr().err.startswith("x.py: error: argument command: invalid choice")
