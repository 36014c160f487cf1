"""``prune.py <command> --help`` (issue 32): every subcommand answers without importing torch or
Lightning, and every option it lists has help text."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline.cli import OVERRIDES, SUBCOMMANDS, command_parser

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
    assert probe["heavy"] == [] and f"usage: prune.py [options] {command}" in probe["help"]


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_option_has_help_text(command: str) -> None:
    sub = command_parser(command)
    bare = [a.option_strings for a in sub._actions if a.option_strings and not (a.help or "").strip()]
    options = {a.dest for a in sub._actions if a.option_strings} - {"help", "verbose"}
    fields = {f.name for f in dataclasses.fields(SUBCOMMANDS[command][0])} - set(OVERRIDES.values())
    assert bare == [] and options == fields  # every field is an option, one declaration each


@pytest.mark.parametrize("argv, option", [
    (["run", "--config", "p.yaml", "--network", "n.pt", "--speed_up", "0.5"],
     "run: --speed_up 0.5: Not of type SpeedUp: does not conform to restriction v>1.0"),
    (["run", "--config", "p.yaml", "--network", "n.pt", "--latency_speed_up", "0.5"],
     "run: --latency_speed_up 0.5: Not of type SpeedUp: does not conform to restriction v>1.0"),
    (["run", "--config", "p.yaml", "--network", "n.pt", "--latency_speed_up", "2",
      "--latency_batch", "0"], "run: --latency_batch 0: Not of type PositiveInt"),
    (["run", "--config", "p.yaml", "--network", "n.pt", "--speed_up", "2", "--latency_speed_up", "2"],
     "--speed_up and --latency_speed_up are two targets; a run has one"),
    (["run", "--config", "p.yaml", "--network", "n.pt", "--speed_up", "2", "--latency_batch", "4"],
     "--latency_batch goes with a latency target (--latency_speed_up L)"),
    (["run", "--config", "p.yaml", "--network", "n.pt", "--method", "prune"],
     "run: --method: Expected a typing.Literal['metanetwork', 'none', 'sparse']. Got value: prune"),
    (["zoo", "--config", "z.yaml", "--speed_up", "1"], "zoo: --speed_up 1: Not of type SpeedUp"),
    (["measure", "--network", "n.pt", "--batch_sizes", "[1, 0]"],
     "measure: --batch_sizes: Not of type PositiveInt: 0 does not conform to restriction v>0"),
    (["measure", "--network", "n.pt", "--input_size", "[3, 32]"], "measure: --input_size"),
    (["measure", "--network", "n.pt", "--runtime", "tensorrt"], "measure: --runtime: Expected a "
     "typing.Literal['torch', 'onnxruntime']"),
    (["measure", "--network", "n.pt", "--device", "cuda", "--runtime", "onnxruntime"],
     "--runtime onnxruntime times on the CPU"),
    (["curve", "--network", "n.pt", "--data_root", ".", "--latency_runtime", "ort"],
     "curve: --latency_runtime: Expected a typing.Literal['torch', 'onnxruntime']"),
    (["curve", "--network", "n.pt", "--data_root", ".", "--every", "0"],
     "curve: --every: Not of type PositiveInt: 0 does not conform to restriction v>0"),
    (["curve", "--network", "n.pt", "--data_root", ".", "--bn_batch_size", "0"],
     "curve: --bn_batch_size: Not of type PositiveInt"),
    (["curve", "--network", "n.pt", "--data_root", ".", "--max_pruning_ratio", "0"],
     "curve: --max_pruning_ratio: Not of type PruningCap: 0 does not conform to restriction v>0.0"),
    (["curve", "--network", "n.pt", "--data_root", ".", "--val_fraction", "1"],
     "curve: --val_fraction 1: Not of type OpenUnitInterval"),
    (["select", "--config", "m.yaml", "--run", "r", "--finetune_lr", "-1"],
     "select: --finetune_lr: Not of type PositiveFloat: -1 does not conform to restriction v>0"),
    (["select", "--config", "m.yaml", "--run", "r", "--bn_batches", "x"], "select: --bn_batches:"),
    (["select", "--config", "m.yaml", "--run", "r", "--max_pruning_ratio", "1.5"],
     "select: --max_pruning_ratio: Not of type PruningCap: 1.5 does not conform"),
    (["select", "--config", "m.yaml", "--run", "r", "--speed_up_range", "[3, 2]"],
     "--speed_up_range [3, 2] needs 1 <= LO < HI"),
    (["select", "--config", "m.yaml", "--run", "r", "--sparsity_range", "[0.5, 1]"],
     "--sparsity_range [0.5, 1] needs 0 <= LO < HI < 1"),
    (["curve", "--network", "[a.pt, b.pt]", "--data_root", ".", "--labels", "[a]"],
     "--labels gives 1 labels for 2 networks"),
    (["run", "--config", "p.yaml", "--arch", "resnet8_cifar"], "--arch NAME --weights FILE"),
    (["demo", "--fast", "--bogus"], "demo: unrecognized arguments: --bogus"),
    (["prune"], "invalid choice: 'prune'"),
])
def test_bad_options_are_refused_in_one_line_before_anything_loads(argv: list[str], option: str,
                                                                   capsys) -> None:
    from pipeline.cli import cli

    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prune.py: error: ") and option in err and err.count("\n") == 1


def test_one_network_or_a_list_and_bare_flags_parse(monkeypatch) -> None:
    from pipeline.cli import parse

    monkeypatch.delenv("METAPRUNE_DATA", raising=False)
    assert parse(["curve", "--network", "a.pt", "--data_root", "d"])[1].network == ["a.pt"]
    assert parse(["curve", "--network", "[a.pt, b.pt]", "--data_root", "d"])[1].network == ["a.pt", "b.pt"]
    assert parse(["demo", "--fast"])[1].fast is True
    assert parse(["demo", "--fast", "--out", "x"])[1].fast is True
    assert parse(["demo", "--fast", "false"])[1].fast is False
    assert parse(["demo"])[1].fast is False
    run = parse(["run", "--config", "c.yaml", "--network", "n.pt", "--speed_up", "2",
                 "--prune.max_pruning_ratio", "0.67", "--final.trainer.max_epochs=1"])[1]
    assert run.speed_up == 2.0 and type(run.speed_up) is float  # plain: YAML writes it
    assert run.overrides == {"prune": {"max_pruning_ratio": 0.67}, "final": {"trainer": {"max_epochs": 1}}}


def test_measure_on_a_missing_gpu_is_one_line(capsys, monkeypatch) -> None:
    import torch

    from pipeline.cli import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli(["measure", "--network", "n.pt", "--device", "cuda"]) == 2
    assert "prune.py: error: --device cuda: no CUDA device is available" in capsys.readouterr().err


# The smallest valid command line of each subcommand; a range-checked option is then added.
VALID = {"zoo": ["--config", "z.yaml"], "run": ["--config", "p.yaml", "--network", "n.pt"],
         "curve": ["--network", "n.pt", "--data_root", "d"],
         "select": ["--config", "m.yaml", "--run", "r"], "measure": ["--network", "n.pt"],
         "import_paper": ["--state_dict", "s.pt", "--arch", "a", "--num_classes", "10",
                          "--identity_edges", "dense", "--node_res_ratio", "0.01",
                          "--edge_res_ratio", "0.01", "--out", "o.ckpt"], "demo": []}
# A value outside each constrained type, written from the type's definition.
OUTSIDE = {"PositiveInt": "0", "NonNegativeInt": "-1", "PositiveFloat": "0", "SpeedUp": "1",
           "PruningCap": "0", "OpenUnitInterval": "1"}


def _outside(hint) -> str | None:
    """A command-line value ``hint`` refuses, or None when the type constrains nothing."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return "not-a-choice"
    if typing.get_origin(hint) in (list, tuple):
        inner = [_outside(a) for a in args if a is not Ellipsis]
        if all(v is None for v in inner):
            return None
        return "[" + ", ".join(v if v is not None else "1" for v in inner) + "]"
    if args:  # Optional[X] or Union[...]
        found = [v for v in map(_outside, args) if v is not None]
        return found[0] if found else None
    return OUTSIDE.get(getattr(hint, "__name__", ""))


CONSTRAINED = [(command, name, value) for command, (cls, _) in sorted(SUBCOMMANDS.items())
               for name, hint in typing.get_type_hints(cls).items()
               if (value := _outside(hint)) is not None]


def test_every_constrained_option_is_listed() -> None:
    assert set(VALID) == set(SUBCOMMANDS)
    assert len(CONSTRAINED) >= 25  # the ranges and choices of pipeline/options.py


@pytest.mark.parametrize("command, option, value", CONSTRAINED,
                         ids=[f"{c}--{o}" for c, o, _ in CONSTRAINED])
def test_each_range_checked_option_refuses_a_value_outside_it(command: str, option: str, value: str,
                                                              capsys) -> None:
    from pipeline.cli import cli

    assert cli([command, *VALID[command], f"--{option}", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prune.py: error: {command}: --{option}") and err.count("\n") == 1, err
