"""PruneToSpeedUp: structured pruning as a step of an ordinary Lightning fit.

The callback prunes ``pl_module.network`` in its ``setup`` hook for stage ``"fit"``. Lightning
calls ``setup`` before ``configure_optimizers`` and before it restores a checkpoint, so

* the optimizer is built over the pruned parameters, and
* resuming a killed finetune (``ckpt_path=last.ckpt``) works: the same weights prune to the same
  widths (the magnitude criterion is deterministic), then the checkpoint's pruned state loads.

Speed-up = MACs(unpruned architecture) / MACs(pruned network), where the unpruned architecture
is rebuilt from ``pl_module.arch`` with ``networks.build``: pruning done before this run (the
zoo's initial prune) counts toward the target (docs/method.md).
"""
from __future__ import annotations

from typing import Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

import networks

from .target import classifier


class PruneToSpeedUp(Callback):
    """Prune the module's network to ``speed_up`` x fewer MACs than its unpruned architecture.

    Args:
        speed_up: target MACs(unpruned) / MACs(pruned); reached or exceeded by the smallest step.
        iterative_steps: pruning steps of the global group-L2 magnitude pruner (docs/method.md).
        input_size: ``[C, H, W]`` of one input image, for tracing and MAC counting.
        max_pruning_ratio: the criterion's per-layer cap (``networks.criterion_pruner``); 1, the
            paper's setting, leaves global ranking uncapped.
        importance: the criterion (``networks.IMPORTANCES``; l2, the paper's).

    After ``setup`` the attributes ``base_macs``, ``macs``, ``params`` and ``speed_up_reached``
    hold the result; they are also logged (``pruning/*``, the tags of ``StructuredPruning``)
    to the trainer's loggers.
    """

    def __init__(self, speed_up: float, iterative_steps: int = 200,
                 input_size: Sequence[int] = (3, 32, 32), max_pruning_ratio: float = 1.0,
                 importance: str = "l2") -> None:
        if speed_up <= 1.0:
            raise ValueError(f"speed_up={speed_up} must be above 1 (MACs(unpruned) / MACs(pruned))")
        self.max_pruning_ratio = networks.check_max_pruning_ratio(max_pruning_ratio)
        self.importance = networks.check_importance(importance)
        self.speed_up = float(speed_up)
        self.iterative_steps = int(iterative_steps)
        self.input_size = [int(s) for s in input_size]
        networks.example_input(self.input_size)  # validate now, not after minutes of data loading
        self.base_macs: int | None = None
        self.macs: int | None = None
        self.params: int | None = None
        self.speed_up_reached: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.speed_up_reached is not None:  # prune once per module
            return
        model = classifier(pl_module, "PruneToSpeedUp")
        network = model.network
        example = networks.example_input(self.input_size).to(next(network.parameters()).device)
        self.base_macs = networks.base_macs(model.arch, example.cpu())
        before = networks.count_macs(network, example)
        with networks.evaluating(network):
            self.speed_up_reached = networks.prune_to_speed_up(
                network, example, self.speed_up, self.base_macs, self.iterative_steps,
                max_pruning_ratio=self.max_pruning_ratio, importance=self.importance)
        self.macs = networks.count_macs(network, example)
        self.params = networks.count_params(network)
        rank_zero_info(
            f"pruned {model.arch['name']}: {before:,} -> {self.macs:,} MACs, "
            f"{self.params:,} params, speed-up {self.speed_up_reached:.3f}x "
            f"(target {self.speed_up}x, base {self.base_macs:,} MACs)")
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/speed_up": self.speed_up_reached,
                                "pruning/macs": float(self.macs),
                                "pruning/params": float(self.params),
                                "pruning/base_macs": float(self.base_macs)}, step=0)
