"""Function-preserving weight-space augmentation of zoo members (ours, not the paper's; issue 13).

A channel that a convolution or linear layer writes and that only a BatchNorm reads is
normalized by that BatchNorm: scaling the channel's weights (and bias) by ``s > 0`` and the
BatchNorm's running mean by ``s`` and running variance by ``s**2`` leaves the eval-mode function
unchanged (up to BatchNorm's ``eps``, which is negligible against trained variances). The weight
norms, and so the magnitude criterion's ranking of channels, do change. Meta-training on such
copies shows the metanetwork many weight settings of one function per member, so it cannot
learn a member's particular norms by heart (the overfitting seen after ~60 steps on 5 members,
docs/meta_training.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from graph import symbolic_trace


@dataclass(frozen=True)
class NormalizedChannels:
    """A layer whose output channels only feed one BatchNorm (state_dict key prefixes)."""

    layer: str
    norm: str


def normalized_channels(network: nn.Module) -> list[NormalizedChannels]:
    """Every conv/linear layer of ``network`` whose output is read by one BatchNorm and nothing
    else (found on its fx graph; a layer whose output also feeds a residual sum or a second
    consumer is left out, as scaling it would change the function)."""
    gm = symbolic_trace(network)
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if not _calls(node, modules, nn.modules.batchnorm._BatchNorm):
            continue
        producer = node.args[0]
        if (isinstance(producer, fx.Node) and len(producer.users) == 1
                and _calls(producer, modules, (nn.modules.conv._ConvNd, nn.Linear))):
            found.append(NormalizedChannels(str(producer.target), str(node.target)))
    return found


def _calls(node: fx.Node, modules: dict[str, nn.Module], types) -> bool:
    return node.op == "call_module" and isinstance(modules[str(node.target)], types)


def rescale_channels(state: dict[str, torch.Tensor], pairs: list[NormalizedChannels],
                     spread: float, generator: torch.Generator | None = None
                     ) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every channel of ``pairs`` scaled by its own factor drawn
    log-uniformly from [1/spread, spread], the BatchNorm statistics compensating."""
    if spread < 1.0:
        raise ValueError(f"spread={spread}: the scale factors lie in [1/spread, spread], so "
                         "spread must be at least 1 (1: no augmentation)")
    out = dict(state)
    for pair in pairs:
        weight = state[f"{pair.layer}.weight"]
        u = torch.rand(weight.shape[0], generator=generator, dtype=torch.float64)
        s = torch.exp((2 * u - 1) * math.log(spread)).to(weight.device, weight.dtype)
        out[f"{pair.layer}.weight"] = weight * s.view(-1, *[1] * (weight.dim() - 1))
        if f"{pair.layer}.bias" in state:
            out[f"{pair.layer}.bias"] = state[f"{pair.layer}.bias"] * s
        out[f"{pair.norm}.running_mean"] = state[f"{pair.norm}.running_mean"] * s
        out[f"{pair.norm}.running_var"] = state[f"{pair.norm}.running_var"] * s * s
    return out
