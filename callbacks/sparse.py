"""SparseTraining: DepGraph-style sparse learning, the ``sparse`` baseline of the pipeline.

During an ordinary fit, after every backward and before the optimizer step, torch_pruning's
``GroupNormPruner.regularize(network, alpha, bias=False)`` adds the importance-adaptive group-L2
gradient ``reg * gamma_c * w`` to each channel group (docs/method.md): the same regularizer the
metanetwork is meta-trained with, applied directly to the network's weights instead. For weight
sparsity (``sparsity="weights"``) the regularizer is the L1 penalty ``reg * sum |w|`` on every
convolution and dense weight (``networks.sparsity.L1Regularizer``), as in meta-training with
``sparsity: weights``.

The hook is ``on_before_optimizer_step``, not ``on_after_backward``: with mixed precision the
gradients are still loss-scaled in ``on_after_backward`` and only unscaled right before this
hook, so the added term has the right size in every precision. Under DDP the gradients are
already averaged here and every rank adds the same term (same weights), so ranks stay in sync.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.optim import Optimizer

import networks
from networks.sparsity import L1Regularizer

from .target import classifier


class SparseTraining(Callback):
    """Add DepGraph's group-sparsity gradient at every optimizer step of the fit.

    Args:
        reg: strength of the regularizer (DepGraph's ResNet-56 recipe: 5e-4).
        alpha: adaptivity; the least important group gets ``alpha`` times the pull of the most
            important one.
        input_size: ``[C, H, W]`` of one input image, for tracing the channel groups.
        importance: the pruning criterion whose torch_pruning regularizer is applied: l2
            (DepGraph's adaptive group norm, the default) or bn_scale (L1 on BN scales, network
            slimming, where ``alpha`` is unused).
        sparsity: ``channels`` (the group regularizer of ``importance``) or ``weights`` (L1 on
            single weights, for magnitude and N:M weight sparsity; ``alpha`` and ``importance``
            unused).
        exclude: with ``weights``: module paths left unpenalized (the layers kept dense).

    Logs ``sparse/near_zero_groups`` (fraction of groups, or with ``weights`` of single
    weights, whose normalized norm is below 0.01) at every training epoch end.
    """

    def __init__(self, reg: float = 5e-4, alpha: float = 4.0,
                 input_size: Sequence[int] = (3, 32, 32), importance: str = "l2",
                 sparsity: str = "channels", exclude: Sequence[str] = ()) -> None:
        if reg <= 0 or alpha < 1:
            raise ValueError(f"SparseTraining needs reg > 0 and alpha >= 1 (got reg={reg}, "
                             f"alpha={alpha})")
        if sparsity not in ("channels", "weights"):
            raise ValueError(f"SparseTraining: sparsity={sparsity!r}: expected 'channels' or "
                             "'weights'")
        if exclude and sparsity != "weights":
            raise ValueError("SparseTraining: exclude applies to sparsity='weights' only")
        self.reg, self.alpha = float(reg), float(alpha)
        self.sparsity, self.exclude = sparsity, tuple(exclude)
        self.importance = networks.check_importance(importance, regularized=True)
        self.input_size = [int(s) for s in input_size]
        networks.example_input(self.input_size)
        self.pruner: Any = None  # torch_pruning's group pruner, or an L1Regularizer
        self.network: nn.Module | None = None  # the network the pruner is bound to

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Built here, after setup hooks (a pruned or modified network is final by now).
        network = self.network = classifier(pl_module, "SparseTraining").network
        if self.sparsity == "weights":
            self.pruner = L1Regularizer(network, self.reg, self.exclude)
            return
        example = networks.example_input(self.input_size).to(next(network.parameters()).device)
        # torch_pruning traces dependencies through autograd
        with networks.evaluating(network), torch.enable_grad():
            self.pruner = networks.criterion_pruner(network, example, reg=self.reg, alpha=self.alpha,
                                                    importance=self.importance)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: Optimizer) -> None:
        # the module checked once at fit start, not at every step
        self.pruner.regularize(self.network, alpha=self.alpha, bias=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(self.pruner, L1Regularizer):
            assert self.network is not None  # bound at fit start
            fraction = (self.pruner.norms(self.network) < networks.NEAR_ZERO).float().mean()
        else:
            fraction = networks.near_zero_fraction(self.pruner)
        pl_module.log("sparse/near_zero_groups", fraction, on_epoch=True, prog_bar=False)
