"""A computed positional encoding added to the channels, in the ATen walk (docs/graph.md,
"Passengers"). (Position terms added to attention scores: :mod:`graph.aten_position`.)

EdgeNeXt adds to its tokens ``conv(fourier(H, W))``: Fourier features of the token positions
(sines and cosines of the grid coordinates, no parameters: a fixed function of the input's
size) mapped by a 1x1 convolution onto the channels. Channel c of that encoding is row c of
the convolution's weight (and entry c of its bias) applied to the fixed features, so a
channel permutation of the tokens keeps the sum exactly when it permutes those rows alike:
the convolution's tensors are passengers of the channels (dim 0 on their nodes), as a learned
positional embedding is; its input features follow no channel and hold no tensor of the
network, so nothing of them enters the graph.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import fx

from .aten_ops import op_args
from .walker_core import Value, node_shape

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten
_COPIES = (aten.clone, aten.contiguous, aten.alias, aten._to_copy, aten.to)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


def _reshaped_dim(src: tuple[int, ...], dst: tuple[int, ...], dim: int) -> int | None:
    """The dim of ``src`` that dim ``dim`` of its reshape ``dst`` is, element by element (as
    many elements before it and the same size), or None."""
    before = math.prod(dst[:dim])
    for d in range(len(src)):
        if math.prod(src[:d]) == before and src[d] == dst[dim]:
            return d
    return None


def _fixed(walker: AtenWalker, tensor: fx.Node) -> bool:
    """Computed from no input, parameter or buffer of the network (shapes and numbers only)."""
    seen, stack = set(), [tensor]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and (n.name in walker.keys or n.name in walker.user_inputs):
            return False
        stack.extend(n.all_input_nodes)
    return True


def carry_projection(walker: AtenWalker, node: fx.Node, tensor: fx.Node, value: Value) -> bool:
    """``tensor``, added to ``value``'s channels by ``node``, is a convolution's output (through
    copies, reshapes and permutes that keep its channels whole in the dim aligned with
    ``value``'s) of features computed from no tensor of the network: carry the convolution's
    weight and bias with the channels and return True; False for anything else."""
    aligned = value.axis - (len(node_shape(node) or ()) - len(node_shape(tensor) or ()))
    if value.nodes.dim() != 1 or value.spread != 1 or aligned < 0:
        return False
    dim: int | None = aligned
    while dim is not None and _packet(tensor) in (*_COPIES, *_RESHAPES, aten.permute, aten.transpose):
        source = tensor.args[0]
        if not isinstance(source, fx.Node):
            return False
        if _packet(tensor) is aten.permute:
            dim = list(op_args(tensor)["dims"])[dim] % len(node_shape(source) or (0,))
        elif _packet(tensor) is aten.transpose:
            a = op_args(tensor)
            ends = [d % len(node_shape(source) or (0,)) for d in (a["dim0"], a["dim1"])]
            dim = ends[1 - ends.index(dim)] if dim in ends else dim
        elif _packet(tensor) in _RESHAPES:
            dim = _reshaped_dim(tuple(node_shape(source) or ()), tuple(node_shape(tensor) or ()), dim)
        tensor = source
    if dim != 1 or _packet(tensor) not in (aten.conv1d, aten.conv2d, aten.conv3d):
        return False
    a = op_args(tensor)
    # the stored tensors themselves (a reshaped one would move the channels' dim)
    keys = [walker.keys.get(t.name) if isinstance(t, fx.Node) and t.op == "placeholder" else None
            for t in (a["weight"], a["bias"])]
    keys[1] = "" if a["bias"] is None else keys[1]
    weight = node_shape(a["weight"]) or ()
    if (None in keys or not weight or weight[0] != len(value.nodes) or a["groups"] != 1
            or not isinstance(a["input"], fx.Node) or not _fixed(walker, a["input"])):
        return False
    for key in keys:
        if key:
            walker.carry(node, key, value.nodes, 0)
    return True
