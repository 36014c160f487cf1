"""Shape records per layer type: what a pruned layer needs beyond its constructor.

Channel pruning shrinks a layer's tensors but not the constructor arguments that sized them
(``out_channels``, ``num_features``, ...). A network file stores those attributes per layer
(``networks.checkpoint``), the zoo manifest the output width per layer; both read them through
this registry, and ``graph.register_module(..., shape=...)`` adds a type to it together with
its graph encoding, so a new layer type is declared in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, cast

import torch
from torch import nn

# A layer's own tensors (by local name, e.g. "weight") -> its shape attributes, or None when
# the tensors that fix them are absent.
Infer = Callable[[nn.Module, Mapping[str, torch.Tensor]], "dict[str, int] | None"]


@dataclass(frozen=True)
class LayerShape:
    """How a layer type's shape attributes follow its tensors.

    Args:
        attrs: the attributes stored per layer and set back on load.
        infer: their values from the layer's tensors (a pruned copy's state).
        width: the attribute that is the layer's output width (zoo manifests), if any.
    """

    attrs: tuple[str, ...]
    infer: Infer
    width: str | None = None


_LAYER_SHAPES: dict[type, LayerShape] = {}


def register_layer_shape(shape: LayerShape, *types: type) -> None:
    """Record ``shape`` for ``types`` and their subclasses (unless one has its own)."""
    for t in types:
        _LAYER_SHAPES[t] = shape


def layer_shape(module: nn.Module) -> LayerShape | None:
    """The shape record of ``module``'s type (nearest registered base class), or None."""
    return next((_LAYER_SHAPES[t] for t in type(module).__mro__ if t in _LAYER_SHAPES), None)


def _conv(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    weight = tensors.get("weight")
    if weight is None:
        return None
    # channel pruning keeps a depthwise conv depthwise: its groups follow its channels
    conv = cast(nn.modules.conv._ConvNd, m)
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    groups = int(weight.shape[0]) if depthwise else int(conv.groups)
    return {"in_channels": int(weight.shape[1]) * groups, "out_channels": int(weight.shape[0]),
            "groups": groups}


def _linear(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    weight = tensors.get("weight")
    return None if weight is None else {"in_features": int(weight.shape[1]),
                                        "out_features": int(weight.shape[0])}


def _norm(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    per_channel = tensors.get("weight", tensors.get("running_mean"))
    return None if per_channel is None else {"num_features": int(per_channel.shape[0])}


register_layer_shape(LayerShape(("in_channels", "out_channels", "groups"), _conv, "out_channels"),
                     nn.modules.conv._ConvNd)
register_layer_shape(LayerShape(("in_features", "out_features"), _linear, "out_features"),
                     nn.Linear)
register_layer_shape(LayerShape(("num_features",), _norm), nn.modules.batchnorm._NormBase)
