"""`callbacks.StructuredPruning` on a user's LightningModule (issue 16): the example of
docs/structured_pruning.md, run as written, then checked against oracles written from the
specification: MACs counted from layer shapes, the learning rate of the user's own schedule,
the optimizer's parameters, and a reload that reproduces the outputs bit for bit."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

import networks
from callbacks import StructuredPruning

DOC = Path(__file__).parents[1] / "docs" / "structured_pruning.md"


def shape_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward, from the layer shapes (the convention of
    Torch-Pruning's counter: conv and linear with bias, 2 per BN element, 1 per ReLU output and
    per pooled input element)."""
    total = [0]

    def hook(m: nn.Module, inputs, out) -> None:
        if isinstance(m, nn.Conv2d):
            per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total[0] += out.numel() * (per_out + (m.bias is not None))
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * (m.in_features + (m.bias is not None))
        elif isinstance(m, nn.BatchNorm2d):
            total[0] += 2 * out.numel()
        elif isinstance(m, nn.ReLU):
            total[0] += out.numel()
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            total[0] += inputs[0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(example)
    for h in hooks:
        h.remove()
    return total[0]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The documented example, executed in a temporary folder."""
    import os

    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    cwd, tmp = os.getcwd(), tmp_path_factory.mktemp("structured")
    os.chdir(tmp)
    try:
        namespace: dict = {"__name__": "docs_example"}
        exec(compile(code, str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
    namespace["dir"] = tmp
    return namespace


def test_macs_dropped_by_the_requested_factor(example: dict) -> None:
    x = torch.zeros(1, 3, 16, 16)
    unpruned, pruned = shape_macs(example["LitNet"](), x), shape_macs(example["model"], x)
    assert unpruned / pruned >= 2.0
    assert unpruned / pruned < 2.3  # small steps: the first that reaches the target
    assert example["pruning"].steps_done == 2
    widths = [m.out_channels for m in example["model"].modules() if isinstance(m, nn.Conv2d)]
    assert widths != [16, 32, 32] and example["model"].net[-1].out_features == 10  # classifier kept


def test_optimizer_steps_the_pruned_parameters_on_the_users_schedule(example: dict) -> None:
    trainer, model = example["trainer"], example["model"]
    optimizer = trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters()}
    # StepLR(step_size=1, gamma=0.5) from lr 0.1 over 3 epochs, across two rebuilds
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3


def test_checkpoint_reloads_into_an_identical_network_and_resumes(example: dict) -> None:
    x = torch.randn(4, 3, 16, 16)
    model, restored = example["model"].eval(), example["restored"].eval()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    # resuming the fit from the pruned checkpoint: shapes restored before the weights load,
    # no further pruning (both steps are done), and the optimizer trains the pruned weights
    last = example["dir"] / "checkpoints" / "last.ckpt"
    resumed = example["LitNet"]()
    pruning = StructuredPruning(speed_up=2.0, epochs=[1, 2], input_size=[3, 16, 16])
    trainer = Trainer(max_epochs=4, callbacks=[pruning], accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=example["dir"])
    trainer.fit(resumed, example["data"], ckpt_path=str(last))
    assert pruning.steps_done == 2
    assert [p.shape for p in resumed.parameters()] == [p.shape for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(resumed.parameters(), model.parameters()))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="exactly one of speed_up"):
        StructuredPruning()
    with pytest.raises(ValueError, match="importance='taylorr' is unknown"):
        StructuredPruning(speed_up=2.0, importance="taylorr")
    with pytest.raises(ValueError, match=r"epochs=\[3, 1\]"):
        StructuredPruning(channel_ratio=0.3, epochs=[3, 1])
    with pytest.raises(ValueError, match=r"epochs=\[1, 3, 5\] must be one epoch .* or a pair"):
        StructuredPruning(speed_up=2.0, epochs=[1, 3, 5])
    with pytest.raises(ValueError, match=r"epochs=1.5 must be one epoch"):
        StructuredPruning(speed_up=2.0, epochs=1.5)  # type: ignore[arg-type]


def _short_fit(example: dict, pruning: StructuredPruning, **trainer_args) -> nn.Module:
    """The documented LitNet fitted on 16 random images with ``pruning``."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))),
                      batch_size=8)
    model = example["LitNet"]()
    trainer = Trainer(callbacks=[pruning], accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, **trainer_args)
    trainer.fit(model, data)
    return model


