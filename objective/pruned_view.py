"""A meta-training loss on the network as pruning will leave it (ours, not the paper's; issue 13).

The paper's objective reads only the rewritten network itself: its cross-entropy plus a
group-sparsity pull. What pruning keeps of it is never seen, so nothing asks the metanetwork to
put the function into the channels that survive. The pruned view adds that: each step, the
lowest-ranked channels under the pruning criterion (global group-L2 ranking, the classifier
excluded; ``networks.criterion_pruner``) are removed from the working copy, whole
torch_pruning groups at a time, and the same image batches' loss is taken through what is left.

Removal is by masking, so no tensor changes shape: every layer whose output channels a removed
group prunes (convolutions, BatchNorms, linear layers) has those channels set to zero after it
runs. A channel zeroed at every layer that writes it is zero wherever it is read, so the
network computes what the physically pruned network computes, and the removed weights get no
gradient (tested against torch_pruning's own pruning). BatchNorm runs on batch statistics for
the view: after pruning, the stored statistics of the remaining channels are stale, and what the
pipeline measures and finetunes is the network with statistics recomputed (docs/pruning.md).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

# The dimension of a layer's output that holds its channels.
_CHANNEL_DIM: dict[type, int] = {nn.modules.conv._ConvNd: 1, nn.modules.batchnorm._BatchNorm: 1,
                                 nn.Linear: -1, nn.LayerNorm: -1}


@dataclass(frozen=True)
class PrunedView:
    """``weight``: the view's loss is added to each batch's loss with this factor (0: off, the
    paper's objective). ``fraction``: each step removes a fraction of the prunable channels
    drawn uniformly from this range."""

    weight: float = 0.0
    fraction: tuple[float, float] = (0.1, 0.4)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"pruned view weight={self.weight} must be at least 0 (0: off)")
        if len(self.fraction) != 2 or not 0.0 < self.fraction[0] <= self.fraction[1] < 1.0:
            raise ValueError(f"pruned view fraction={list(self.fraction)} must be [low, high] "
                             "with 0 < low <= high < 1: the share of prunable channels removed")

    @property
    def enabled(self) -> bool:
        """Whether the view adds anything to the loss."""
        return self.weight > 0

    def draw(self, generator: torch.Generator | None = None) -> float:
        """This step's fraction of channels to remove."""
        low, high = self.fraction
        return low + (high - low) * float(torch.rand((), generator=generator))


@torch.no_grad()
def lowest_channel_masks(pruner, fraction: float) -> dict[nn.Module, torch.Tensor]:
    """Per layer of ``pruner.model``, a 0/1 mask over its output channels that removes the
    ``fraction`` of prunable channels the pruner ranks lowest (its importance, normalized per
    group, ranked over all groups at once as global pruning does). A group keeps at least its
    highest-ranked channel, as pruning never empties a layer. Layers left whole are absent."""
    scored = [(g, imp) for g in pruner._groups
              if (imp := pruner.estimate_importance(g)) is not None and torch.isfinite(imp).all()]
    if not scored:
        return {}
    ranking = torch.cat([imp for _, imp in scored])
    count = int(fraction * len(ranking))
    if count == 0:
        return {}
    threshold = ranking.kthvalue(count).values
    layers = set(pruner.model.modules())
    masks: dict[nn.Module, torch.Tensor] = {}
    for group, imp in scored:
        removed = (imp <= threshold).nonzero().flatten()
        if len(removed) == len(imp):
            removed = removed[removed != imp.argmax()]
        if len(removed) == 0:
            continue
        root = group[0].dep
        whole = pruner.DG.get_pruning_group(root.target.module, root.handler, removed.tolist())
        for dep, idxs in whole:
            layer = dep.target.module
            if layer in layers and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                if layer not in masks:
                    masks[layer] = torch.ones(pruner.DG.get_out_channels(layer),
                                              device=imp.device)
                masks[layer][list(idxs)] = 0.0
    return masks


def _channel_dim(layer: nn.Module) -> int:
    for kind, dim in _CHANNEL_DIM.items():
        if isinstance(layer, kind):
            return dim
    raise ValueError(f"the pruned view masks output channels of convolution, BatchNorm, linear "
                     f"and LayerNorm layers; a group to remove also prunes a "
                     f"{type(layer).__name__}. Set model.init_args.pruned_view: 0 for this "
                     "architecture")


def _mask_output(mask: torch.Tensor, dim: int, layer: nn.Module, inputs, output: torch.Tensor
                 ) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[dim] = -1
    return output * mask.view(shape)


@contextlib.contextmanager
def masked(masks: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Within the block, each layer in ``masks`` zeroes its output channels where the mask is 0."""
    hooks = [layer.register_forward_hook(functools.partial(_mask_output, mask, _channel_dim(layer)))
             for layer, mask in masks.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s BatchNorms normalize with each batch's own statistics and
    leave their running statistics (and batch counters) as they were."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None
              else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (training, momentum, tracked) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)
