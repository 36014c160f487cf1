"""Attention with position terms added to its scores, and self-attention over conv feature
maps, in the ATen walk (docs/graph.md, "Position terms in attention").

Three patterns, each recorded so that the graph's symmetries stay the network's:

* **A per-head bias added to the scores** (timm's Swin: ``table[index].view(N, N, -1)
  .permute(2, 0, 1).unsqueeze(0)``; EfficientFormerV2: ``biases[:, index]``): a parameter read
  through gathers of other dims, reshapes and permutes that keep its head dim whole. Head h
  of the bias meets only head h of the scores, so the table permutes with the heads: a
  passenger of the head nodes (as the fx walk has torchvision's Swin), recorded once the
  attention makes them. A term that is the same for every head (Swin's shifted-window mask,
  a buffer) follows nothing. Scores reshaped over their batch and token dims (Swin's
  ``attn.view(-1, windows, heads, N, N)`` for the mask) keep their heads.
* **Heads cut from the channels of a [B, C, H, W] map and folded into the batch** (timm's
  ``BottleneckAttn``: ``q.reshape(B * heads, head size, H * W)``): the channels become a
  :class:`Split` whose head dim is the batch dim (batch outermost); reshapes that keep that
  dim and the head's channel dim follow it, ``reshape(B, C, H, W)`` unfolds it again.
* **Relative position logits** (BotNet's ``PosEmbedRel``): ``q @ rel.transpose(-1, -2)``
  with a table ``rel`` [positions, head size] shared by every head, then pads, slices,
  reshapes, expands and permutes over the tokens, added to the scores. Entry d of every
  position vector multiplies channel d of every head's queries, so a permutation of a head's
  query/key channels keeps the network only if it is the same in every head and moves the
  table's entries with it. Head nodes alone allow a different one per head, so each channel
  index d gets a node of its own with a featureless membership edge to channel d of every
  head: a graph automorphism must then permute the channels of all heads alike, and the
  tables are passengers of these index nodes. Whole heads still permute freely.

The per-head terms and the attention's records live here; heads folded into the batch in
graph/aten_folded_heads.py, relative position logits in graph/aten_position_logits.py, where
terms come from in graph/aten_position_sources.py. Anything else that meets scores or logits
stays refused (graph/aten_attention.py).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import fx

from . import aten_attention  # noqa: F401 - its handlers first: some of ours wrap them
from . import aten_position_logits as logits
from .aten_folded_heads import reshape_folded
from .aten_ops import op_args, register_aten
from .aten_position_sources import (
    RESHAPES,
    aten,
    from_weights,
    per_head_source,
    registered,
    reshaped_dim,
    shape_of,
)
from .walker_core import Env, Logits, Scores, Split

if TYPE_CHECKING:
    from .aten_walk import AtenWalker


_earlier_add = registered(aten.add, heads=True)  # another module's, if any: the fallback


@register_aten(aten.add, aten.add_, heads=True)
def _add(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    if op_args(node).get("alpha", 1) != 1:
        raise walker.fail(node, "an addition with a scaled operand (alpha != 1) on attention "
                          "scores or position logits")
    envs = [env for _, env in args]
    if len(args) == 2 and all(isinstance(e, Logits) for e in envs):
        return logits.logits_sum(walker, node, args)
    if len(args) == 2 and {type(e) for e in envs} == {Scores, Logits}:
        return logits.scores_plus_logits(walker, node, args)
    if len(args) != 1 or not isinstance(envs[0], Scores):
        if _earlier_add is not None:
            return _earlier_add(walker, node, args)
        raise walker.fail(node, "an addition of attention scores, queries, keys or values to "
                          "other channel tensors")
    (arg, scores), = args
    others = [a for a in node.args[:2] if a is not arg]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        raise walker.fail(node, "an addition to attention scores of anything but one tensor")
    term = others[0]
    if not from_weights(walker, term):
        raise walker.fail(node, f"{term.name!r}, added to attention scores, depends on the "
                          "network's input")
    shape, out = shape_of(term), shape_of(node)
    if out != shape_of(arg):
        raise walker.fail(node, "a term that broadcasts the attention scores to a larger shape")
    dim = scores.head - (len(out) - len(shape))
    fresh = scores.fresh and len(arg.users) == 1
    if dim < 0 or shape[dim] == 1:
        # the same for every head (Swin's shifted-window mask): no head permutation or
        # channel permutation changes it; a parameter or persistent buffer it reads is left
        # unused and so refused by NetworkGraph (it would need a record of its own)
        return replace(scores, fresh=fresh)
    if scores.head == scores.batch:
        raise walker.fail(node, "a per-head term added to attention scores whose heads are "
                          "folded into the batch (its entries would be per sample and head)")
    if shape[dim] != out[scores.head]:
        raise walker.fail(node, f"a term of shape {shape} added to attention scores of shape "
                          f"{out} with heads in dim {scores.head}")
    key, table_dim = per_head_source(walker, node, term, dim)
    return replace(scores, fresh=fresh, followers=(*scores.followers, (key, "heads", table_dim)))


_earlier_head_reshape = registered(aten.reshape, heads=True)


@register_aten(*RESHAPES, heads=True)
def _reshape_heads(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    (arg, env), = args
    src, dst = shape_of(arg), shape_of(node)
    if isinstance(env, Logits):
        return replace(env, fresh=False)  # row-major order: every slab stays whole
    if isinstance(env, Scores):
        head = reshaped_dim(dst, src, env.head)
        if env.batch != 0 or env.head == 0 or head in (None, 0):
            raise walker.fail(node, f"reshape from {src} to {dst} mixes the heads of attention "
                              "scores with other dims")
        # what lies before the heads (batch and windows) stays outside them: the batch
        return replace(env, head=head, batch=0, fresh=env.fresh and len(arg.users) == 1)
    if isinstance(env, Split) and env.batch == env.dims[0] == 0 and env.nodes.dim() == 2:
        return reshape_folded(walker, node, arg, env, src, dst)
    if _earlier_head_reshape is not None:
        return _earlier_head_reshape(walker, node, args)
    raise walker.fail(node, f"reshape from {src} to {dst} of channels that an earlier permute "
                      "moved apart")


_head_matmul = registered(aten.matmul, heads=True)


@register_aten(aten.matmul, heads=True)
def _matmul(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """``q @ table``: relative position logits; ``scores @ v`` whose scores carry position
    terms: the attention (graph/aten_attention.py), then the terms recorded on its nodes."""
    assert _head_matmul is not None
    if len(args) == 1 and isinstance(args[0][1], Split) and args[0][0] is node.args[0]:
        return logits.position_logits(walker, node, *args[0])
    scores = args[0][1]
    if not isinstance(scores, Scores) or not scores.followers:
        return _head_matmul(walker, node, args)
    before = len(walker.rec.memberships)
    out = _head_matmul(walker, node, args)
    made = walker.rec.memberships[before:]
    head_nodes = made[0][0].reshape(-1) if made else None  # none in the paper's layout
    index_nodes = None
    for key, follows, dim in scores.followers:
        if head_nodes is None:
            walker.carry(node, key)  # no heads to follow: the layout cannot tell them apart
            continue
        if follows == "heads":
            walker.carry(node, key, head_nodes, dim)
            continue
        if index_nodes is None:
            index_nodes = logits.index_nodes(walker, made[0][1])
        walker.carry(node, key, index_nodes, dim)
    return out
