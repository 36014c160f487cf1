"""Where a term added to attention scores comes from, for the ATen walk's position terms
(graph/aten_position.py): computed from the weights alone, and which dim of which parameter a
dim of it is, followed back through copies, reshapes, permutes and constant gathers. No
handlers are registered here."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .aten_ops import aten_handler, op_args
from .walker_core import node_shape, swap_dims

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten
COPIES = (aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
          aten.lift_fresh_copy)
RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unsqueeze,
            aten.squeeze)


def registered(op: Any, heads: bool = False):
    """The handler registered so far for ATen operation ``op`` (a packet: all overloads)."""
    return aten_handler(getattr(op, op.overloads()[0]), heads)


def packet_of(node: Any) -> Any:
    """The ATen operation (all overloads) ``node`` calls, if any."""
    return getattr(getattr(node, "target", None), "overloadpacket", None)


def shape_of(node: Any) -> tuple[int, ...]:
    """``node``'s output shape as traced (empty when unknown)."""
    return tuple(node_shape(node) or ())


# -- terms computed from the weights alone ---------------------------------------------------
def from_weights(walker: AtenWalker, tensor: fx.Node) -> bool:
    """Is ``tensor`` computed from parameters, buffers and constants alone (not from the
    network's input)?"""
    seen, stack = set(), [tensor]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if walker.env.get(n) is not None or n in walker.invariant or n.name in walker.user_inputs:
            return False
        stack += n.all_input_nodes
    return True


def reshaped_dim(src: tuple[int, ...], dst: tuple[int, ...], dim: int) -> int | None:
    """The dim of ``src`` that a reshape to ``dst`` keeps whole as ``dst[dim]`` (as many
    elements before it, the same size), if any."""
    before = math.prod(dst[:dim])
    for j, size in enumerate(src):
        if size == dst[dim] and math.prod(src[:j]) == before:
            return j
    return None


def _indexed_dim(node: fx.Node, dim: int) -> int | None:
    """For ``aten.index.Tensor(t, indices)``: the dim of ``t`` that output dim ``dim`` is, or
    None when ``dim`` is one of the gathered (index tensor) dims."""
    indices = op_args(node)["indices"]
    src, out = shape_of(node.args[0]), shape_of(node)
    where = [i for i, t in enumerate(indices) if t is not None]
    index_ndim = len(out) - (len(src) - len(where))
    rest = [d for d in range(len(src)) if d not in where]
    if where == list(range(where[0], where[-1] + 1)):  # adjacent: gathered dims in place
        first = where[0]
        if dim < first:
            return dim
        if dim < first + index_ndim:
            return None
        return rest[first + (dim - first - index_ndim)]
    return None if dim < index_ndim else rest[dim - index_ndim]


def per_head_source(walker: AtenWalker, node: fx.Node, tensor: fx.Node, dim: int
                    ) -> tuple[str, int]:
    """Follow dim ``dim`` of ``tensor`` (a term added to the scores, computed from the
    weights) back to the parameter it is a dim of: through copies, reshapes and permutes
    that keep it whole, and through gathers (``table[index]``) of other dims by integer
    index tensors. Returns the parameter's state-dict key and dim; refused otherwise."""
    while True:
        if tensor.op == "placeholder":
            if tensor.name not in walker.parameters:
                raise walker.fail(node, f"a position term added to attention scores read from "
                                  f"{tensor.name!r}, which is not a parameter of the network")
            return walker.keys[tensor.name], dim
        packet = packet_of(tensor)
        src = tensor.args[0] if tensor.args else None
        if tensor.op != "call_function" or not isinstance(src, fx.Node):
            raise walker.fail(node, f"a position term added to attention scores computed by "
                              f"{tensor.name!r} ({tensor.target})")
        nxt: int | None = dim
        if packet in COPIES:
            pass
        elif packet is aten.permute:
            nxt = [d % len(shape_of(tensor)) for d in op_args(tensor)["dims"]][dim]
        elif packet is aten.transpose:
            a = op_args(tensor)
            nxt = swap_dims(len(shape_of(tensor)), a["dim0"], a["dim1"])[dim]
        elif packet in RESHAPES:
            nxt = reshaped_dim(shape_of(src), shape_of(tensor), dim)
        elif packet is aten.expand:
            nxt = dim - (len(shape_of(tensor)) - len(shape_of(src)))
            if nxt < 0 or shape_of(src)[nxt] != shape_of(tensor)[dim]:
                nxt = None
        elif packet is aten.index:
            indices = [t for t in op_args(tensor)["indices"] if t is not None]
            if not all(isinstance(t, fx.Node) and from_weights(walker, t)
                       and getattr(t.meta.get("val"), "dtype", None) in (torch.long, torch.int)
                       for t in indices):
                raise walker.fail(node, f"a position term gathered by {tensor.name!r} with "
                                  "index tensors other than integer constants")
            nxt = _indexed_dim(tensor, dim)
        elif packet in (aten.mul, aten.div) and not isinstance(tensor.args[1], fx.Node):
            pass
        else:
            raise walker.fail(node, f"a position term added to attention scores computed by "
                              f"{tensor.name!r} ({tensor.target}), which the walk does not "
                              "follow back to a parameter")
        if nxt is None:
            raise walker.fail(node, f"{tensor.name!r} ({tensor.target}) mixes the head (or "
                              "channel) dim of a term added to attention scores with others")
        tensor, dim = src, nxt


# -- the scores: terms added, reshapes -------------------------------------------------------
def slab_count(shape: tuple[int, ...], head: int, batch: int) -> int | None:
    """The (sample, head) pairs outermost in a tensor with heads in dim ``head`` and the batch
    in dim ``batch``: heads folded into the batch, or the batch then the heads."""
    if batch != 0 or head not in (0, 1):
        return None
    return math.prod(shape[:head + 1])

