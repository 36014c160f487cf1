"""The registry of how each module type and each function maps channels in the torch.fx walk,
and the handlers registered into it (one per layer or operation, after Torch-Pruning's
per-operation handler registry).

:func:`register_module` and :func:`register_function` declare a handler; :class:`graph.walker.Walker`
looks one up for every call (:func:`module_handler`, :func:`function_handler`), and the
tracer (:mod:`graph.tracing`) keeps registered module types as leaves. docs/graph.md, "Adding a
module type", has an example.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import fx, nn
from torchvision.models import maxvit, swin_transformer

from networks.layers import LayerShape, register_layer_shape

from .layer_ops import LayerOps
from .tensor_ops import TensorOps
from .walker_core import Env, Value, call_arg

if TYPE_CHECKING:
    from .walker import Walker

# Operations that act on each element (or each sample) alone: any channel layout. Dropout and
# stochastic depth are traced in eval mode, where they are the identity.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.elu, F.selu, F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout2d,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torchvision.ops.stochastic_depth,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float", "detach",
)
# Pooling works on the dims after dim 1: the channels must be in dim 1.
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_SPATIAL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)
_RESHAPES = (torch.flatten, "flatten", "view", "reshape", torch.reshape, torch.unsqueeze,
             "unsqueeze", torch.squeeze, "squeeze")
_PERMUTES = (torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes",
             torch.swapdims, "swapdims")
_SPLITS = (torch.chunk, "chunk", torch.split, "split")
_REDUCTIONS = (torch.mean, "mean", torch.amax, "amax", torch.amin, "amin")
_MULTIPLY = (operator.mul, operator.imul, torch.mul, "mul")
_DIVIDE = (operator.truediv, operator.itruediv, torch.div, "div")


# -- the registries: how each module type and each function maps channels -------------------
ModuleHandler = Callable[["Walker", fx.Node, nn.Module, fx.Node, Value], Env]
FunctionHandler = Callable[["Walker", fx.Node, list], Env]
_MODULE_HANDLERS: dict[type, ModuleHandler] = {}
_FUNCTION_HANDLERS: dict[object, FunctionHandler] = {}


def register_module(*types: type, shape: LayerShape | None = None
                    ) -> Callable[[ModuleHandler], ModuleHandler]:
    """Decorator: ``handler(walker, node, module, arg, value) -> Value`` encodes modules of
    ``types`` (and their subclasses that keep its ``forward``, unless a subclass has its own
    handler; a subclass with its own ``forward`` is traced through).

    The handler gets the walker (``new_nodes``, ``add_weight``, ``add_channels``,
    ``passthrough``, ``channels_first``, ``channels_last``, ``fail``), the fx node of the call,
    the module, the input node and its channel ``Value``, and returns the output's ``Value``.
    Registered types are traced as leaves: torch.fx records one call instead of inlining their
    forward. ``shape``: how the type's constructor attributes follow its tensors
    (``networks.LayerShape``), for a type whose tensors channel pruning resizes, so that
    network files and zoo manifests record it too. docs/graph.md has an example."""
    def register(handler: ModuleHandler) -> ModuleHandler:
        for t in types:
            _MODULE_HANDLERS[t] = handler
        if shape is not None:
            register_layer_shape(shape, *types)
        return handler
    return register


def register_function(*targets) -> Callable[[FunctionHandler], FunctionHandler]:
    """Decorator: ``handler(walker, node, args) -> Value`` encodes calls of ``targets``
    (functions, or method names as strings); ``args`` are the call's (fx node, ``Value``)
    pairs that carry channels, in argument order."""
    def register(handler: FunctionHandler) -> FunctionHandler:
        for t in targets:
            _FUNCTION_HANDLERS[t] = handler
        return handler
    return register


def module_handler(module_type: type) -> ModuleHandler | None:
    """The handler of ``module_type``: its own, else that of its nearest registered base if
    ``module_type`` keeps that base's ``forward`` (an overriding forward computes something
    else, so it is traced through instead)."""
    for t in module_type.__mro__:
        if t in _MODULE_HANDLERS:
            keeps_forward = (t is module_type
                             or getattr(module_type, "forward", None) is getattr(t, "forward", None))
            return _MODULE_HANDLERS[t] if keeps_forward else None
    return None


def function_handler(target: object) -> FunctionHandler | None:
    """The handler of calls of ``target`` (a function, or a method name as a string)."""
    return _FUNCTION_HANDLERS.get(target)


def _first(handler: Callable[[Walker, fx.Node, fx.Node, Value], Env]) -> FunctionHandler:
    """A function handler of the first channel argument alone."""
    return lambda walker, node, args: handler(walker, node, *args[0])


def _layer_norm_function(walker: Walker, node: fx.Node, args) -> Value:
    arg, value = args[0]
    weight, bias = call_arg(node, 2, "weight"), call_arg(node, 3, "bias")
    return walker.layer_norm(node, arg, value, call_arg(node, 1, "normalized_shape"),
                             None if weight is None else walker.state_key(node, weight),
                             None if bias is None else walker.state_key(node, bias))


register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)(LayerOps.conv)
register_module(nn.Linear)(LayerOps.linear)
register_module(nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)(LayerOps.batchnorm)


@register_module(nn.LayerNorm)
def _layer_norm_module(walker: Walker, node: fx.Node, m: nn.Module, arg: fx.Node,
                       value: Value) -> Value:
    keys = [None if getattr(m, name) is None else f"{node.target}.{name}"
            for name in ("weight", "bias")]
    return walker.layer_norm(node, arg, value, m.normalized_shape, *keys)


@register_module(nn.MultiheadAttention)
def _attention(walker: Walker, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value
               ) -> tuple[Value, None]:
    """Self-attention (``Walker.attention``); its in_proj_weight/in_proj_bias are the
    input projection."""
    query, key, val = (call_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    if not (query is key is val):
        raise walker.fail(node, "attention whose query, key and value are different tensors "
                          "(only self-attention is supported)")
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise walker.fail(node, "attention with separate key/value sizes, bias_k/bias_v or "
                          "add_zero_attn")
    walker.channels_last(node, arg, value, "MultiheadAttention")
    p = str(node.target)
    out, _ = walker.attention(
        node, value, m.num_heads,
        (f"{p}.in_proj_weight", None if m.in_proj_bias is None else f"{p}.in_proj_bias"),
        (f"{p}.out_proj.weight", None if m.out_proj.bias is None else f"{p}.out_proj.bias"))
    return out, None


def attention_module(qkv: str, proj: str, heads: str, head_tensors: dict[str, int],
                      fixed: tuple[str, ...] = ()) -> ModuleHandler:
    """A handler for a self-attention module whose Linears ``qkv`` (queries, keys, values,
    head by head) and ``proj`` are submodules and whose head count is attribute ``heads``
    (``Walker.attention``). Its per-head tensors ``head_tensors`` (name: the dim holding
    the heads; e.g. a relative position bias table) travel with the head nodes outside the
    graph; ``fixed`` tensors follow no channel."""
    def handler(walker: Walker, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        walker.channels_last(node, arg, value, type(m).__name__)
        prefix = str(node.target)
        out, head_nodes = walker.attention(node, value, getattr(m, heads), *(
            (f"{prefix}.{name}.weight",
             None if m.get_submodule(name).bias is None else f"{prefix}.{name}.bias")
            for name in (qkv, proj)))
        state = m.state_dict()
        for name, dim in head_tensors.items():
            if name in state:  # with the head nodes; in a layout without heads, with none
                walker.carry(node, f"{prefix}.{name}", head_nodes,
                             None if head_nodes is None else dim)
        for name in fixed:
            if name in state:
                walker.carry(node, f"{prefix}.{name}")
        return out
    return handler


# Swin's shifted-window attention (the windows, the shift and the mask act on tokens only):
# V1 has a per-head relative position bias table; V2 per-head logit scales and a position MLP
# whose last layer is per head and whose first layer and input table follow no channel.
register_module(swin_transformer.ShiftedWindowAttention, swin_transformer.ShiftedWindowAttentionV2)(
    attention_module("qkv", "proj", "num_heads",
                      {"relative_position_bias_table": 1, "logit_scale": 0, "cpb_mlp.2.weight": 0},
                      ("cpb_mlp.0.weight", "cpb_mlp.0.bias", "relative_coords_table")))
# MaxViT's block and grid attention (over the tokens of a window or a grid)
register_module(maxvit.RelativePositionalMultiHeadAttention)(
    attention_module("to_qkv", "merge", "n_heads", {"relative_position_bias_table": 1}))


@register_function(swin_transformer._patch_merging_pad)
def _patch_merging(walker: Walker, node: fx.Node, args) -> Value:
    """Swin's patch merging: the channels of each 2x2 neighbourhood concatenated, [..., H, W,
    C] -> [..., H/2, W/2, 4C]: each channel 4 times, outermost (a Linear after it is a 2x2
    stride-2 conv)."""
    arg, value = args[0]
    walker.channels_last(node, arg, value, "patch merging")
    return replace(walker.passthrough(arg, value), spread=4, outer=True)


register_module(nn.Flatten)(lambda walker, node, m, arg, value: walker.reshape(node, arg, value))
register_module(*_ELEMENTWISE_MODULES)(
    lambda walker, node, m, arg, value: walker.passthrough(arg, value))
register_module(*_SPATIAL_MODULES)(lambda walker, node, m, arg, value: walker.pooling(node, arg, value))
register_function(*_ELEMENTWISE_FUNCTIONS)(_first(lambda w, node, arg, value: w.passthrough(arg, value)))
register_function(*_SPATIAL_FUNCTIONS)(_first(LayerOps.pooling))
register_function(*_RESHAPES)(_first(TensorOps.reshape))
register_function(*_PERMUTES)(_first(TensorOps.permute))
register_function(*_SPLITS)(_first(TensorOps.split))
register_function(*_REDUCTIONS)(_first(TensorOps.reduce))
register_function(operator.add, operator.iadd, torch.add, "add")(TensorOps.add)
register_function(*_MULTIPLY)(TensorOps.multiply)
register_function(*_DIVIDE)(TensorOps.divide)
register_function(torch.cat, torch.concat)(TensorOps.cat)
register_function(F.layer_norm)(_layer_norm_function)
