"""PruneToSpeedUp: structured pruning as a step of an ordinary Lightning fit.

The callback prunes ``pl_module.network`` in its ``setup`` hook for stage ``"fit"``. Lightning
calls ``setup`` before ``configure_optimizers`` and before it restores a checkpoint, so

* the optimizer is built over the pruned parameters, and
* resuming a killed finetune (``ckpt_path=last.ckpt``) works: the same weights prune to the same
  widths (the magnitude criterion is deterministic), then the checkpoint's pruned state loads.

Speed-up = MACs(unpruned architecture) / MACs(pruned network), where the unpruned architecture
is rebuilt from ``pl_module.arch`` with ``networks.build``: pruning done before this run (the
zoo's initial prune) counts toward the target (docs/method.md). A latency target measures
instead: latency(unpruned architecture) / latency(pruned network), timed on the CPU at one batch
size (``networks.prune_to_latency``; docs/pruning.md, "A latency target").
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

import networks
from lightning_modules import ImageClassifier
from networks.checkpoint import reshape_to_state
from networks.latency import RUNTIMES, Runtime

from .structured import rank_zero_clock
from .target import classifier

ROUND_TO_FILE = "round_to.json"  # round_to "auto"'s trials, in the fit's root folder


class PruneToSpeedUp(Callback):
    """Prune the module's network to ``speed_up`` x fewer MACs than its unpruned architecture,
    or until its measured latency is ``latency_speed_up`` x the unpruned architecture's.

    Args:
        speed_up: target MACs(unpruned) / MACs(pruned); reached or exceeded by the smallest step.
        iterative_steps: pruning steps of the global group-L2 magnitude pruner (docs/method.md).
        input_size: ``[C, H, W]`` of one input image, for tracing and MAC counting.
        max_pruning_ratio: the criterion's per-layer cap (``networks.criterion_pruner``); 1, the
            paper's setting, leaves global ranking uncapped.
        importance: the criterion (``networks.IMPORTANCES``; l2, the paper's).
        latency_speed_up: instead of ``speed_up`` (exactly one of the two): target
            latency(unpruned) / latency(pruned), both timed on the network's device (in
            ``setup``, before Lightning moves it: the CPU) at ``latency_batch``
            (``networks.latency_probe``, ``networks.prune_to_latency``). The unpruned
            architecture is rebuilt from ``pl_module.arch`` and timed as well (the faster of
            two readings), so earlier pruning counts; every reading times the two together
            (one pair to screen, five to confirm a stop: ``networks.paired_latency``). Timing is
            not deterministic: a resumed fit may stop at another step, so the layers are resized
            to the checkpoint's shapes before it loads.
        latency_batch: the batch size a latency target is timed at.
        latency_runtime: what a latency target is timed in: ``torch`` (eager) or
            ``onnxruntime`` (the network exported to ONNX, on the CPU; ``networks.latency``).
        round_to: keep every pruned width a multiple of this (e.g. 8); None: any width;
            ``"auto"``: the multiple of ``networks.ROUND_TO_CANDIDATES`` (1, 2, 4, 8, 16) chosen
            by measurement: a copy pruned to the target under each is timed at
            ``latency_batch`` in ``latency_runtime``, and the one doing the most MACs per ms
            wins (``networks.choose_round_to``; about five prunings and timings more).

    After ``setup`` the attributes ``base_macs``, ``macs``, ``params`` and ``speed_up_reached``
    (the MACs speed-up) hold the result, and for a latency target ``base_ms``, ``ms`` and
    ``latency_speed_up_reached``; they are also logged (``pruning/*``, the tags of
    ``StructuredPruning``) to the trainer's loggers. ``round_to_chosen`` is the multiple stage
    2 pruned with (None: no rounding) and, for ``round_to="auto"``, ``round_to_trials`` the
    measurements it was chosen by (also written to ``round_to.json`` in the fit's root folder).
    """

    def __init__(self, speed_up: float | None = None, iterative_steps: int = 200,
                 input_size: Sequence[int] = (3, 32, 32), max_pruning_ratio: float = 1.0,
                 importance: str = "l2", latency_speed_up: float | None = None,
                 latency_batch: int = 1, round_to: int | Literal["auto"] | None = None,
                 latency_runtime: Runtime = "torch") -> None:
        if (speed_up is None) == (latency_speed_up is None):
            raise ValueError("PruneToSpeedUp: give exactly one of speed_up (MACs, e.g. 2.0) and "
                             "latency_speed_up (measured time, e.g. 1.5)")
        for name, value in (("speed_up", speed_up), ("latency_speed_up", latency_speed_up)):
            if value is not None and value <= 1.0:
                raise ValueError(f"{name}={value} must be above 1 (unpruned / pruned)")
        if int(latency_batch) < 1 or (round_to not in (None, "auto") and int(round_to) < 1):
            raise ValueError(f"PruneToSpeedUp: latency_batch={latency_batch} and "
                             f"round_to={round_to} must be positive (or round_to 'auto')")
        if latency_runtime not in RUNTIMES:
            raise ValueError(f"PruneToSpeedUp: latency_runtime={latency_runtime!r} is not one "
                             f"of {', '.join(RUNTIMES)}")
        self.latency_runtime = latency_runtime
        self.max_pruning_ratio = networks.check_max_pruning_ratio(max_pruning_ratio)
        self.importance = networks.check_importance(importance)
        self.speed_up = None if speed_up is None else float(speed_up)
        self.latency_speed_up = None if latency_speed_up is None else float(latency_speed_up)
        self.latency_batch = int(latency_batch)
        self.round_to: int | Literal["auto"] | None = \
            round_to if round_to in (None, "auto") else int(round_to)
        self.round_to_chosen: int | None = None  # the multiple stage 2 pruned with
        self.round_to_trials: list[networks.RoundToTrial] = []  # round_to "auto"'s measurements
        self._measure: Callable[[torch.nn.Module], float] | None = None
        self.iterative_steps = int(iterative_steps)
        self.input_size = [int(s) for s in input_size]
        networks.example_input(self.input_size)  # validate now, not after minutes of data loading
        self.base_macs: int | None = None
        self.macs: int | None = None
        self.params: int | None = None
        self.speed_up_reached: float | None = None
        self.base_ms: float | None = None
        self._unpruned: torch.nn.Module | None = None  # a latency target's reference
        self.ms: float | None = None
        self.latency_speed_up_reached: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.speed_up_reached is not None:  # prune once per module
            return
        model = classifier(pl_module, "PruneToSpeedUp")
        network = model.network
        example = networks.example_input(self.input_size).to(next(network.parameters()).device)
        self.base_macs = networks.base_macs(model.arch, example.cpu())
        before = networks.count_macs(network, example)
        measured: dict[str, float] = {}
        with networks.evaluating(network):
            if self.latency_speed_up is not None or self.round_to == "auto":
                self._start_clock(trainer, model, example)
            if self.round_to == "auto":
                self.round_to_chosen = self._choose_round_to(trainer, network, example)
                measured["pruning/round_to"] = float(self.round_to_chosen or 1)
            else:
                self.round_to_chosen = self.round_to
            reached_at_stop = self._prune(network, example, self.round_to_chosen)
            self._unpruned = None  # only the loop's readings compare with it
        if self.latency_speed_up is not None:
            assert self.base_ms is not None
            self.latency_speed_up_reached, self.ms = reached_at_stop, self.base_ms / reached_at_stop
            measured.update({"pruning/latency_speed_up": reached_at_stop, "pruning/latency_ms": self.ms,
                             "pruning/base_latency_ms": self.base_ms})
        self.macs = networks.count_macs(network, example)
        reached = self.speed_up_reached = self.base_macs / self.macs  # what either target took
        self.params = networks.count_params(network)
        target = f"{self.speed_up}x" if self.latency_speed_up is None else \
            f"latency {self.latency_speed_up}x at batch {self.latency_batch}, reached " \
            f"{self.latency_speed_up_reached:.3f}x: {self.base_ms:.3f} -> {self.ms:.3f} ms " \
            f"on {example.device.type if self.latency_runtime == 'torch' else 'cpu, onnxruntime'}"
        rank_zero_info(
            f"pruned {model.arch['name']}: {before:,} -> {self.macs:,} MACs, "
            f"{self.params:,} params, speed-up {reached:.3f}x "
            f"(target {target}, base {self.base_macs:,} MACs)")
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/speed_up": reached,
                                "pruning/macs": float(self.macs),
                                "pruning/params": float(self.params),
                                "pruning/base_macs": float(self.base_macs), **measured}, step=0)

    def _start_clock(self, trainer: Trainer, model: ImageClassifier, example: torch.Tensor) -> None:
        """The clock (rank 0's reading on every rank, so all ranks stop at the same step and
        remove the same channels) and, for a latency target, the unpruned architecture's time
        on it, the faster of two readings (a conservative base). A timed stage may stop at
        another step when resumed, so the layers are resized to the checkpoint's shapes before
        it loads."""
        if not getattr(model, "_prune_to_speed_up_hook", None):
            model._prune_to_speed_up_hook = model.register_load_state_dict_pre_hook(
                lambda module, state, prefix, *args: reshape_to_state(module, state, prefix))
        self._measure = rank_zero_clock(trainer, self.input_size, self.latency_batch,
                                        example.device, self.latency_runtime)
        if self.latency_speed_up is not None:  # a MACs target only times its round_to trials
            self._unpruned = networks.build_arch(model.arch).to(example.device).eval()
            self.base_ms = min(self._measure(self._unpruned), self._measure(self._unpruned))

    def _prune(self, network: torch.nn.Module, example: torch.Tensor, round_to: int | None) -> float:
        """Prune ``network`` in place to the target with the criterion, every pruned width a
        multiple of ``round_to``; returns the latency speed-up measured at the stop (a latency
        target) or the MACs speed-up reached."""
        pruner = None if round_to is None else networks.criterion_pruner(
            network, example, self.iterative_steps, max_pruning_ratio=self.max_pruning_ratio,
            importance=self.importance, round_to=round_to)
        if self.latency_speed_up is None:
            assert self.speed_up is not None and self.base_macs is not None
            return networks.prune_to_speed_up(
                network, example, self.speed_up, self.base_macs, self.iterative_steps,
                pruner=pruner, max_pruning_ratio=self.max_pruning_ratio, importance=self.importance)
        assert self.base_ms is not None and self._measure is not None
        return networks.prune_to_latency(
            network, example, self.latency_speed_up, self.base_ms, self._measure,
            self.iterative_steps, pruner=pruner, max_pruning_ratio=self.max_pruning_ratio,
            importance=self.importance, reference=self._unpruned)

    def _choose_round_to(self, trainer: Trainer, network: torch.nn.Module,
                         example: torch.Tensor) -> int | None:
        """round_to "auto": the multiple of ``networks.ROUND_TO_CANDIDATES`` whose copy of the
        network, pruned to the target, does the most MACs per ms on the clock
        (``networks.choose_round_to``); None for 1 (no rounding). Rank 0 also writes the
        trials to ``round_to.json`` in the fit's root folder (the run's report reads it)."""
        assert self._measure is not None
        chosen, trials = networks.choose_round_to(
            network, example, lambda copy, r: self._prune(copy, example, r), self._measure)
        self.round_to_trials = trials
        rank_zero_info(f"PruneToSpeedUp: round_to {chosen} chosen by measurement (batch "
                       f"{self.latency_batch}, {self.latency_runtime}):\n"
                       + networks.round_to.trials_table(trials, chosen))
        root = getattr(trainer, "default_root_dir", None)
        if root and getattr(trainer, "is_global_zero", True):
            record = {"chosen": chosen, "batch_size": self.latency_batch,
                      "runtime": self.latency_runtime, "trials": [asdict(t) for t in trials]}
            networks.atomic_write(Path(root) / ROUND_TO_FILE,
                                  lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        return None if chosen == 1 else chosen
