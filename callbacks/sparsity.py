"""WeightSparsity: unstructured or N:M weight sparsity inside any Lightning fit.

At the start of the chosen epoch the callback masks weights of the network's convolutions and
dense layers (networks.sparsity: magnitude over all of them or per layer, or N:M along the input
channels); ``torch.nn.utils.prune`` keeps the masked weights at zero through every later step.
At the end of training the masks are folded into plain weights, so what the fit's other
callbacks save or export is the unmasked architecture with zeros. A checkpoint written while
masks were on loads back into a fresh module: the masks are re-created from it first.

Lightning's own ``ModelPruning`` prunes every parameter of the chosen names (BatchNorm scales
too, unless each layer is listed by hand) and has no N:M pattern; this callback picks the layers
a sparse kernel can use and adds N:M.
"""
from __future__ import annotations

from typing import Any, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from networks.sparsity import (
    SCOPES,
    check_nm,
    make_permanent,
    masks_from_state,
    sparsify,
    weight_sparsity,
)


class WeightSparsity(Callback):
    """Zero individual weights of ``pl_module`` (or of its attribute ``module``) during ``fit``.

    Args:
        sparsity: the fraction of zero weights over the chosen layers, in [0, 1); or
        nm: ``[n, m]``: keep the ``n`` largest of every ``m`` consecutive weights along the input
            channels (``[2, 4]``: the pattern sparse tensor cores run). Exactly one of the two.
        scope: ``global`` (one magnitude threshold over all chosen layers) or ``layer`` (the
            same fraction in each); magnitude sparsity only.
        exclude: module paths (as in ``named_modules``) left dense, e.g. the classifier.
        epoch: the epoch at whose start the masks are chosen (from the weights as trained so far).
        module: attribute of the LightningModule holding the network; None: the module itself.
    """

    def __init__(self, sparsity: float | None = None, nm: Sequence[int] | None = None,
                 scope: str = "global", exclude: Sequence[str] = (), epoch: int = 0,
                 module: str | None = None) -> None:
        if (sparsity is None) == (nm is None):
            raise ValueError("WeightSparsity: give exactly one of sparsity (e.g. 0.5) or nm "
                             "(e.g. [2, 4])")
        if sparsity is not None and not 0.0 <= sparsity < 1.0:
            raise ValueError(f"WeightSparsity: sparsity={sparsity} must lie in [0, 1)")
        if nm is not None and (len(nm) != 2 or not 0 < nm[0] < nm[1]):
            raise ValueError(f"WeightSparsity: nm={list(nm)} must be [n, m] with 0 < n < m, "
                             "e.g. [2, 4]")
        if scope not in SCOPES:
            raise ValueError(f"WeightSparsity: scope={scope!r}: expected one of {SCOPES}")
        if epoch < 0:
            raise ValueError(f"WeightSparsity: epoch={epoch} must be >= 0")
        self.sparsity, self.scope, self.epoch, self.module = sparsity, scope, int(epoch), module
        self.nm = (int(nm[0]), int(nm[1])) if nm is not None else None
        self.exclude = tuple(exclude)
        self.applied = False

    def network(self, pl_module: LightningModule) -> nn.Module:
        return pl_module if self.module is None else getattr(pl_module, self.module)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict["applied"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Checks the layers now (before any training); a checkpoint written with masks on
        re-creates them before its weights load."""
        if stage != "fit":
            return
        if self.nm is not None:  # a layer N:M cannot cover fails here, not at epoch `epoch`
            check_nm(self.network(pl_module), *self.nm, exclude=self.exclude)
        if not getattr(pl_module, "_weight_sparsity_hook", None):
            pl_module._weight_sparsity_hook = pl_module.register_load_state_dict_pre_hook(
                lambda module, state, prefix, *args: masks_from_state(module, state, prefix))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.applied or trainer.current_epoch < self.epoch:
            return
        network = self.network(pl_module)
        sparsify(network, self.sparsity, self.nm, self.scope, self.exclude)
        self.applied = True
        what = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:g} ({self.scope})"
        reached = weight_sparsity(network, self.exclude)
        rank_zero_info(f"WeightSparsity: {what} at epoch {trainer.current_epoch}: "
                       f"{reached:.3f} of the weights are zero")
        for logger in trainer.loggers:  # beside PruneToSpeedUp's pruning/* tags
            logger.log_metrics({"pruning/weight_sparsity": reached}, step=trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Plain weights again (zeros where masked) before ``on_fit_end`` exports anything."""
        make_permanent(self.network(pl_module))
