"""Attention whose queries, keys and values come from different Linears, and talking heads, in
the ATen walk (docs/graph.md, "Attention of several projections").

:mod:`graph.aten_attention` follows an attention's heads to the point where it is certain
(``scaled_dot_product_attention`` or ``scores @ v``) and records one ``qkv`` Linear as its
input projection. Here the same record is made when the queries, keys and values are the rows
of several Linears::

    q = self.q(x).reshape(B, N, H, D).transpose(1, 2)            # PVT-v2: queries from x,
    k, v = self.kv(sr(x)).reshape(B, M, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # keys and
                                                                 # values from reduced tokens
    q, k, v = self.wq(x[:, :1]), self.wk(x), self.wv(x)            # CrossViT, CaiT's class attention

The graph is the one of a single in-projection: query/key node i of a head (fed by the query
and the key weights), value node i of a head, head nodes with featureless membership edges.
Where the query and key Linears read the same channels, an edge carries both weights (2
features, zipped across the two tensors, as one ``qkv`` Linear's rows are zipped), so a network
with separate ``q``, ``k``, ``v`` Linears gets exactly the graph of the same network with one
fused ``qkv`` Linear. Where they read different channels (PVT-v2's keys come from a strided
convolution of the tokens), the query weights are edges from the query inputs and the key
weights edges from the key inputs, both into the query/key nodes: the two edge sets join
different nodes, so the graph still tells queries from keys. Inputs that overlap only in part
are refused.

**Talking heads** (CaiT): a Linear across the heads of the scores before and after the
softmax, ``proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``. Head ``h`` of its output
mixes every head's map, so heads no longer permute alike on both sides: the queries/keys have
head nodes of their own, the Linear's output heads are new nodes fed by one edge per (input
head, output head) carrying its weight (its bias a node feature), and the values' head nodes
are the output heads of the last such Linear. Whole heads then permute independently at each
stage (with the Linears' rows and columns), channels within a head as before: exactly the
network's symmetries. EfficientFormerV2 mixes the heads of scores [B, heads, N, N] by 1x1
convolutions (``talking_head1``/``talking_head2``): the same function and record. Its queries,
keys and values are 1x1 convolutions each followed by a BatchNorm, which stays on the query/key
or value nodes (a slot per layer); its values, wider than the queries, are read by a depthwise
convolution too, allowed since a convolution of their own made them (the value nodes are its
channels).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import fx

from .aten_ops import op_args, register_aten
from .node_slots import ATTENTION, BATCHNORM, BIAS
from .walker_core import Env, Rows, Scores, node_shape

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten


def _no_nodes() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass
class MixedScores(Scores):
    """Scores whose heads a Linear across the heads has mixed (talking heads): the head nodes
    of the queries/keys, and those of the current maps (the last Linear's output). (Defaults,
    so that fields with defaults may precede them in ``Scores``.)"""

    qk_heads: torch.Tensor = field(default_factory=_no_nodes)
    heads: torch.Tensor = field(default_factory=_no_nodes)


def head_nodes(walker: AtenWalker, node: fx.Node, scores: Scores
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The query/key and value head nodes of an attention over ``scores``, where a Linear
    across the heads made them; None where the scores' heads are the queries' own. Terms
    that follow the heads of the scores (per-head biases, where the walk records them as
    ``followers``) would not know which heads they follow here: refused."""
    if not isinstance(scores, MixedScores):
        return None
    if getattr(scores, "followers", ()):
        raise walker.fail(node, "per-head terms added to attention scores whose heads a "
                          "Linear across the heads mixed (talking heads)")
    return scores.qk_heads, scores.heads


