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

from typing import Any, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

import networks
from lightning_modules import ImageClassifier
from networks.checkpoint import reshape_to_state

from .structured import rank_zero_clock
from .target import classifier


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
            (``networks.latency_probe``, ``networks.prune_to_latency``: a stop is confirmed by
            a second reading). The unpruned architecture is rebuilt from ``pl_module.arch`` and
            timed as well (the faster of two readings), so earlier pruning counts. Timing is
            not deterministic: a resumed fit may stop at another step, so the layers are resized
            to the checkpoint's shapes before it loads.
        latency_batch: the batch size a latency target is timed at.
        round_to: keep every pruned width a multiple of this (e.g. 8); None: any width.

    After ``setup`` the attributes ``base_macs``, ``macs``, ``params`` and ``speed_up_reached``
    (the MACs speed-up) hold the result, and for a latency target ``base_ms``, ``ms`` and
    ``latency_speed_up_reached``; they are also logged (``pruning/*``, the tags of
    ``StructuredPruning``) to the trainer's loggers.
    """

    def __init__(self, speed_up: float | None = None, iterative_steps: int = 200,
                 input_size: Sequence[int] = (3, 32, 32), max_pruning_ratio: float = 1.0,
                 importance: str = "l2", latency_speed_up: float | None = None,
                 latency_batch: int = 1, round_to: int | None = None) -> None:
        if (speed_up is None) == (latency_speed_up is None):
            raise ValueError("PruneToSpeedUp: give exactly one of speed_up (MACs, e.g. 2.0) and "
                             "latency_speed_up (measured time, e.g. 1.5)")
        for name, value in (("speed_up", speed_up), ("latency_speed_up", latency_speed_up)):
            if value is not None and value <= 1.0:
                raise ValueError(f"{name}={value} must be above 1 (unpruned / pruned)")
        if int(latency_batch) < 1 or (round_to is not None and int(round_to) < 1):
            raise ValueError(f"PruneToSpeedUp: latency_batch={latency_batch} and "
                             f"round_to={round_to} must be positive")
        self.max_pruning_ratio = networks.check_max_pruning_ratio(max_pruning_ratio)
        self.importance = networks.check_importance(importance)
        self.speed_up = None if speed_up is None else float(speed_up)
        self.latency_speed_up = None if latency_speed_up is None else float(latency_speed_up)
        self.latency_batch = int(latency_batch)
        self.round_to = None if round_to is None else int(round_to)
        self.iterative_steps = int(iterative_steps)
        self.input_size = [int(s) for s in input_size]
        networks.example_input(self.input_size)  # validate now, not after minutes of data loading
        self.base_macs: int | None = None
        self.macs: int | None = None
        self.params: int | None = None
        self.speed_up_reached: float | None = None
        self.base_ms: float | None = None
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
            pruner = None if self.round_to is None else networks.criterion_pruner(
                network, example, self.iterative_steps, max_pruning_ratio=self.max_pruning_ratio,
                importance=self.importance, round_to=self.round_to)
            if self.latency_speed_up is None:
                assert self.speed_up is not None
                networks.prune_to_speed_up(
                    network, example, self.speed_up, self.base_macs, self.iterative_steps,
                    pruner=pruner, max_pruning_ratio=self.max_pruning_ratio,
                    importance=self.importance)
            else:
                measured = self._prune_to_latency(trainer, model, example, pruner)
        self.macs = networks.count_macs(network, example)
        reached = self.speed_up_reached = self.base_macs / self.macs  # what either target took
        self.params = networks.count_params(network)
        target = f"{self.speed_up}x" if self.latency_speed_up is None else \
            f"latency {self.latency_speed_up}x at batch {self.latency_batch}, reached " \
            f"{self.latency_speed_up_reached:.3f}x: {self.base_ms:.3f} -> {self.ms:.3f} ms " \
            f"on {example.device.type}"
        rank_zero_info(
            f"pruned {model.arch['name']}: {before:,} -> {self.macs:,} MACs, "
            f"{self.params:,} params, speed-up {reached:.3f}x "
            f"(target {target}, base {self.base_macs:,} MACs)")
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/speed_up": reached,
                                "pruning/macs": float(self.macs),
                                "pruning/params": float(self.params),
                                "pruning/base_macs": float(self.base_macs), **measured}, step=0)

    def _prune_to_latency(self, trainer: Trainer, model: ImageClassifier, example: torch.Tensor,
                          pruner: Any) -> dict[str, float]:
        """Prune ``model.network`` until its measured latency speed-up against the unpruned
        architecture reaches the target. Every rank times its own copy, but rank 0's reading
        decides, so all ranks stop at the same step and remove the same channels. A resumed
        fit loads the checkpoint's shapes (the layers resized to them first)."""
        network = model.network
        if not getattr(model, "_prune_to_speed_up_hook", None):
            model._prune_to_speed_up_hook = model.register_load_state_dict_pre_hook(
                lambda module, state, prefix, *args: reshape_to_state(module, state, prefix))
        measure = rank_zero_clock(trainer, self.input_size, self.latency_batch, example.device)
        unpruned = networks.build_arch(model.arch).to(example.device).eval()
        self.base_ms = min(measure(unpruned), measure(unpruned))  # the faster: a conservative base
        del unpruned
        assert self.latency_speed_up is not None
        reached = networks.prune_to_latency(
            network, example, self.latency_speed_up, self.base_ms, measure, self.iterative_steps,
            pruner=pruner, max_pruning_ratio=self.max_pruning_ratio, importance=self.importance)
        self.latency_speed_up_reached, self.ms = reached, self.base_ms / reached
        return {"pruning/latency_speed_up": reached, "pruning/latency_ms": self.ms,
                "pruning/base_latency_ms": self.base_ms}
