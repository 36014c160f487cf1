"""ExportNetwork: the best checkpoint's network of a fit, saved as a network file."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

import networks
from lightning_modules import ImageClassifier

from .target import best_network


class ExportNetwork(Callback):
    """At the end of fit, save the best checkpoint's network as a network file.

    Runs inside the training processes, so it works under ddp_spawn as well as ddp. Only rank
    0 reads the checkpoint (other nodes may not see its file system) and writes the export,
    into a copy of the network: the module itself keeps its final weights on every rank.
    Without a checkpoint (fast_dev_run) the final weights are exported.
    """

    def __init__(self, filename: str = "network.pt") -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, ImageClassifier):
            return  # meta-training: the module carries no target network to export
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename  # all ranks
        if not trainer.is_global_zero:
            return
        network, score, best = best_network(trainer, pl_module)
        metadata = {"checkpoint": best, "val_acc": score, **pl_module.lineage(trainer.datamodule)}
        networks.save_network(network, self.path, arch=pl_module.arch, metadata=metadata)
        rank_zero_info(f"exported network ({best or 'final weights'}) to {self.path}")