@register_aten(aten.linear, heads=True)
def _across_heads(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """A Linear over the head dim of attention scores (talking heads)."""
    a = op_args(node)
    if len(args) != 1 or args[0][0] is not a["input"] or not isinstance(args[0][1], Scores):
        raise walker.fail(node, "a Linear over channels split into attention heads, or whose "
                          "weight carries them")
    arg, scores = args[0]
    if scores.head != len(node_shape(arg) or ()) - 1:
        raise walker.fail(node, f"a Linear over the last dim of attention scores whose heads "
                          f"are in dim {scores.head}: it would mix tokens")
    return _mix_heads(walker, node, arg, scores, a["weight"], a["bias"], "Linear")


@register_aten(aten.conv2d, heads=True)
def _conv_across_heads(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """A 1x1 convolution over the head dim of attention scores [B, heads, N, N]
    (EfficientFormerV2's ``talking_head1``/``talking_head2``): the function of a Linear across
    the heads, its weight [out, in, 1, 1] that Linear's."""
    a = op_args(node)
    if len(args) != 1 or args[0][0] is not a["input"] or not isinstance(args[0][1], Scores):
        raise walker.fail(node, "a convolution of channels split into attention heads, or "
                          "whose weight carries them")
    arg, scores = args[0]
    shape = tuple(node_shape(a["weight"]) or ())

    def all_are(name: str, default: int) -> bool:
        value = a.get(name, default)
        if isinstance(value, str):  # conv2d.padding: "valid", or "same" (none for 1x1)
            return value in ("valid", "same")
        return all(v == default for v in ([value] if isinstance(value, int) else value))

    if not (len(shape) == 4 and shape[2:] == (1, 1) and all_are("stride", 1)
            and all_are("padding", 0) and all_are("dilation", 1) and a.get("groups", 1) == 1):
        raise walker.fail(node, f"a convolution of attention scores with weight {shape} other "
                          "than 1x1, stride 1, no padding, one group (it would mix or drop "
                          "tokens, or mix heads group by group)")
    if len(node_shape(arg) or ()) != 4 or scores.head != 1 or scores.batch != 0:
        raise walker.fail(node, f"a convolution of attention scores whose heads are in dim "
                          f"{scores.head} and batch in dim {scores.batch}, not [B, heads, N, N]")
    return _mix_heads(walker, node, arg, scores, a["weight"], a["bias"], "convolution")


def _mix_heads(walker: AtenWalker, node: fx.Node, arg: fx.Node, scores: Scores,
               weight: fx.Node, bias: fx.Node | None, what: str) -> Env:
    """Record a Linear (or 1x1 convolution) ``weight`` [out, in(, 1, 1)] across the heads of
    ``scores``: its output heads new nodes, one edge per (input head, output head). Per-head
    terms added to the scores so far follow the heads it reads, recorded on them here."""
    heads = scores.heads if isinstance(scores, MixedScores) else walker.new_nodes(
        scores.queries.shape[0])
    qk_heads = scores.qk_heads if isinstance(scores, MixedScores) else heads
    out_features, in_features = (tuple(node_shape(weight) or ()) + (0, 0))[:2]
    if in_features != len(heads):
        raise walker.fail(node, f"a {what} of {in_features} inputs over {len(heads)} heads")
    if any(follows != "heads" for _, follows, _ in scores.followers):
        raise walker.fail(node, f"a {what} across the heads of attention scores that carry "
                          "relative position logits (their channel index nodes would follow "
                          "heads the mixing has left)")
    out = walker.new_nodes(out_features)
    walker.add_weight(node, walker.state_key(node, weight), 1, heads.view(1, -1), out.view(1, -1))
    if bias is not None:
        walker.add_channels(node, walker.state_key(node, bias), BIAS.name, "bias", out)
    # a per-head term added before the mixing: head h of it meets input head h alone
    for key, _, dim in scores.followers:
        walker.carry(node, key, heads, dim)
    # every field of the scores carried over (``Scores`` may hold more than these)
    carried = {f.name: getattr(scores, f.name) for f in fields(Scores)}
    return MixedScores(**{**carried, "fresh": scores.fresh and len(arg.users) == 1,
                          "followers": ()}, qk_heads=qk_heads, heads=out)


def _source(walker: AtenWalker, nodes: torch.Tensor) -> tuple[int, int] | None:
    """The Linear record (its index in ``walker.rec.weights``) whose output channels hold
    ``nodes`` as consecutive rows, and the first of those rows; None if there is none."""
    flat = nodes.reshape(-1)
    for i, (key, area, src, dst, rows) in enumerate(walker.rec.weights):
        if area != 1 or rows != Rows() or src.shape[0] != 1 or not isinstance(key, str):
            continue
        made = dst.reshape(-1)
        start = (made == flat[0]).nonzero().view(-1)
        if len(start) and int(start[0]) + len(flat) <= len(made) and torch.equal(
                made[int(start[0]):int(start[0]) + len(flat)], flat):
            return i, int(start[0])
    return None


def sources(walker: AtenWalker, node: fx.Node, parts: list[torch.Tensor]
            ) -> list[tuple[int, int]] | None:
    """The (Linear record, first row) of each of the queries, keys and values ``parts``, or
    None if any is not a run of one Linear's rows or if they leave rows of a Linear unread
    (those would feed something else: no in-projection of this attention alone)."""
    found = [_source(walker, part) for part in parts]
    if any(f is None for f in found):
        return None
    used: dict[int, list[tuple[int, int]]] = {}
    for (record, start), part in zip(found, parts):  # type: ignore[misc]
        used.setdefault(record, []).append((start, part.numel()))
    for record, runs in used.items():
        covered = 0
        for start, count in sorted(runs):
            if start != covered:
                return None
            covered += count
        if covered != walker.rec.weights[record][3].numel():
            return None
    return found  # type: ignore[return-value]


def _roots(walker: AtenWalker, nodes: torch.Tensor) -> list[int]:
    return [walker.rec.find(n) for n in nodes.tolist()]


def attend_apart(walker: AtenWalker, node: fx.Node, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, heads: tuple[torch.Tensor, torch.Tensor] | None,
                 shared_values: bool = False) -> torch.Tensor:
    """Record the attention whose queries, keys and values have nodes ``q``, ``k``, ``v``
    [heads, head size], made by the Linears ``sources`` finds (module docstring); ``heads``:
    the query/key and value head nodes where talking heads made them; ``shared_values``:
    other operations read the values too (allowed where a Linear of their own made them).
    Returns the value nodes [heads, head size]."""
    if walker.attention_layout == "paper":
        raise walker.fail(node, "queries, keys and values of several Linears, or talking "
                          "heads, in the paper's attention layout (one in-projection of "
                          "queries, keys and values: no form for either)")
    found = sources(walker, node, [q, k, v])
    if found is None:
        raise walker.fail(node, "queries, keys and values are not the rows, in that order, of "
                          "one Linear's output, nor each a run of rows of Linears that this "
                          "attention alone reads")
    if shared_values and found[2][0] in (found[0][0], found[1][0]):
        raise walker.fail(node, "values that other operations read too, from a Linear that "
                          "also makes the queries or keys")
    width, count = q.numel(), q.shape[0]
    qk_heads, v_heads = heads if heads is not None else (walker.new_nodes(count),) * 2
    if len(qk_heads) != count or len(v_heads) != v.shape[0]:
        raise walker.fail(node, f"{len(v_heads)} attention maps for values of {v.shape[0]} "
                          "heads")
    # take the Linears' records back, each once (a Linear may make several of q, k, v)
    retracted = {}
    for record in sorted({r for r, _ in found}, reverse=True):  # later records first: the
        dst = walker.rec.weights[record][3]                     # indices stay valid
        retracted[record] = walker.retract_linear(node, dst, "queries, keys or values",
                                                  kept=(BATCHNORM.name,))
    (wq, bq), iq = retracted[found[0][0]]
    (wk, bk), ik = retracted[found[1][0]]
    (wv, bv), iv = retracted[found[2][0]]
    (oq, ok, ov) = (start for _, start in found)
    qk, values = walker.new_nodes(width), walker.new_nodes(v.numel())
    into = (iq.view(1, -1), qk.view(1, -1))
    if wq == wk and ok == oq + width:  # one Linear's rows: q then k, zipped as in a qkv Linear
        walker.add_weight(node, wq, 2, *into, Rows(oq, oq + 2 * width, zip=2))
    elif _roots(walker, iq) == _roots(walker, ik) and wq != wk and oq == ok:
        # two Linears of the same inputs: the same rows of both zipped into one edge
        for key in (wq, wk):
            walker.use_key(node, key, Rows(oq, oq + width))
        walker.rec.weights.append(((wq, wk), 2, *into, Rows(oq, oq + width)))
    elif not set(_roots(walker, iq)) & set(_roots(walker, ik)):
        # different inputs: the query and key edges join different nodes
        walker.add_weight(node, wq, 1, *into, Rows(oq, oq + width))
        walker.add_weight(node, wk, 1, ik.view(1, -1), qk.view(1, -1), Rows(ok, ok + width))
    else:
        raise walker.fail(node, "queries and keys from inputs that share only some channels, "
                          "or from one Linear with the keys not right after the queries")
    walker.add_weight(node, wv, 1, iv.view(1, -1), values.view(1, -1), Rows(ov, ov + v.numel()))
    # the query and key biases of one channel fill one slot, even from two Linears
    for bias, start, name in ((bq, oq, "q_bias"), (bk, ok, "k_bias")):
        if bias is not None:
            walker.add_channels(node, bias, ATTENTION.name, name, qk, Rows(start, start + width),
                                layer=f"{node.name}.qk")
    if bv is not None:
        walker.add_channels(node, bv, BIAS.name, "bias", values, Rows(ov, ov + v.numel()))
    walker.rec.memberships.append((qk_heads[:, None], qk.view(count, -1)))
    walker.rec.memberships.append((v_heads[:, None], values.view(len(v_heads), -1)))
    # the Linears' own output nodes are now these nodes (nothing else reads them)
    for part, nodes in ((q, qk), (k, qk), (v, values)):
        walker.rec.merge(part.reshape(-1), nodes)
    return values.view(v.shape)
