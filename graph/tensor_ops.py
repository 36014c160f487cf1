"""How tensor operations map channels: residual add, gates and scales, concatenation,
reshape, permute, split and reduction, as methods of the walker (:class:`TensorOps`, part of
:class:`graph.walker.Walker`).

The handlers of :mod:`graph.handlers` (torch.fx functions and tensor methods) and of
:mod:`graph.aten_ops` (ATen operations) call these; they merge, reorder or split the channels'
graph nodes through :class:`graph.walker_core.WalkerCore`.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx

from .node_slots import SCALE
from .walker_core import Rows, Value, WalkerCore, call_arg, node_shape, swap_dims


def _dims_arg(node: fx.Node) -> list[int]:
    """The dims of ``x.permute(0, 2, 1)``, ``x.permute([0, 2, 1])`` or ``torch.permute(x, dims)``."""
    rest = node.args[1:] or (node.kwargs.get("dims"),)
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)


def reduced_dims(shape: torch.Size | None, dims) -> list[int]:
    """The dims (an int, a list, or None for all) that a reduction of a tensor of ``shape``
    reduces, non-negative."""
    ndim = len(shape or ())
    dims = range(ndim) if dims is None else [dims] if isinstance(dims, int) else dims
    return [d % ndim for d in dims]


def _broadcast_apart(a: torch.Size | None, b: torch.Size | None, value: Value) -> bool:
    """Do tensors of shapes ``a`` and ``b`` with channels in ``value.dims`` broadcast only
    over dims other than the batch and the channels (GCNet's ``x + mlp(context)``, a
    context of one entry per channel added at every position)? Each channel then still
    meets only its own channel."""
    if a is None or b is None or len(a) != len(b) or a[0] != b[0]:
        return False
    return all(m == n or (d not in value.dims and 1 in (m, n)) for d, (m, n) in enumerate(zip(a, b)))


class TensorOps(WalkerCore):
    """The walker's tensor operations: each returns its output's :class:`Value` (or the
    pieces' values, for a split)."""

    def add(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        if len(args) == 1:  # tensor + python scalar, or + a parameter (positional embedding)
            arg, value = args[0]
            for other in node.args:
                if isinstance(other, fx.Node) and other is not arg:
                    self.add_passenger(node, other, value)
            return self.passthrough(arg, value)
        (na, a), (nb, b) = args
        self.same_layout(node, a, b, "adding")
        if not _broadcast_apart(node_shape(na), node_shape(nb), a):
            raise self.fail(node, f"residual add of tensors with shapes {tuple(node_shape(na) or ())} "
                            f"and {tuple(node_shape(nb) or ())} (broadcasting over the batch or "
                            "the channels)")
        return self.join((na, a), (nb, b))

    def join(self, first: tuple[fx.Node, Value], second: tuple[fx.Node, Value]) -> Value:
        """Channel i of both tensors makes channel i of the result (a sum; a concatenation
        along the tokens), so both must permute alike."""
        (na, a), (nb, b) = first, second
        if torch.equal(a.nodes, b.nodes):
            return replace(a, fresh=False)
        fresh_a, fresh_b = a.fresh and len(na.users) == 1, b.fresh and len(nb.users) == 1
        if fresh_b and not fresh_a:
            (na, a), (nb, b), fresh_a, fresh_b = (nb, b), (na, a), fresh_b, fresh_a
        if fresh_a and fresh_b:  # projection shortcut: b's channels are a's channels
            self.rec.merge(b.nodes, a.nodes)
            return replace(a, fresh=False)
        if fresh_a:  # identity shortcut from an older tensor into a's channels
            self.rec.identities.append((b.nodes, a.nodes, a.area, 1.0))
            return replace(a, fresh=False)
        # Two older tensors: new nodes fed by identity edges from both.
        out = self.rec.new_nodes(len(a.nodes))
        self.rec.identities += [(a.nodes, out, 1, 1.0), (b.nodes, out, 1, 1.0)]
        return Value(out, False, 1, a.axis)

    def subtract(self, node: fx.Node, args: list[tuple[fx.Node, Value]], minus: int) -> Value:
        """A difference; ``minus`` is the position in ``args`` of the channel tensor subtracted.
        With a parameter or number on the other side, or the same channels on both (pool(x) -
        x), each channel alone, as for a sum. Two tensors of different channels feed new nodes
        through identity edges of sign +1 and -1, so the graph tells ``a - b`` from ``a + b``
        (no projection-shortcut merge: the merged channels would stand for a sum)."""
        if len(args) == 1:
            return self.add(node, args)
        (na, a), (nb, b) = args
        self.same_layout(node, a, b, "subtracting")
        if node_shape(na) != node_shape(nb):
            raise self.fail(node, f"a difference of tensors with shapes {tuple(node_shape(na) or ())} "
                            f"and {tuple(node_shape(nb) or ())} (broadcasting over channels)")
        if torch.equal(a.nodes, b.nodes):
            return replace(a, fresh=False)
        out = self.rec.new_nodes(len(a.nodes))
        signs = (1.0, -1.0) if minus == 1 else (-1.0, 1.0)
        self.rec.identities += [(a.nodes, out, 1, signs[0]), (b.nodes, out, 1, signs[1])]
        return Value(out, False, 1, a.axis)

    def same_layout(self, node: fx.Node, a: Value, b: Value, what: str) -> None:
        """Refuse combining two channel tensors element by element unless their channels lie
        in the same single dim and are equally many."""
        self.one_axis(node, a, what)
        self.one_axis(node, b, what)
        if a.axis != b.axis or len(a.nodes) != len(b.nodes):
            raise self.fail(node, f"{what} tensors with {len(a.nodes)} and {len(b.nodes)} "
                            f"channels in dims {a.axis} and {b.axis}")

    def multiply(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        if len(args) == 2:
            return self.gate(node, args)
        arg, value = args[0]
        others = [a for a in (*node.args, *node.kwargs.values()) if a is not arg]
        if all(isinstance(a, (int, float)) for a in others):
            return self.passthrough(arg, value)
        if len(others) == 1 and self.parameter_key(others[0]) is not None:
            return self.channel_scale(node, arg, value, others[0])
        raise self.fail(node, "multiplying by a tensor that is neither a channel tensor nor a "
                        "parameter of the network")

    def divide(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        arg, value = args[0]
        if len(args) == 1 and node.args[0] is arg and all(
                isinstance(a, (int, float)) for a in (*node.args[1:], *node.kwargs.values())):
            return self.passthrough(arg, value)
        raise self.fail(node, "dividing by a tensor (or a number by channels)")

    def channel_scale(self, node: fx.Node, arg: fx.Node, value: Value, param: fx.Node) -> Value:
        """``value * p`` with a parameter ``p`` of one factor per channel (layer scale): the
        factors become node features."""
        self.channel_dim(node, param, value)
        shape = tuple(node_shape(param) or ())
        if math.prod(shape) != len(value.nodes):
            raise self.fail(node, f"multiplying by parameter {param.target!r} of shape {shape}: "
                            "only one factor per channel is supported")
        self.add_channels(node, self.state_key(node, param), SCALE.name, "weight", value.nodes)
        return self.passthrough(arg, value)

    def gate(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        """``x * g`` channel by channel (squeeze-excitation): channel i of the gate ``g``, the
        fresh output of its own layer, is channel i of ``x``, so its node becomes x's node
        (pruning one prunes the other), as a projection shortcut's channels do in a sum. Of
        two older tensors, channel i of each meets only channel i of the other: only a
        permutation moving both alike keeps the product, so their nodes are tied (``tie``)."""
        (na, a), (nb, b) = args
        self.same_layout(node, a, b, "multiplying")
        if torch.equal(a.nodes, b.nodes):
            return replace(a, fresh=False)
        fresh_a, fresh_b = a.fresh and len(na.users) == 1, b.fresh and len(nb.users) == 1
        if fresh_a and not fresh_b:
            a, b, fresh_b = b, a, fresh_a
        if not fresh_b:  # two older tensors (gMLP's u * v, the halves of one Linear's output)
            self.tie(node, a.nodes, b.nodes)
        self.rec.merge(b.nodes, a.nodes)
        return replace(a, fresh=False)

    def tie(self, node: fx.Node, a: torch.Tensor, b: torch.Tensor) -> None:
        """Prepare making channel i of ``a`` and of ``b`` (disjoint) one node: a layer whose
        rows hold both, as its halves ``[a; b]``, would put two of its entries on one node.
        Its weight becomes one edge per (input, tied channel) carrying both rows' features
        (zipped, as an attention's query and key rows), its per-channel tensors one slot per
        half. A layer that writes both other than as its two halves is refused."""
        roots_a, roots_b = self.roots(a), self.roots(b)
        if set(roots_a) & set(roots_b):
            raise self.fail(node, "multiplying two tensors whose channels overlap in part")
        for i, (key, area, src, dst, rows) in enumerate(self.rec.weights):
            first = self.first_half(node, key, dst, rows, roots_a, roots_b)
            if first is not None:
                if dst.shape[0] != 1:
                    raise self.fail(node, f"{key!r} writes both tied halves in groups")
                self.used.discard((key, rows))
                self.use_key(node, key, Rows(zip=2))
                self.rec.weights[i] = (key, 2 * area, src, first.view(1, -1), Rows(zip=2))
        channels, self.rec.channels = self.rec.channels, []
        for key, kind, fld, nodes, rows, layer in channels:  # in place, keeping the slot order
            first = self.first_half(node, key, nodes, rows, roots_a, roots_b)
            if first is None:
                self.rec.channels.append((key, kind, fld, nodes, rows, layer))
                continue
            self.used.discard((key, rows))
            half = len(first)
            self.add_channels(node, key, kind, fld, first, Rows(0, half), layer)
            self.add_channels(node, key, kind, fld, nodes[half:], Rows(half, 2 * half),
                              f"{layer} (second half)")

    def roots(self, nodes: torch.Tensor) -> list[int]:
        """The graph node that each of ``nodes`` is now (after the merges so far)."""
        return [self.rec.find(i) for i in nodes.reshape(-1).tolist()]

    def first_half(self, node: fx.Node, key: str, nodes: torch.Tensor, rows: Rows,
                   roots_a: list[int], roots_b: list[int]) -> torch.Tensor | None:
        """The nodes of the first half of a record of ``key`` on ``nodes`` that holds the
        channels of ``a`` and ``b`` as its two halves (either order); None if it does not
        hold channels of both."""
        mine = self.roots(nodes)
        if not (set(mine) & set(roots_a) and set(mine) & set(roots_b)):
            return None
        if rows != Rows() or mine not in (roots_a + roots_b, roots_b + roots_a):
            raise self.fail(node, f"{key!r} holds channels of both tensors multiplied, other "
                            "than as its two halves")
        return nodes.reshape(-1)[:len(roots_a)]

    def cat(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        dim = call_arg(node, 1, "dim", 0)
        ndim = len(node_shape(node) or ())
        tensors = node.args[0]
        values = [self.env.get(t) for t in tensors]
        first = next((v for v in values if isinstance(v, Value)), None)
        if first is not None and dim % ndim not in first.dims:
            return self.cat_along(node, tensors, values, first)
        if any(not isinstance(v, Value) for v in values):
            raise self.fail(node, "concatenating a tensor without channel structure")
        for v in values:
            self.one_axis(node, v, "concatenation")
        axis = values[0].axis
        if ndim < 2 or dim % ndim != axis or any(v.axis != axis for v in values):
            raise self.fail(node, f"concatenation along dim {dim}; the channels are in dim "
                            f"{axis} (only concatenation along the channels is supported)")
        return Value(torch.cat([v.nodes for v in values]), False, 1, axis)

    def cat_along(self, node: fx.Node, tensors: list, values: list, first: Value) -> Value:
        """Concatenation along tokens or space: channel i of the result is channel i of every
        operand, so their channels must permute alike, as in a sum: one tensor's channels,
        or two tensors' joined as a sum joins them (CoaT's class token, sliced off the tokens
        before a convolution, put back before the convolution's output). A parameter among
        them (a class token) follows the result's channels out of the graph."""
        operands = [(t, v) for t, v in zip(tensors, values) if isinstance(v, Value)]
        distinct = [(t, v) for i, (t, v) in enumerate(operands) if not any(
            u.axis == v.axis and torch.equal(u.nodes, v.nodes) for _, u in operands[:i])]
        if len(distinct) > 2:
            raise self.fail(node, f"concatenating {len(distinct)} tensors with different channels "
                            "along a dim other than the channels")
        if len(distinct) == 2:
            self.same_layout(node, distinct[0][1], distinct[1][1], "concatenating")
            first = self.join(*distinct)
        for t, v in zip(tensors, values):
            if not isinstance(v, Value):
                self.add_passenger(node, t, first)
        return replace(first, fresh=False)

    def reshape(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        """A reshape keeps every channel apart when the dims before the channels hold as many
        elements after it as before, and so do the channel dims: then in row-major order
        each element keeps its channel. The channels may be split over several dims (or
        merged back), as a channel shuffle does."""
        src, dst = node_shape(arg), node_shape(node)
        if src is None or dst is None:
            raise self.fail(node, "a reshape whose shapes the trace could not see")
        if value.spread != 1:
            self.one_axis(node, value, "a reshape")
        before, count = math.prod(src[:value.axis]), value.nodes.numel()
        starts = [k for k in range(1, len(dst)) if math.prod(dst[:k]) == before]
        for k in sorted(starts, key=lambda k: dst[k] == 1 and count != 1):  # skip leading 1s
            ends = [j for j in range(k + 1, len(dst) + 1) if math.prod(dst[k:j]) == count]
            if ends:
                nodes = value.nodes.reshape(dst[k:ends[0]])
                return replace(self.passthrough(arg, value), nodes=nodes, axis=k)
            # the dims after one channel dim flattened into it: a spatial map per channel
            inner = [math.prod(src[value.axis + 1:m]) for m in range(value.axis + 2, len(src) + 1)]
            if value.nodes.dim() == 1 and dst[k] in [count * i for i in inner]:
                return replace(self.passthrough(arg, value), axis=k, spread=dst[k] // count)
        raise self.fail(node, f"reshape from {tuple(src)} to {tuple(dst)} mixes the channel "
                        f"dimension (dims {list(value.dims)}) with others")

    def permute(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        ndim = len(node_shape(arg) or ())
        if node.target in ("permute", torch.permute):
            perm = [d % ndim for d in _dims_arg(node)]
        else:
            perm = swap_dims(ndim, call_arg(node, 1, "dim0"), call_arg(node, 2, "dim1"))
        return self.move_dims(node, arg, value, perm)

    def move_dims(self, node: fx.Node, arg: fx.Node, value: Value, perm: list[int]) -> Value:
        """Moving dims (output dim i is input dim ``perm[i]``) keeps the channels if the batch
        stays first and the channel dims stay together; their new order reorders the channel
        nodes (a channel shuffle's transpose)."""
        where = [perm.index(d) for d in value.dims]  # new position of each channel dim
        if perm[0] != 0 or max(where) - min(where) != len(where) - 1:
            raise self.fail(node, f"permutation {perm} moves the batch dim or separates the "
                            f"channel dims {list(value.dims)}")
        order = sorted(range(len(where)), key=where.__getitem__)
        return replace(self.passthrough(arg, value), nodes=value.nodes.permute(order),
                       axis=min(where))

    def split(self, node: fx.Node, arg: fx.Node, value: Value) -> tuple[Value, ...]:
        """``chunk``/``split``: pieces along the channels take their share of the nodes; pieces
        along another dim keep them all."""
        metas = node.meta.get("tensor_meta")
        if not isinstance(metas, (tuple, list)):
            raise self.fail(node, "a split whose pieces the trace could not see")
        return self.pieces(node, arg, value, call_arg(node, 2, "dim", 0), [m.shape for m in metas])

    def pieces(self, node: fx.Node, arg: fx.Node, value: Value, dim: int,
               shapes: list[torch.Size]) -> tuple[Value, ...]:
        """The pieces, of ``shapes``, of splitting ``value`` (the tensor of ``arg``) along
        ``dim``."""
        dim %= max(len(node_shape(arg) or ()), 1)
        if dim not in value.dims:
            return tuple(replace(value, fresh=False) for _ in shapes)
        self.one_axis(node, value, "a split along the channels")
        pieces = value.nodes.split([shape[dim] for shape in shapes])
        return tuple(Value(p, False, value.area, value.axis) for p in pieces)

    def reduce(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        """Mean/max/min over dims other than batch and channels."""
        return self.reduce_dims(node, arg, value, reduced_dims(node_shape(arg), call_arg(node, 1, "dim")),
                                call_arg(node, 2, "keepdim", False))

    def reduce_dims(self, node: fx.Node, arg: fx.Node, value: Value, dims: list[int],
                    keepdim: bool) -> Value:
        """A reduction over ``dims`` (non-negative), which must leave batch and channels."""
        if not dims or 0 in dims or any(d in value.dims for d in dims):
            raise self.fail(node, f"reduction over dims {dims} touches batch or channels")
        axis = value.axis
        if not keepdim:
            axis -= sum(d < value.axis for d in dims)
        return replace(self.passthrough(arg, value), axis=axis)
