"""Convolutions in the ATen walk (docs/graph.md, "Weight-standardised convolutions"): the
weight a convolution reads is a parameter as stored, or one standardised filter by filter in
forward (timm's ``StdConv2d`` and ``ScaledStdConv2d``, the NF-Nets)::

    w = batch_norm(P.reshape(1, out, -1), None, None, weight=(gain * s).view(-1),
                   training=True, eps=eps).reshape_as(P)
    y = conv2d(x, w, bias)

A batch norm in training mode without running statistics normalises each of its channels over
all its other dims; over ``P.reshape(1, out, -1)`` channel o holds filter o's weights (a
reshape keeps the elements' row-major order), so filter o of ``w`` is ``gain[o] * s *
(P[o] - mean(P[o])) / sqrt(var(P[o]) + eps)``: a function of filter o's own weights and its own
gain alone, and a symmetric one of its weights. Permuting the output channels permutes filters
and gains alike; permuting the input channels permutes each filter's weights, which their mean
and variance ignore. So the network has the channel symmetries of a plain convolution: ``P``
is encoded as the convolution's edges, as stored, the gain as node features of kind ``scale``
on its output channels, and the standardisation (with ``s`` and ``eps``) is a fixed function of
them, like an activation, which the graph does not hold. Any other computed weight is refused.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import fx

from .aten_ops import Args, op_args, register_aten
from .node_slots import SCALE
from .walker_core import Env, node_shape

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten
# operations that keep the row-major order of their first argument's elements
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze,
          aten.flatten, aten.alias, aten.reshape_as, aten.view_as)


@register_aten(aten.conv1d, aten.conv2d, aten.conv3d)
def _convolution(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``F.conv2d`` and a Conv2d alike: a weight and bias that are the network's parameters,
    or a weight standardised filter by filter (above) with its gain on the output nodes."""
    arg, value = args[0]
    a = op_args(node)
    if arg is not a["input"]:
        raise walker.fail(node, "a convolution whose weight carries channels")
    weight, gain = _filters(walker, node, a["weight"])
    bias = None if a["bias"] is None else walker.state_key(node, a["bias"])
    out = walker.convolution(node, value, "a convolution", tuple(node_shape(a["weight"]) or ()),
                             a["groups"], weight, bias)
    if gain is not None:
        walker.add_channels(node, gain, SCALE.name, "weight", out.nodes)
    return out


def _source(tensor):
    """What ``tensor`` is computed from through reshapes and multiplications by a number
    (every element alike): the first other node, or ``tensor`` itself."""
    while isinstance(tensor, fx.Node) and tensor.op == "call_function":
        packet = getattr(tensor.target, "overloadpacket", None)
        if packet in _VIEWS:
            tensor = tensor.args[0]
        elif packet is aten.mul and _by_number(tensor) is not None:
            tensor = _by_number(tensor)
        else:
            break
    return tensor


def _by_number(node: fx.Node) -> fx.Node | None:
    """The tensor that ``node`` (a multiplication) multiplies by a number, if it does."""
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return tensors[0] if len(tensors) == 1 and len(numbers) == 1 and not node.kwargs else None


def _described(tensor) -> str:
    return f"{tensor.name!r} (operation {tensor.target})" if isinstance(tensor, fx.Node) else repr(tensor)


def _filters(walker: AtenWalker, node: fx.Node, weight) -> tuple[str, str | None]:
    """The state-dict keys of the parameter holding the filters that convolution ``node``
    reads as ``weight`` (as stored, reshaped, times a number, or standardised filter by
    filter) and of their gain (None without one). A reshape keeps the elements' row-major
    order, which is the order of the convolution's edges (filter by filter)."""
    source = _source(weight)
    gain = None
    if isinstance(source, fx.Node) and getattr(source.target, "overloadpacket", None) is aten.batch_norm:
        source, gain = _standardised(walker, node, source, (node_shape(weight) or (0,))[0])
    key = walker.parameter_key(source)
    if key is None:
        computed = "" if source is weight else f", computed from {_described(source)},"
        raise walker.fail(node, f"the weight {_described(weight)}{computed} is neither a "
                          "parameter nor one standardised filter by filter (batch_norm in "
                          "training mode of parameter.reshape(1, out, -1))")
    return key, gain


def _standardised(walker: AtenWalker, node: fx.Node, norm: fx.Node, filters: int
                  ) -> tuple[fx.Node, str | None]:
    """The parameter that batch norm ``norm`` standardises for convolution ``node``, one of
    its ``filters`` filters per channel, and the state-dict key of the gain it multiplies the
    filters by (or None); refused unless ``norm`` is that (module docstring)."""
    a = op_args(norm)
    what = f"the weight is standardised by {_described(norm)}"
    if not a["training"] or a["running_mean"] is not None or a["running_var"] is not None:
        raise walker.fail(node, f"{what} with running statistics or in eval mode, not by each "
                          "filter's own mean and variance")
    if a["bias"] is not None:
        raise walker.fail(node, f"{what} and then shifted by {_described(a['bias'])}")
    param = _source(a["input"])
    shape = tuple(node_shape(a["input"]) or ())
    if walker.parameter_key(param) is None or shape != (
            1, filters, math.prod(node_shape(param) or ()) // max(filters, 1)):
        raise walker.fail(node, f"{what} over {_described(a['input'])} of shape {shape}, which "
                          f"is not a parameter reshaped to [1, {filters} filters, -1]")
    gain = a["weight"]
    if gain is None:
        return param, None
    stored = _source(gain)
    key = walker.parameter_key(stored)
    if key is None or math.prod(node_shape(stored) or ()) != filters:
        raise walker.fail(node, f"{what} and multiplied by {_described(gain)}, which is not a "
                          f"parameter of one entry per filter ({filters}), reshaped or times "
                          "a number")
    return param, key
