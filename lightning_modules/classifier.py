"""ImageClassifier: train, finetune or evaluate any target network (pruned ones included)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torchmetrics.classification import MulticlassAccuracy

import networks

from .distributed import destroy_process_group_at_exit


class ImageClassifier(LightningModule):
    """Cross-entropy training with SGD and a per-epoch MultiStepLR.

    Args:
        network: a name for ``networks.build`` (e.g. ``resnet56_cifar``, ``resnet50``).
        num_classes: outputs of the network; must equal the data's class count.
        network_kwargs: extra ``networks.build`` arguments, e.g. ``{"width": 0.5}``.
        weights: a network file (``networks.save_network``) to start from, pruned or not;
            its architecture must match ``network`` and ``num_classes``.
        lr, momentum, weight_decay, nesterov: SGD settings.
        milestones, gamma: MultiStepLR, in epochs.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(self, network: str, num_classes: int = 10, network_kwargs: dict[str, Any] | None = None,
                 weights: str | None = None, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, milestones: list[int] | None = None, gamma: float = 0.1,
                 label_smoothing: float = 0.0, nesterov: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.arch: dict[str, Any] = {"name": network, "num_classes": num_classes,
                                     "kwargs": dict(network_kwargs or {})}
        # The data splits the weights were trained on, oldest first (DataSplit records): they
        # travel with the weights into every network file written from this module.
        self.trained_on: list[dict] = []
        if weights is None:
            self.network = networks.build(network, num_classes, **self.arch["kwargs"])
        else:
            self.network, record = networks.load_network(weights)
            stored = record["arch"]
            if (stored["name"], stored["num_classes"]) != (network, num_classes):
                raise networks.CheckpointError(
                    f"network file {weights!r} holds {stored['name']} with {stored['num_classes']} "
                    f"classes, but model.network={network!r} and model.num_classes={num_classes}; "
                    "make them agree with the file"
                )
            self.arch = stored  # keeps the unpruned build recipe of the file
            self.trained_on = list(record["metadata"].get("trained_on") or [])
        # One metric object per split: their running states must never mix.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        # Omegaconf interpolations resolve when the config loads, so a command-line override of
        # the data's class count does not reach the model: catch that here, not as a CUDA assert.
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes={self.hparams.num_classes} but the data has {data_classes} "
                f"classes; set --model.init_args.num_classes {data_classes}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self.network(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = getattr(self, f"{split}_acc")
        acc(logits, y)
        # Epoch means only, so the logged keys are exactly "<split>/loss" and "<split>/acc".
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True,
                 prog_bar=True, batch_size=len(y))
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        opt = torch.optim.SGD(self.network.parameters(), lr=hp.lr, momentum=hp.momentum,
                              weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones or []),
                                                     gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def lineage(self, datamodule: Any = None) -> dict:
        """Metadata that travels with the weights: ``{"trained_on": [split, ...]}``, the splits
        of the weights file plus ``datamodule``'s (when given: the data this fit trained on).
        Evaluations read it to make sure they never score a network on its training images."""
        splits = list(self.trained_on)
        split = getattr(datamodule, "split", None)
        if split is not None and split.as_dict() not in splits:
            splits.append(split.as_dict())
        return {"trained_on": splits}

    def export_network(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Save the network as a network file (atomic; loadable with ``networks.load_network``),
        with its lineage (the data splits its weights were trained on) in the metadata."""
        return networks.save_network(self.network, path, arch=self.arch,
                                     metadata={**self.lineage(), **(metadata or {})})
