"""What the target-network callbacks read from the module they run on."""
from __future__ import annotations

import copy

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_modules import ImageClassifier
from networks.sparsity import fold_masked_state


def classifier(pl_module: LightningModule, callback: str) -> ImageClassifier:
    """``pl_module`` as the ImageClassifier (``.network``, ``.arch``) that ``callback`` needs."""
    if not isinstance(pl_module, ImageClassifier):
        raise TypeError(f"{callback} works on lightning_modules.ImageClassifier (its .network and "
                        f".arch), not on {type(pl_module).__name__}; for any other LightningModule "
                        "use callbacks.StructuredPruning")
    return pl_module


def best_network(trainer: Trainer, model: ImageClassifier) -> tuple[nn.Module, float | None, str | None]:
    """(a CPU copy of the network with the best checkpoint's weights, that checkpoint's score,
    its path); the final weights, None and None when the fit kept no checkpoint. A checkpoint
    written while weight masks were on (``WeightSparsity``) loads as the plain weights it
    computes."""
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") if ckpt else ""
    network = copy.deepcopy(model.network).cpu()
    if not best:
        return network, None, None
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    network.load_state_dict(fold_masked_state({k.removeprefix("network."): v for k, v in state.items()
                                               if k.startswith("network.")}))
    score = getattr(ckpt, "best_model_score", None)
    return network, (float(score) if score is not None else None), best
