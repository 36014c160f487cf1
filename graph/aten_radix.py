"""Channels laid out over two dims, and channels in a fixed order, in the ATen walk
(docs/graph.md, "Split attention over a radix" and "A convolution along the channels").

**Split attention** (ResNeSt's ``SplitAttn``, SKNet's ``SelectiveKernel``). A convolution makes
``R x C`` channels (or ``R`` paths are stacked), viewed as ``[B, R, C, ...]``: the channels lie
over two dims, radix and channel, which :class:`graph.walker_core.Value` already holds (its
``nodes`` [R, C]; a reshape splits them so). Four operations then act on such a layout:

- ``stack`` of ``R`` channel tensors along a new dim next to the channels: the nodes of each
  operand, stacked (``[R, C]``);
- a sum over some of the channel dims (``x.sum(1)``: over the radix): channel ``c``
  of the result is the sum of channels ``(r, c)`` over ``r``, so it gets a new node fed by one
  identity edge from each ``(r, c)``, as a sum of older tensors does (``TensorOps.join``);
- a softmax over one of several channel dims (the radix): output ``(r, c)`` depends on every ``(r', c)``, and
  a softmax is equivariant to any permutation of the entries it normalises over, so the
  network keeps its function under every permutation of the channels that maps each group
  ``{(r, c): r}`` onto a group. That is what a group norm's groups need (``aten_ops``'s
  ``_group_norm``): one node per group with a featureless membership edge to each member;
- an element-wise product of two tensors with the same two-dim layout (the softmax's weights
  times the branches): the gate of ``TensorOps.gate`` on the flattened channels.

A permute or transpose that would separate the channel dims only by dims of size 1 (timm's
``RadixSoftmax``: ``[B, 1, R, C]`` transposed to ``[B, R, 1, C]``) keeps every element's channel:
the size-1 dims are taken into the channel dims first.

**A convolution along the channels** (ECA: ``sigmoid(conv1d(x.mean((2, 3)).view(B, 1, C)))``
gating ``x``). The 1-d convolution slides one kernel along the channel order, so output ``c``
reads channels ``c - k//2 .. c + k//2``: for a generic kernel no channel permutation other than
the identity keeps the function. The graph says so with one featureless edge from each channel
to the next (a directed path, whose only automorphism is the identity), and keeps the kernel
(one number per tap, shared by all channels) out of the graph as a passenger that follows no
channel, decoded as it was. The channels are thus fixed for the metanetwork, whose output on
them may still depend on their position in the path.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import torch
from torch import fx

from .aten_ops import NOT_MINE, Args, op_args, register_aten_pattern
from .tensor_ops import reduced_dims
from .walker_core import Env, Value, node_shape, swap_dims

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten


def _flat_layout(value: Value) -> bool:
    """One entry per channel along the channel dims (not flattened with a spatial map)."""
    return value.spread == 1 and not value.outer


def _alone(node: fx.Node, args: Args) -> tuple[fx.Node, Value] | None:
    """The channel argument of a call whose first argument it is and whose other arguments
    carry no channels; None otherwise."""
    if len(args) != 1 or args[0][0] is not node.args[0]:
        return None
    return args[0]


def _together(where: list[int]) -> bool:
    return max(where) - min(where) == len(where) - 1


@register_aten_pattern(aten.stack)
def _stack_next_to_channels(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``torch.stack(paths, dim)`` with ``dim`` just before or just after the channel dims:
    a new channel dim whose entry ``r`` holds operand ``r``'s channels (SKNet's paths). Along
    another dim every operand's channel ``c`` is one channel of the result: ``aten_ops``'
    stack, a concatenation along a new dim."""
    found = [walker.env.get(t) for t in cast(list, node.args[0])]
    values = [v for v in found if isinstance(v, Value)]
    if len(values) != len(found) or not values:
        return NOT_MINE
    first = values[0]
    dim = op_args(node)["dim"] % len(node_shape(node) or (0,))
    if dim not in (first.axis, first.axis + first.nodes.dim()):
        return NOT_MINE
    if any(not _flat_layout(v) or v.axis != first.axis or v.nodes.shape != first.nodes.shape
           for v in values):
        raise walker.fail(node, "stacking tensors whose channels differ in number or place")
    roots = [walker.rec.find(i) for v in values for i in v.nodes.reshape(-1).tolist()]
    if len(set(roots)) != len(roots):
        raise walker.fail(node, "stacking tensors that share channels (a tensor with itself)")
    if dim == first.axis:
        return Value(torch.stack([v.nodes for v in values]), False, 1, first.axis)
    return Value(torch.stack([v.nodes for v in values], -1), False, 1, first.axis)


