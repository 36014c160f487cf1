"""Shape records per layer type: what a pruned layer needs beyond its constructor.

Channel pruning shrinks a layer's tensors but not the constructor arguments that sized them
(``out_channels``, ``num_features``, ...). A network file stores those attributes per layer
(``networks.checkpoint``), the zoo manifest the output width per layer; both read them through
this registry, and ``graph.register_module(..., shape=...)`` adds a type to it together with
its graph encoding, so a new layer type is declared in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Union, cast

import torch
import torchvision
from torch import nn

# A shape attribute: a size, or a tuple of sizes (LayerNorm's normalized_shape)
ShapeValue = Union[int, tuple[int, ...]]
# A layer's own tensors (by local name, e.g. "weight") -> its shape attributes, or None when
# the tensors that fix them are absent.
Infer = Callable[[nn.Module, Mapping[str, torch.Tensor]], "dict[str, ShapeValue] | None"]


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


def _conv(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, ShapeValue] | None:
    weight = tensors.get("weight")
    if weight is None:
        return None
    # channel pruning keeps a depthwise conv depthwise: its groups follow its channels
    conv = cast(nn.modules.conv._ConvNd, m)
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    groups = int(weight.shape[0]) if depthwise else int(conv.groups)
    return {"in_channels": int(weight.shape[1]) * groups, "out_channels": int(weight.shape[0]),
            "groups": groups}


def _linear(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, ShapeValue] | None:
    weight = tensors.get("weight")
    return None if weight is None else {"in_features": int(weight.shape[1]),
                                        "out_features": int(weight.shape[0])}


def _norm(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, ShapeValue] | None:
    per_channel = tensors.get("weight", tensors.get("running_mean"))
    return None if per_channel is None else {"num_features": int(per_channel.shape[0])}


def _group_norm(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, ShapeValue] | None:
    # channel pruning removes the same positions from every group (torch_pruning's channel
    # groups), so the group count stays and only the channel count follows the tensors
    weight = tensors.get("weight")
    return None if weight is None else {"num_channels": int(weight.shape[0])}


register_layer_shape(LayerShape(("in_channels", "out_channels", "groups"), _conv, "out_channels"),
                     nn.modules.conv._ConvNd)
register_layer_shape(LayerShape(("in_features", "out_features"), _linear, "out_features"),
                     nn.Linear)
register_layer_shape(LayerShape(("num_features",), _norm), nn.modules.batchnorm._NormBase)
register_layer_shape(LayerShape(("num_channels",), _group_norm), nn.GroupNorm)


def _layer_norm(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, ShapeValue] | None:
    weight = tensors.get("weight", tensors.get("bias"))
    return None if weight is None else {"normalized_shape": tuple(int(n) for n in weight.shape)}


def _attention(m: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, ShapeValue] | None:
    # torch computes the head size from the input's width (embed_dim // num_heads), so channel
    # pruning keeps query, key and value as wide as the input; heads are not removed
    weight = tensors.get("in_proj_weight")
    if weight is None:
        return None
    width, heads = int(weight.shape[1]), int(cast(nn.MultiheadAttention, m).num_heads)
    return {"embed_dim": width, "kdim": width, "vdim": width, "head_dim": width // heads}


def _vision_transformer(m: nn.Module, tensors: Mapping[str, torch.Tensor]
                        ) -> dict[str, ShapeValue] | None:
    token = tensors.get("class_token")  # its forward reshapes the patches to hidden_dim
    return None if token is None else {"hidden_dim": int(token.shape[-1])}


register_layer_shape(LayerShape(("normalized_shape",), _layer_norm), nn.LayerNorm)
register_layer_shape(LayerShape(("embed_dim", "kdim", "vdim", "head_dim"), _attention),
                     nn.MultiheadAttention)
register_layer_shape(LayerShape(("hidden_dim",), _vision_transformer),
                     torchvision.models.VisionTransformer)


def sync_layer_shapes(model: nn.Module) -> None:
    """Set every registered shape attribute of ``model``'s layers from their tensors (after
    channel pruning: torch_pruning resizes tensors and the attributes it knows, not e.g. a
    VisionTransformer's ``hidden_dim``, which its forward reads)."""
    for m in model.modules():
        shape = layer_shape(m)
        if shape is None:
            continue
        tensors = {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}
        for attr, value in (shape.infer(m, tensors) or {}).items():
            setattr(m, attr, value)
