"""``prune.py <command> --help`` (issue 32): every subcommand answers without importing torch or
Lightning, and every option it lists has help text."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = ["prune.py", sys.argv[1], "--help"]
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        runpy.run_path("prune.py", run_name="__main__")
    except SystemExit:
        pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "lightning", "pytorch_lightning"})
print(json.dumps({"heavy": heavy, "help": out.getvalue()}))
"""


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_imports_neither_torch_nor_lightning(command: str) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, command], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    probe = json.loads(result.stdout.splitlines()[-1])
    assert probe["heavy"] == [] and f"usage: prune.py {command}" in probe["help"]


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_option_has_help_text(command: str) -> None:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    bare = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
    assert bare == []


@pytest.mark.parametrize("argv, option", [
    (["run", "--config", "p.yaml", "--network", "n.pt", "--speed_up", "0.5"],
     "--speed_up: 0.5 must be above 1"),
    (["measure", "--network", "n.pt", "--batch_sizes", "0"], "--batch_sizes: 0 must be at least 1"),
    (["curve", "--network", "n.pt", "--data_root", ".", "--every", "0"], "--every: 0 must be at least 1"),
    (["curve", "--network", "n.pt", "--data_root", ".", "--bn_batch_size", "0"],
     "--bn_batch_size: 0 must be at least 1"),
    (["select", "--config", "m.yaml", "--run", "r", "--finetune_lr", "-1"],
     "--finetune_lr: -1 must be above 0"),
    (["select", "--config", "m.yaml", "--run", "r", "--bn_batches", "x"],
     "--bn_batches: 'x' is not a number"),
])
def test_bad_numbers_are_refused_before_anything_loads(argv: list[str], option: str, capsys) -> None:
    from pipeline.cli import cli

    with pytest.raises(SystemExit) as stop:
        cli(argv)
    assert stop.value.code == 2 and option in capsys.readouterr().err


def test_measure_on_a_missing_gpu_is_one_line(capsys, monkeypatch) -> None:
    import torch

    from pipeline.cli import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli(["measure", "--network", "n.pt", "--device", "cuda"]) == 2
    assert "prune.py: error: --device cuda: no CUDA device is available" in capsys.readouterr().err
