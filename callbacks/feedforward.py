"""MetanetworkFeedforward: the metanetwork step of the pruning pipeline, as a Lightning callback.

In ``setup`` (stage ``"fit"``) the callback encodes ``pl_module.network`` as a graph, runs the
metanetwork of a ``MetaPruningModule`` checkpoint on it, decodes the result and loads it into the
network. ``setup`` runs before ``configure_optimizers`` and before a checkpoint is restored, so

* the finetune that follows in the same fit trains the modified weights, and
* resuming a killed finetune works: the feedforward is deterministic, then ``last.ckpt`` loads.

``SaveNetwork`` (listed after it, or after ``PruneToSpeedUp``) writes the network as it is after
the setup-time change, so the pipeline can report the accuracy right after that step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.utils import prune

import networks
from graph.apply import feedforward
from lightning_modules.checkpoints import load_metanetwork
from networks.sparsity import unmasked_copy

from .target import classifier


class MetanetworkFeedforward(Callback):
    """Modify ``pl_module.network`` with a trained metanetwork before the fit trains it.

    Args:
        checkpoint: a ``MetaPruningModule`` checkpoint (meta-training output).
        input_size: ``[C, H, W]`` of one input image, for tracing the network.
    """

    def __init__(self, checkpoint: str, input_size: Sequence[int] = (3, 32, 32)) -> None:
        self.checkpoint = str(checkpoint)
        self.input_size = [int(s) for s in input_size]
        networks.example_input(self.input_size)  # validate now, not after data loading
        self.done = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.done:  # once per module
            return
        model = classifier(pl_module, "MetanetworkFeedforward")
        metanetwork = load_metanetwork(self.checkpoint)
        feedforward(metanetwork, model.network, networks.example_input(self.input_size),
                    f"metanetwork checkpoint {self.checkpoint!r}", f"network {model.arch['name']!r}")
        self.done = True
        rank_zero_info(f"metanetwork feedforward applied ({self.checkpoint})")


class SaveNetwork(Callback):
    """Save ``pl_module.network`` to ``<log_dir>/<filename>`` (network file format) in ``setup``
    or, ``when="train_start"``, at the start of the fit's first epoch.

    List it after a callback that changes the network then (feedforward and pruning in
    ``setup``; ``WeightSparsity`` at the start of epoch 0) to keep the network as it is right
    after that change; weight masks are folded into the saved copy (zeros in place). Written by
    rank 0, atomically; a file already there is kept (a resumed run recomputes the same
    deterministic change), and ``train_start`` writes nothing in a fit resumed past epoch 0.
    """

    def __init__(self, filename: str, when: Literal["setup", "train_start"] = "setup") -> None:
        if when not in ("setup", "train_start"):
            raise ValueError(f"SaveNetwork: when={when!r}: expected 'setup' or 'train_start'")
        self.filename, self.when = filename, when
        self.path: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        if self.when == "setup":
            self._save(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "train_start" and trainer.current_epoch == 0:
            self._save(trainer, pl_module)

    def _save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.path is not None
        if trainer.is_global_zero and not self.path.is_file():
            model = classifier(pl_module, "SaveNetwork")
            network = unmasked_copy(model.network) if prune.is_pruned(model.network) else model.network
            networks.save_network(network, self.path, arch=model.arch, metadata=model.lineage())
