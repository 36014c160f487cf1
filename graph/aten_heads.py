"""Attention whose input projection is laid out head by head, in the ATen walk (docs/graph.md,
"Heads laid out head by head").

timm's ``Attention`` of TinyViT, EfficientFormer and LeViT reshapes one Linear's output so that
the heads are outermost and each head holds its queries, keys and values one after another,
with values wider than queries and keys::

    qkv = linear(x).view(B, N, H, -1)                  # row h * (2d + e) + j: head h, entry j
    q, k, v = qkv.split([d, d, e], dim=3)              # (or permute first, then split)
    attn = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * scale + biases[:, idxs]
    x = (attn.softmax(-1) @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(B, N, H * e)

Here: the split, which gives each part its run of channels per head (the parts of a fresh
Linear output stay fresh, so that the attention can take the Linear back), and TinyViT's
``scaled_dot_product_attention(q, k, v, attn_mask=biases[:, idxs])``, whose mask is a per-head
term added to the scores as :mod:`graph.aten_position` takes one added with ``+``: a passenger
of the head nodes. The layout itself is recognised where the attention is recorded
(``graph.aten_attention._attend``).
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import fx

from . import (
    aten_position,  # noqa: F401 - the position terms' handlers first
    aten_position_sources,
)
from .aten_attention import _head_layout, attend_sdpa
from .aten_ops import NOT_MINE, op_args, register_aten, register_aten_pattern
from .walker_core import Env, Split, Value, node_shape

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten


def _pieces_fresh(node: fx.Node, fresh: bool) -> bool:
    """The pieces of a split are each as fresh as its input when each is read once, by its
    own ``getitem`` (``q, k, v = qkv.split(...)``)."""
    picked = [user.args[1] for user in node.users if user.target is operator.getitem]
    return fresh and len(set(picked)) == len(picked) == len(node.users)


def _split_nodes(node: fx.Node, nodes: torch.Tensor, dims: tuple[int, ...]
                 ) -> list[torch.Tensor] | None:
    """The nodes of each piece of a split along a channel dim, None along another dim."""
    shapes = [piece.shape for piece in node.meta["val"]]
    dim = op_args(node)["dim"] % len(shapes[0])
    if dim not in dims:
        return None
    return list(nodes.split([shape[dim] for shape in shapes], dims.index(dim)))


@register_aten_pattern(aten.split, aten.split_with_sizes)
def _split(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """A split along the inner of two dims a reshape spread the channels over (the head dim
    ``view(B, N, H, -1)`` made, into queries, keys and values): each piece keeps, per head,
    its run of channels, and the pieces stay apart (fresh, for the attention to take back the
    Linear). Any other split is the plain split's (which refuses splitting the outer dim)."""
    (arg, value), = args
    if (isinstance(value, Value) and value.nodes.dim() == 2 and value.spread == 1
            and op_args(node)["dim"] % len(node_shape(arg) or (0,)) == value.axis + 1):
        parts = _split_nodes(node, value.nodes, tuple(value.dims))
        if parts is not None:
            fresh = _pieces_fresh(node, value.fresh and len(arg.users) == 1)
            return tuple(replace(value, nodes=p, fresh=fresh) for p in parts)
    return NOT_MINE


@register_aten(aten.split, aten.split_with_sizes, heads=True)
def _split_heads(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """The same split after the permute that moved the heads before the tokens."""
    (arg, split), = args
    if not isinstance(split, Split):
        raise walker.fail(node, "a split of attention scores or position logits")
    parts = _split_nodes(node, split.nodes, split.dims)
    if parts is None:
        raise walker.fail(node, "a split of an attention's tokens or batch")
    fresh = _pieces_fresh(node, split.fresh and len(arg.users) == 1)
    return tuple(replace(split, nodes=p, fresh=fresh) for p in parts)


@register_aten(aten.scaled_dot_product_attention, heads=True)
def _masked_sdpa(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """Attention with a float mask: the mask is added to the scores [B, heads, queries, keys],
    so it is taken as a term added to them is (``aten_position``): computed from the weights
    alone, its dim aligned with the heads followed back to a parameter's dim (a passenger of
    the head nodes), or the same for every head."""
    a = op_args(node)
    mask, found = a["attn_mask"], dict(args)
    if mask is None or mask in found or a["query"] not in found:
        return attend_sdpa(walker, node, args)  # no mask; or refused there
    if not isinstance(mask, fx.Node) or not aten_position_sources.from_weights(walker, mask):
        raise walker.fail(node, "an attention mask that depends on the network's input")
    if not getattr(mask.meta.get("val"), "dtype", torch.bool).is_floating_point:
        raise walker.fail(node, "a boolean attention mask (only float masks, added to the "
                          "scores, are taken)")
    queries, head, _ = _head_layout(walker, node, a["query"], found[a["query"]], -1)
    shape, ndim = tuple(node_shape(mask) or ()), len(node_shape(node) or ())
    dim = head - (ndim - len(shape))
    if dim >= 0 and shape[dim] not in (1, queries.shape[0]):
        raise walker.fail(node, f"a mask of shape {shape} whose dim {dim}, aligned with the "
                          f"{queries.shape[0]} heads, is not theirs")
    before = len(walker.rec.memberships)
    out = attend_sdpa(walker, node, args)
    if dim < 0 or shape[dim] == 1:
        return out  # the same for every head: a parameter it reads is left unused, refused
    made = walker.rec.memberships[before:]  # the head nodes' edges, if the layout has them
    key, table_dim = aten_position_sources.per_head_source(walker, node, mask, dim)
    if made:
        walker.carry(node, key, made[0][0].reshape(-1), table_dim)
    else:
        walker.carry(node, key)  # the paper's layout has no heads to follow
    return out
