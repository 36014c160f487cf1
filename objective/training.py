"""The meta-training objective in plain torch (docs/method.md); Lightning-free, so benchmarks
and tests use it directly and ``lightning_modules.MetaPruningModule`` only schedules it.

One step = one zoo member: W' = decode(M(encode(W))); loss = CE of the target network with
weights W' over ``batches_per_step`` image batches + DepGraph's group-sparsity regularizer on W'.

Single backward: W' is copied into a working copy of the member network (detached leaves), the
cross-entropy gradients of all batches accumulate there, torch_pruning's
``GroupNormPruner.regularize`` adds its gradient, and then one backward pushes that gradient
through decode and the metanetwork. Same gradient as backpropagating each batch through the GNN,
at one GNN backward per step and memory independent of the number of batches.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data

import networks
from graph import GraphOptions, Metanetwork, NetworkGraph
from networks.sparsity import L1Regularizer

from .augment import NormalizedChannels, normalized_channels, rescale_channels
from .pruned_view import PrunedView, batch_statistics, lowest_channel_masks, masked


@dataclass
class MemberState:
    """What meta-training keeps per zoo member."""

    graph: NetworkGraph
    data: Data                     # the encoded original weights
    work: nn.Module                # receives the decoded weights; eval mode
    pruner: object                 # torch_pruning GroupNormPruner bound to ``work``

    @classmethod
    def build(cls, network: nn.Module, example: torch.Tensor, reg: float, alpha: float,
              device: torch.device | str = "cpu", options: GraphOptions | None = None,
              importance: str = "l2", sparsity: str = "channels") -> "MemberState":
        """``sparsity``: "channels" (the group regularizer of ``importance``, the paper's) or
        "weights" (L1 on every conv/linear weight, for unstructured and N:M sparsity)."""
        graph = (options or GraphOptions()).graph(network, example)
        work = copy.deepcopy(network).to(device).eval()
        pruner: object
        if sparsity == "weights":
            pruner = L1Regularizer(work, reg)
        else:
            with torch.enable_grad():  # torch_pruning traces dependencies with autograd
                pruner = networks.criterion_pruner(work, example.to(device), reg=reg, alpha=alpha,
                                                   importance=importance)
        data = graph.encode({k: v.to(device) for k, v in network.state_dict().items()})
        return cls(graph, data, work, pruner)

    def prunable_norms(self) -> torch.Tensor:
        """Normalized norms of what pruning removes from ``work``: channel groups
        (``networks.group_norms``) or, for weight sparsity, single weights."""
        if isinstance(self.pruner, L1Regularizer):
            return self.pruner.norms(self.work)
        return networks.group_norms(self.pruner)

    @functools.cached_property
    def channels(self) -> list[NormalizedChannels]:
        """What weight-space augmentation may rescale (traced on first use only)."""
        return normalized_channels(self.work)

    def augmented(self, spread: float) -> Data:
        """The encoded weights, every BN-normalized channel rescaled by a random factor in
        [1/spread, spread] (the same function, other norms; ``objective.augment``)."""
        if spread == 1.0:
            return self.data
        weights = self.graph.decode(self.data)
        return self.graph.encode(rescale_channels(weights, self.channels, spread))


def meta_loss(metanetwork: Metanetwork, member: MemberState, images: torch.Tensor,
              labels: torch.Tensor, alpha: float, distill: float = 0.0, augment: float = 1.0,
              view: PrunedView | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce, regularizer value, surrogate): backpropagating the scalar ``surrogate`` gives the
    metanetwork the gradient of the objective (``weight_gradients``) + regularizer, through one
    GNN backward. ``distill`` > 0 mixes in the original network's predictions as soft targets;
    ``augment`` > 1 feeds the metanetwork a randomly rescaled copy of the member's weights
    (``MemberState.augmented``); ``view`` adds the loss of the network as pruning leaves it
    (``objective.pruned_view``).

    The metanetwork runs twice: without autograd for the image batches, then with it for the
    surrogate. Holding its activations (gigabytes for ResNet-56) through all the batches made
    each batch slower than the same batch alone; one extra forward costs less."""
    soft = original_predictions(member, images) if distill > 0 else None
    data = member.augmented(augment)
    with torch.no_grad():
        weights = member.graph.decode(metanetwork(data))
    ce, sparsity, grads = weight_gradients(member.work, weights, images, labels, member.pruner,
                                           alpha, soft, distill, view)
    weights = member.graph.decode(metanetwork(data))
    # d(surrogate)/dW' equals the accumulated gradient.
    surrogate = torch.stack([(weights[name] * g).sum() for name, g in grads.items()]).sum()
    return ce, sparsity, surrogate


@torch.no_grad()
def original_predictions(member: MemberState, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities [K, B, classes] of the member's original network on ``images``."""
    load_weights(member.work, member.graph.decode(member.data))
    return torch.stack([F.softmax(member.work(x), dim=1) for x in images])


def load_weights(work: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (every floating tensor) into ``work``'s parameters and buffers."""
    with torch.no_grad():
        for name, t in [*work.named_parameters(), *work.named_buffers()]:
            if name in weights:
                t.copy_(weights[name])


def weight_gradients(work: nn.Module, weights: dict[str, torch.Tensor], images: torch.Tensor,
                     labels: torch.Tensor, pruner, alpha: float,
                     soft: torch.Tensor | None = None, distill: float = 0.0,
                     view: PrunedView | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """dL/dW' for the decoded weights ``weights``: the cross-entropy summed over the batches in
    ``images`` [K, B, ...] (docs/method.md) plus the group-sparsity gradient. With ``soft``
    (the original network's probabilities, [K, B, classes]) each batch's loss is
    ``(1 - distill) * CE(labels) + distill * CE(soft)`` (ours, not the paper's: distillation
    gives a denser signal per image). With an enabled ``view`` each batch also runs through
    the network with its lowest-ranked channels removed (one fraction for the step, chosen on
    ``weights``), and that loss, times ``view.weight``, is added (ours, ``objective.pruned_view``).
    Returns (label cross-entropy of the full network summed over the batches, regularizer value,
    gradients by parameter name). ``work`` is overwritten with ``weights``."""
    params = dict(work.named_parameters())
    load_weights(work, weights)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    view = view or PrunedView()
    masks = lowest_channel_masks(pruner, view.draw()) if view.enabled else {}

    def batch_loss(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = work(x)
        label_ce = F.cross_entropy(logits, labels[k])
        if soft is None:
            return label_ce, label_ce
        return label_ce, (1.0 - distill) * label_ce + distill * F.cross_entropy(logits, soft[k])

    ce = torch.zeros((), device=images.device)
    for k, x in enumerate(images):
        label_ce, loss = batch_loss(x, k)
        ce += label_ce.detach()
        loss.backward()
        if masks:
            with masked(masks), batch_statistics(work):
                (view.weight * batch_loss(x, k)[1]).backward()
    before = {name: _grad(p).clone() for name, p in params.items()}
    pruner.regularize(work, alpha=alpha, bias=False)
    # The group regularizer adds reg * gamma * w, the gradient of reg/2 * gamma * |w|^2 (scale
    # 1/2); the L1 one adds reg * sign(w), the gradient of reg * |w| (its penalty_scale, 1).
    scale = getattr(pruner, "penalty_scale", 0.5)
    sparsity = scale * torch.stack([((_grad(p) - before[n]) * p.detach()).sum()
                                    for n, p in params.items()]).sum()
    return ce, sparsity, {name: _grad(p) for name, p in params.items()}


def _grad(p: nn.Parameter) -> torch.Tensor:
    assert p.grad is not None  # weight_gradients zeroes every .grad first
    return p.grad
