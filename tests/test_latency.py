"""Measured latency (issue 16): `networks.latency` against a forward of known duration, and
`prune.py measure` on a pruned network file against MACs counted from layer shapes."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from pruning_helpers import random_prune
from torch import nn

import networks
import prune
from networks.latency import measure_latency


class Sleeper(nn.Module):
    """A forward that takes ``seconds`` per call, whatever the batch."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_latency_of_a_forward_of_known_duration() -> None:
    model = Sleeper(0.01)
    (one, four) = measure_latency(model, [3, 8, 8], batch_sizes=[1, 4], min_run_time=0.2)
    for m, batch in ((one, 1), (four, 4)):
        assert m.batch_size == batch and m.device == "cpu" and m.threads == torch.get_num_threads()
        assert 10.0 <= m.median_ms < 14.0  # sleep() never returns early; the loop costs little
        assert m.runs >= 10
    assert model.calls >= one.runs + four.runs + 2  # plus one warm-up per batch size
    assert not model.training
    with pytest.raises(ValueError, match="batch size 0"):
        measure_latency(model, [3, 8, 8], batch_sizes=[0])


def _convs(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         *(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
                           for _ in range(3)))


FAULTS = """
import resource, sys, torch
from networks.latency import settle_allocator
torch.set_num_threads(1)
conv = torch.nn.Conv2d(3, 16, 3, padding=1).eval()
x = torch.randn(64, 3, 32, 32)  # 4 MiB of output per forward: above glibc's initial threshold
def faults():  # per forward after a warm-up forward, as measure_latency times
    with torch.no_grad():
        conv(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        for _ in range(5):
            conv(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
cold = faults()
settle_allocator()
print(cold, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the page faults counted are glibc's")
def test_timing_starts_from_the_allocators_steady_state() -> None:
    """In a fresh process every forward maps its 4 MiB output afresh and faults its pages in
    (what made a network time ~60% slower in one process than in another); after
    ``settle_allocator`` the freed memory is reused: almost no faults. Counted, not timed."""
    done = subprocess.run([sys.executable, "-c", FAULTS], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cold, settled = map(float, done.stdout.split())
    assert cold >= 500  # a 4 MiB output is 1,024 pages of 4 KiB
    assert settled <= cold / 20


def test_onnx_runtime_times_the_exported_network() -> None:
    """runtime onnxruntime: the network is exported and timed in ONNX Runtime on the CPU (the
    record says so); a network with 256x the MACs is timed slower (an ordering with a wide
    margin, not a wall-clock bound); the runtime is part of what the module checks."""
    from networks.latency import RUNTIMES, check_runtime
    from pipeline.options import Runtime

    assert RUNTIMES == typing.get_args(Runtime)  # the command line's list is the module's
    torch.manual_seed(0)
    wide, narrow = _convs(64), _convs(4)
    (w,), (n,) = (measure_latency(m, [3, 32, 32], [2], min_run_time=0.1, runtime="onnxruntime")
                  for m in (wide, narrow))
    assert w.runtime == n.runtime == "onnxruntime" and w.device == "cpu" and w.runs >= 2
    assert w.median_ms > 4 * n.median_ms
    with pytest.raises(ValueError, match="times on the CPU only"):
        check_runtime("onnxruntime", "cuda")
    with pytest.raises(ValueError, match="runtime 'tensorrt' is not one of torch, onnxruntime"):
        check_runtime("tensorrt", "cpu")


def test_measure_command_compares_with_the_unpruned_architecture(tmp_path: Path, capsys) -> None:
    arch = {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}}
    x = torch.zeros(1, 3, 32, 32)
    torch.manual_seed(0)
    pruned = random_prune(networks.build(arch["name"], 3, **arch["kwargs"]), x, 0.5, 0)
    path = networks.save_network(pruned, tmp_path / "net.pt", arch)
    out = tmp_path / "latency.json"
    assert prune.main(["measure", "--network", str(path), "--batch_sizes", "[1, 2]",
                       "--min_run_time", "0.05", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # the two networks compared are this file's and a fresh build of its unpruned recipe
    # (count_macs itself is checked against layer shapes in test_prune_run.py)
    unpruned = networks.build(arch["name"], 3, **arch["kwargs"])
    assert result["macs"] == networks.count_macs(pruned, x) < result["base_macs"] == \
        networks.count_macs(unpruned, x)
    assert result["speed_up"] == result["base_macs"] / result["macs"]
    rows = result["latency"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["speed_up_measured"] == pytest.approx(r["unpruned_latency_ms"] / r["latency_ms"])
    printed = capsys.readouterr().out
    assert f"{result['speed_up']:.2f}x" in printed and "| 2 | torch, cpu (" in printed
    assert prune.main(["measure", "--network", str(path), "--batch_sizes", "[2]", "--runtime",
                       "onnxruntime", "--min_run_time", "0.05", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["latency"]
    assert row["runtime"] == "onnxruntime" and "| 2 | onnxruntime, cpu (" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess from the entry point; the demo's console test stays
def test_measure_console_carries_no_third_party_noise(tmp_path: Path) -> None:
    """From the entry point, as a user runs it: the table and nothing else on stderr (torch's
    "No CUDA runtime is found" log line on CPU machines is quieted at the entry point)."""
    path = networks.save_network(networks.build("resnet8_cifar", 3, width=0.25), tmp_path / "net.pt",
                                 {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}})
    done = subprocess.run([sys.executable, "prune.py", "measure", "--network", str(path),
                           "--batch_sizes", "[1]", "--min_run_time", "0.05"],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| 1 | torch, cpu (" in done.stdout
    assert done.stderr.strip() == ""


# ---- pruning to a measured latency target (issue 33) ----------------------------------------
X32 = torch.zeros(1, 3, 32, 32)


def _widths(model: nn.Module) -> list[int]:
    return [m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _net() -> nn.Module:
    torch.manual_seed(1)
    return networks.build("resnet20_cifar", 10, width=0.5).eval()


def test_a_clock_that_reads_macs_stops_where_the_mac_target_stops() -> None:
    # a "latency" proportional to MACs, read after every step: the latency target is the MAC
    # target, so both loops must remove the same channels and report the same speed-up
    base = networks.count_macs(_net(), X32)
    by_macs = _net()
    reached = networks.prune_to_speed_up(by_macs, X32, 2.0, base, iterative_steps=50)
    by_clock = _net()
    calls = []

    def clock(model: nn.Module) -> float:
        calls.append(1)
        return networks.count_macs(model, X32) / 1e6

    got = networks.prune_to_latency(by_clock, X32, 2.0, base / 1e6, clock, iterative_steps=50,
                                    every=0.0)
    assert got == pytest.approx(reached) and _widths(by_clock) == _widths(by_macs)
    assert all(torch.equal(a, b) for a, b in zip(by_clock.state_dict().values(),
                                                 by_macs.state_dict().values()))
    # with every=0.1 the clock is read only after MACs fell by a tenth: fewer readings, and a
    # stop at or after the MAC loop's
    every_step = len(calls)
    calls.clear()
    got = networks.prune_to_latency(_net(), X32, 2.0, base / 1e6, clock, iterative_steps=50,
                                    every=0.1)
    assert got >= reached and len(calls) < every_step


def test_one_lucky_reading_does_not_stop_the_loop() -> None:
    # every first reading after a step says "twice as fast as it is"; the confirmation reads
    # the true time, so the loop stops only where the true latency reaches the target
    base = networks.count_macs(_net(), X32)
    readings = []

    def lucky_then_true(model: nn.Module) -> float:
        true = networks.count_macs(model, X32) / 1e6
        readings.append(true)
        return true / 2 if len(readings) % 2 == 0 else true

    model = _net()
    got = networks.prune_to_latency(model, X32, 2.0, base / 1e6, lucky_then_true,
                                    iterative_steps=50, every=0.0)
    assert base / networks.count_macs(model, X32) == pytest.approx(got) and got >= 2.0


@pytest.mark.parametrize("after", [0.6, 1.5])
def test_a_machine_whose_speed_changed_after_the_base_was_timed(after: float) -> None:
    # the unpruned architecture is timed at one machine speed, then every forward takes
    # ``after`` x as long (0.6: the load went away; 1.5: it came). Against that stale base the
    # unpaired rule stops early or late; paired with the reference, the machine's speed
    # cancels and the loop stops at the step where the true (MACs) speed-up reaches 2x, the
    # one the MACs loop stops at
    unpruned = _net()
    base = networks.count_macs(unpruned, X32)
    by_macs = _net()
    networks.prune_to_speed_up(by_macs, X32, 2.0, base, iterative_steps=50)
    calls = []

    def drifting(model: nn.Module) -> float:
        calls.append(model)
        return networks.count_macs(model, X32) / 1e6 * (1.0 if len(calls) == 1 else after)

    base_ms = drifting(unpruned)
    unpaired = _net()
    networks.prune_to_latency(unpaired, X32, 2.0, base_ms, drifting, iterative_steps=50, every=0.0)
    true = base / networks.count_macs(unpaired, X32)
    assert (true < 1.5) if after < 1 else (true >= 2.9)
    paired = _net()
    got = networks.prune_to_latency(paired, X32, 2.0, base_ms, drifting, iterative_steps=50,
                                    every=0.0, reference=unpruned)
    assert networks.count_macs(paired, X32) == networks.count_macs(by_macs, X32)
    assert got == pytest.approx(base / networks.count_macs(paired, X32))
    assert calls[-2] is unpruned and calls[-1] is paired  # the stop's readings alternate


def test_round_to_holds_in_every_pruned_layer_and_bad_targets_are_named() -> None:
    model = _net()
    before = _widths(model)
    base = networks.count_macs(model, X32)
    clock = lambda m: networks.count_macs(m, X32) / 1e6  # noqa: E731
    networks.prune_to_latency(model, X32, 1.8, base / 1e6, clock, iterative_steps=40, round_to=4)
    after = _widths(model)
    assert after != before
    for b, a in zip(before[:-1], after[:-1]):  # the classifier keeps its 10 outputs
        assert a == b or a % 4 == 0
    with pytest.raises(ValueError, match="not above the network's measured"):
        networks.prune_to_latency(model, X32, 1.5, base / 1e6, clock)
    with pytest.raises(ValueError, match="unreachable: 3 pruning steps"):
        networks.prune_to_latency(_net(), X32, 50.0, base / 1e6, clock, iterative_steps=3)


def test_latency_probe_times_one_batch_size_and_keeps_the_mode() -> None:
    model = Sleeper(0.01).train()
    ms = networks.latency_probe([3, 8, 8], batch_size=2, min_run_time=0.1)(model)
    assert 10.0 <= ms < 40.0 and model.training


def test_prune_to_speed_up_callback_with_a_latency_target_resumes_into_the_checkpoints_shapes(
        monkeypatch) -> None:
    """callbacks.PruneToSpeedUp(latency_speed_up=...): the base is the unpruned architecture
    (rebuilt from the module's arch, not the network it is given), timed at latency_batch; the
    clock decides where it stops (here proportional to MACs, then, as a resumed fit on a busier
    machine might read it, a clock that runs 30% slow on pruned networks); whatever the second
    fit's clock said, its module loads the first fit's pruned checkpoint (layers resized first)."""
    from types import SimpleNamespace

    from callbacks import PruneToSpeedUp
    from lightning_modules import ImageClassifier

    arch = {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}}
    x32 = torch.zeros(1, 3, 32, 32)
    unpruned_macs = networks.base_macs(arch, x32)
    slow = {"factor": 1.0}

    def probe(input_size, batch_size=1, device="cpu", min_run_time=0.2, runtime="torch"):
        assert list(input_size) == [3, 32, 32] and batch_size == 4 and runtime == "torch"

        def clock(model: nn.Module) -> float:
            macs = networks.count_macs(model, x32)
            return macs * (1.0 if macs == unpruned_macs else slow["factor"])
        return clock

    monkeypatch.setattr(networks, "latency_probe", probe)
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), loggers=[])
    modules = []
    for factor in (1.0, 1.3):
        slow["factor"] = factor
        torch.manual_seed(0)
        module = ImageClassifier(arch["name"], 3, network_kwargs=arch["kwargs"])
        module.network = random_prune(module.network, x32, 0.1, 0)  # a zoo member's initial prune
        module.train()
        callback = PruneToSpeedUp(latency_speed_up=1.5, latency_batch=4, input_size=[3, 32, 32],
                                  iterative_steps=40)
        callback.setup(trainer, module, "fit")
        assert callback.base_ms == unpruned_macs and module.network.training
        assert callback.latency_speed_up_reached >= 1.5
        assert callback.speed_up_reached == pytest.approx(
            unpruned_macs / networks.count_macs(module.network, x32))
        modules.append(module)
    first, second = modules
    assert 1.5 <= unpruned_macs / networks.count_macs(first.network, x32) < 1.7
    assert networks.count_macs(second.network, x32) < networks.count_macs(first.network, x32)
    second.load_state_dict(first.state_dict())  # the resumed fit loads the checkpoint's shapes
    assert networks.count_macs(second.network, x32) == networks.count_macs(first.network, x32)
    with pytest.raises(ValueError, match="exactly one of speed_up"):
        PruneToSpeedUp(speed_up=2.0, latency_speed_up=2.0)
    with pytest.raises(ValueError, match="latency_speed_up=1.0 must be above 1"):
        PruneToSpeedUp(latency_speed_up=1.0)


# ---- round_to chosen by measurement (networks.choose_round_to) --------------------------------
def _odd_widths_slow(model: nn.Module) -> float:
    """A clock for a runtime with 8-wide kernels: a layer whose width is not a multiple of 8
    costs three times its MACs, counted from each layer's weight shape and output size."""
    outputs: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.__setitem__(mod, o[0].numel()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(X32)
    for h in hooks:
        h.remove()
    # MACs of a layer: its output values times the weights each reads (in/groups x kernel area)
    return sum(n * m.weight[0].numel() * (1.0 if m.weight.shape[0] % 8 == 0 else 3.0)
               for m, n in outputs.items()) / 1e6


def _prune_to_2x(base: int):
    def prune(model: nn.Module, round_to: int | None) -> float:
        pruner = networks.criterion_pruner(model, X32, 50, round_to=round_to)
        return networks.prune_to_speed_up(model, X32, 2.0, base, 50, pruner=pruner)
    return prune


def test_round_to_is_chosen_by_the_clock() -> None:
    """On a clock that punishes widths off a multiple of 8, the choice is 8 (16 does as well
    and loses the tie), every trial reached 2x, and the network handed in is unchanged; on a
    clock that reads MACs (no width is favoured) rounding only costs, so the choice is 1."""
    model = _net()
    before = _widths(model)
    base = networks.count_macs(model, X32)
    chosen, trials = networks.choose_round_to(model, X32, _prune_to_2x(base), _odd_widths_slow)
    assert chosen == 8 and _widths(model) == before
    assert [t.round_to for t in trials] == [1, 2, 4, 8, 16]
    by_r = {t.round_to: t for t in trials}
    assert all(t.macs is not None and base / t.macs >= 2.0 for t in trials[:4])
    # 16 cannot narrow the 8-wide first stage: 2x is out of reach, recorded with the reason
    assert by_r[16].macs is None and "unreachable" in by_r[16].why
    assert by_r[1].macs_per_ms < 0.9 * by_r[8].macs_per_ms  # unrounded widths pay
    assert networks.choose_round_to(model, X32, _prune_to_2x(base),
                                    lambda m: networks.count_macs(m, X32) / 1e6)[0] == 1

    def never(model: nn.Module, round_to: int | None) -> None:
        raise ValueError("speed-up target 50.000x is unreachable")

    with pytest.raises(ValueError, match="no round_to of .* reaches the target: speed-up target"):
        networks.choose_round_to(model, X32, never, _odd_widths_slow)


def test_the_pruning_callback_chooses_round_to_by_measurement(monkeypatch) -> None:
    """PruneToSpeedUp(round_to="auto"), MACs and latency targets: the clock it is given (the
    one above, through networks.latency_probe) decides 8, and every layer stage 2 narrowed is
    a multiple of 8."""
    from types import SimpleNamespace

    from callbacks import PruneToSpeedUp
    from lightning_modules import ImageClassifier

    arch = {"name": "resnet20_cifar", "num_classes": 10, "kwargs": {"width": 0.5}}
    monkeypatch.setattr(networks, "latency_probe", lambda *a, **k: _odd_widths_slow)
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), loggers=[])
    for target in ({"speed_up": 2.0}, {"latency_speed_up": 2.0}):
        torch.manual_seed(1)
        module = ImageClassifier(arch["name"], 10, network_kwargs=arch["kwargs"])
        before = _widths(module.network)
        callback = PruneToSpeedUp(**target, iterative_steps=50, round_to="auto")
        callback.setup(trainer, module, "fit")
        after = _widths(module.network)
        assert callback.round_to_chosen == 8 and len(callback.round_to_trials) == 5
        narrowed = [w for b, w in zip(before, after) if w != b]
        assert narrowed and all(w % 8 == 0 for w in narrowed), (target, narrowed)
    with pytest.raises(ValueError, match="must be positive"):
        PruneToSpeedUp(speed_up=2.0, round_to=0)