def test_a_fit_that_cannot_reach_the_target_is_named(example: dict) -> None:
    # max_epochs 2 ends before the last pruning epoch 5: a warning before training, and one
    # after it with the speed-up reached; strict=True refuses before any step
    with pytest.warns(UserWarning) as caught:
        _short_fit(example, StructuredPruning(speed_up=2.0, epochs=[1, 5]), max_epochs=2)
    messages = [str(w.message) for w in caught]
    assert any("max_epochs=2" in m and "up to epoch 5" in m for m in messages)
    ended = [m for m in messages if "ended after 1 of 5 pruning steps" in m]
    reached = float(re.search(r"speed-up ([0-9.]+)x", ended[0]).group(1))
    assert 1.0 < reached < 2.0 ** (1 / 5) + 0.05  # one geometric step of five toward 2x
    model = example["LitNet"]()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="max_epochs=2"):
        trainer = Trainer(max_epochs=2, callbacks=[StructuredPruning(speed_up=2.0, epochs=[1, 5],
                                                                     strict=True)],
                          accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(model, torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))),
            batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing trained
    # a fit stopped by max_steps inside epoch 1: warned after the fit, with the steps done
    with pytest.warns(UserWarning, match="ended after 1 of 3 pruning steps"):
        _short_fit(example, StructuredPruning(speed_up=2.0, epochs=[0, 2]), max_epochs=5,
                   max_steps=2)


DDP_SCRIPT = '''
import hashlib, json, os, sys
import torch
from lightning.pytorch import Trainer
from callbacks import StructuredPruning
namespace = {"__name__": "ddp_example"}
code = open(sys.argv[1]).read()
exec(code.split("torch.manual_seed(0)")[0], namespace)  # the doc's imports and LitNet
torch.manual_seed(0)
from torch.utils.data import DataLoader, TensorDataset
data = DataLoader(TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))),
                  batch_size=8)
model = namespace["LitNet"]()
pruning = StructuredPruning(speed_up=2.0, epochs=[1, 2], input_size=[3, 16, 16])
trainer = Trainer(max_epochs=3, callbacks=[pruning], accelerator="cpu", devices=2, strategy="ddp",
                  logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False)
trainer.fit(model, data)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
json.dump({"shapes": [list(p.shape) for p in model.parameters()], "digest": digest.hexdigest(),
           "optimizer_has_params": ids == {id(p) for p in model.parameters()}},
          open(os.path.join(sys.argv[2], f"rank{trainer.global_rank}.json"), "w"))
'''


@pytest.mark.slow
def test_two_process_ddp_prunes_identically_on_every_rank(tmp_path: Path) -> None:
    """2-process CPU DDP (Lightning's subprocess launcher): both ranks remove the same channels,
    train the same pruned weights (DDP rebuilt around them) and step them with the optimizer."""
    import json
    import subprocess
    import sys

    script = tmp_path / "ddp_example.py"
    script.write_text(DDP_SCRIPT)
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "doc.py").write_text(code)
    subprocess.run([sys.executable, str(script), str(tmp_path / "doc.py"), str(tmp_path)],
                   cwd=tmp_path, check=True, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # same shapes and the same weights after two more epochs on different data shards: the
    # gradients of the pruned parameters were averaged (a DDP wrapper left on the removed
    # parameters would not sync them, and the ranks would drift apart)
    assert ranks[0] == ranks[1]
    assert ranks[0]["optimizer_has_params"]
    assert ranks[0]["shapes"][0][0] < 16  # pruned


def test_a_latency_target_prunes_until_the_clock_says_so(example: dict, monkeypatch) -> None:
    # a deterministic clock (time proportional to MACs at 16x16) stands in for the real one,
    # which tests/test_latency.py checks: the callback must hand the loop its network, keep
    # the unpruned time as the base across epochs, and stop where the clock reaches each
    # epoch's target (sqrt(2), then 2)
    x16 = torch.zeros(1, 3, 16, 16)
    readings: list[float] = []

    def probe(input_size, batch_size, device, runtime):
        assert list(input_size) == [3, 16, 16] and batch_size == 4 and runtime == "torch"

        def clock(model: nn.Module) -> float:
            readings.append(shape_macs(model, x16) / 1e6)
            return readings[-1]
        return clock

    monkeypatch.setattr(networks, "latency_probe", probe)
    pruning = StructuredPruning(latency_speed_up=2.0, epochs=[0, 1], input_size=(3, 16, 16),
                                latency_batch_size=4, iterative_steps=30, round_to=4)
    unpruned = shape_macs(example["LitNet"](), x16)
    model = _short_fit(example, pruning, max_epochs=2)
    assert pruning.steps_done == 2 and pruning.state_dict()["base_ms"] == unpruned / 1e6
    # each epoch's stop was confirmed against the network as it was before the first pruning
    assert readings.count(unpruned / 1e6) >= 1 + 2 * networks.pruning.CONFIRM_PAIRS
    assert 2.0 <= unpruned / shape_macs(model, x16) < 2.3
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths != [16, 32, 32] and all(w % 4 == 0 for w in widths)
    with pytest.raises(ValueError, match="exactly one of speed_up"):
        StructuredPruning(speed_up=2.0, latency_speed_up=2.0)
    with pytest.raises(ValueError, match="latency_speed_up=1.0 must be above 1"):
        StructuredPruning(latency_speed_up=1.0)