@register_aten_pattern(aten.sum)
def _sum_over_channel_dims(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A sum over some channel dims, not all (the radix): new nodes, each fed by one identity
    edge (+1) from every channel summed into it. (A mean would be that sum times a number; it
    stays refused, as before, until a network needs it.)"""
    found = _alone(node, args)
    if found is None:
        return NOT_MINE
    arg, value = found
    a = op_args(node)
    dims = reduced_dims(node_shape(arg), a.get("dim"))
    summed = [d - value.axis for d in value.dims if d in dims]
    if 0 in dims or not summed or len(summed) == value.nodes.dim():
        return NOT_MINE  # over no channel dim, or over all of them: aten_ops' _reduce
    if not _flat_layout(value):
        raise walker.fail(node, "a sum over a channel dim of channels flattened with a spatial map")
    nodes = value.nodes
    kept = [i for i in range(nodes.dim()) if i not in summed]
    kept_shape = [nodes.shape[i] for i in kept]
    slices = nodes.permute(summed + kept).reshape(-1, math.prod(kept_shape))
    out = walker.new_nodes(slices.shape[1])
    for piece in slices:
        walker.rec.identities.append((piece, out, 1, 1.0))
    keepdim = a.get("keepdim", False)
    shape = [1 if i in summed else n for i, n in enumerate(nodes.shape)] if keepdim else kept_shape
    axis = value.axis - (0 if keepdim else sum(d < value.axis for d in dims))
    return Value(out.reshape(shape), False, 1, axis)


@register_aten_pattern(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def _softmax_over_a_channel_dim(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A softmax over a channel dim: each run of channels it normalises together (the radix
    entries of one channel) becomes a group, with a group node and a membership edge to each
    member (module docstring)."""
    found = _alone(node, args)
    if found is None:
        return NOT_MINE
    arg, value = found
    dim = op_args(node)["dim"] % len(node_shape(arg) or (0,))
    if dim not in value.dims or not _flat_layout(value) or value.nodes.dim() == 1:
        # over the channels of one dim: one group of all channels, which no permutation
        # breaks; aten_ops refuses it all the same (its tests pin that), as before
        return NOT_MINE
    i = dim - value.axis
    members = value.nodes.movedim(i, -1).reshape(-1, value.nodes.shape[i])
    walker.rec.memberships.append((walker.new_nodes(len(members))[:, None], members))
    return walker.passthrough(arg, value)


@register_aten_pattern(aten.mul, aten.mul_)
def _gate_over_channel_dims(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``x * a`` of two tensors with channels over the same dims (split attention's branches
    times their softmax weights): channel ``(r, c)`` meets only ``(r, c)``, so it is the gate of
    ``TensorOps.gate`` on the flattened channels. Broadcasting is allowed over the dims that
    are neither the batch nor channels."""
    if len(args) != 2 or all(v.nodes.dim() == 1 for _, v in args):
        return NOT_MINE
    (na, a), (nb, b) = args
    if (a.nodes.shape != b.nodes.shape or a.axis != b.axis or not _flat_layout(a)
            or not _flat_layout(b)):
        raise walker.fail(node, f"multiplying tensors with channels {tuple(a.nodes.shape)} in "
                          f"dims {list(a.dims)} and {tuple(b.nodes.shape)} in dims {list(b.dims)}")
    sa, sb = node_shape(na), node_shape(nb)
    if sa is None or sb is None or len(sa) != len(sb) or sa[0] != sb[0] or any(
            m != n and (d in a.dims or 1 not in (m, n)) for d, (m, n) in enumerate(zip(sa, sb))):
        raise walker.fail(node, f"a product of shapes {tuple(sa or ())} and {tuple(sb or ())} "
                          "that broadcasts over the batch or the channels")
    out = walker.gate(node, [(na, replace(a, nodes=a.nodes.reshape(-1))),
                             (nb, replace(b, nodes=b.nodes.reshape(-1)))])
    return replace(out, nodes=out.nodes.reshape(a.nodes.shape))


_SOFTMAXES = (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)


@register_aten_pattern(aten.permute, aten.transpose)
def _move_over_unit_dims(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A move that keeps the batch first and leaves between the channel dims only dims of size
    1: those dims hold no choice of element, so they join the channel dims (nodes of size 1
    there) and the move is the usual one (``TensorOps.move_dims``). Only where a softmax alone
    reads the result (timm's ``RadixSoftmax``: ``view(B, groups, radix, -1).transpose(1, 2)``,
    then a softmax over the radix): queries of a single token (``[B, 1, heads, d]`` moved to
    ``[B, heads, 1, d]``) have the same shapes, but are heads for the attention's handlers."""
    found = _alone(node, args)
    if found is None or not _flat_layout(found[1]) or not node.users or any(
            getattr(user.target, "overloadpacket", None) not in _SOFTMAXES for user in node.users):
        return NOT_MINE
    arg, value = found
    shape = tuple(node_shape(arg) or ())
    a = op_args(node)
    if getattr(node.target, "overloadpacket", None) is aten.permute:
        perm = [d % len(shape) for d in a["dims"]]
    else:
        perm = swap_dims(len(shape), a["dim0"], a["dim1"])
    if perm[0] != 0 or _together([perm.index(d) for d in value.dims]):
        return NOT_MINE
    low, high = value.axis, value.axis + value.nodes.dim()
    while low > 1 and shape[low - 1] == 1:
        low -= 1
    while high < len(shape) and shape[high] == 1:
        high += 1
    if not _together([perm.index(d) for d in range(low, high)]):
        return NOT_MINE
    wider = replace(value, nodes=value.nodes.reshape(shape[low:high]), axis=low)
    return walker.move_dims(node, arg, wider, perm)


@register_aten_pattern(aten.expand, aten.expand_as)
def _expand(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``y.expand_as(x)`` (ECA's gate over the positions): repeating size-1 dims that are
    neither the batch nor channels keeps every channel. ``x``, even a channel tensor, gives
    only its shape. Any other expand (new leading dims, a class token's batch) is not this
    pattern's."""
    if not args or args[0][0] is not node.args[0]:
        return NOT_MINE
    arg, value = args[0]
    before, after = tuple(node_shape(arg) or ()), tuple(node_shape(node) or ())
    if len(before) != len(after) or any(m != n for d, (m, n) in enumerate(zip(before, after))
                                        if d == 0 or d in value.dims):
        return NOT_MINE
    return walker.passthrough(arg, value)


@register_aten_pattern(aten.conv1d)
def _convolution_along_the_channels(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A 1-d convolution of ``[B, 1, C]`` whose length axis holds the channels (ECA): its
    kernel and bias as passengers that follow no channel, and one featureless edge from each
    channel to the next, so that no channel permutation maps the graph onto itself (module
    docstring). The output keeps the channels' nodes (``y[c]`` gates ``x[c]``)."""
    arg, value = args[0]
    a = op_args(node)
    shape = tuple(node_shape(arg) or ())
    if len(args) != 1 or arg is not a["input"] or len(shape) != 3 or value.axis != 2:
        return NOT_MINE  # channels in dim 1: an ordinary convolution (aten_conv)
    weight = tuple(node_shape(a["weight"]) or ())
    if not _flat_layout(value) or value.nodes.dim() != 1:
        raise walker.fail(node, "a convolution along channels spread over several dims")
    if shape[1] != 1 or len(weight) != 3 or weight[:2] != (1, 1) or a["groups"] != 1:
        raise walker.fail(node, f"a convolution along the channels of a {shape} input with a "
                          f"{weight} weight (only one input and one output feature: ECA)")
    if tuple(node_shape(node) or ()) != shape:
        raise walker.fail(node, f"a convolution along the channels from {shape} to "
                          f"{tuple(node_shape(node) or ())} (not one output per channel)")
    walker.carry(node, walker.state_key(node, a["weight"]))
    if a["bias"] is not None:
        walker.carry(node, walker.state_key(node, a["bias"]))
    nodes = value.nodes
    if len(nodes) > 1:
        walker.rec.memberships.append((nodes[:-1, None], nodes[1:, None]))
    return Value(nodes, False, value.area, value.axis)
