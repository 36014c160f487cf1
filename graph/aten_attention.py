"""Self-attention in the ATen walk (docs/graph.md, "The ATen walk"): the handlers that follow
an attention's heads through a network's ATen program and record the same head nodes as the
fx walk's ``nn.MultiheadAttention`` (:meth:`graph.layer_ops.LayerOps.attention_inputs`).

An attention written out in tensor operations (timm's ``Attention``)::

    qkv = linear(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)   # [3, B, H, N, D]
    q, k, v = qkv.unbind(0)                                         # [B, H, N, D] each
    x = scaled_dot_product_attention(q, k, v)     # or softmax(q * s @ k.transpose(-2, -1)) @ v
    x = proj(x.transpose(1, 2).reshape(B, N, C))

The reshape splits the Linear's 3C channels into (3, H, D) dims (a :class:`Value`); the
permute separates those dims and moves one before the batch, which a :class:`Split` records;
unbind/select pick query, key and value; ``q @ k^T`` gives :class:`Scores` (per head, the
query and key channels it mixes); softmax and scaling by numbers keep them; at
``scaled_dot_product_attention`` or ``scores @ v`` the attention is known: the Linear's
records are taken back and recorded as the attention's input projection (query and key
channel i of a head one node, value channels another, head nodes), its channels merged into
those nodes. The output holds the value nodes; ``transpose(1, 2).reshape(B, N, C)`` makes it
a :class:`Value` again, read by the output projection (an ordinary Linear). Anything else on
a Split or Scores is refused with the operation named.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import fx

from .aten_cross_attention import attend_apart, head_nodes, sources
from .aten_ops import op_args, register_aten
from .node_slots import ATTENTION, BIAS
from .walker_core import Env, Rows, Scores, Split, Value, node_shape, swap_dims

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten
Heads = Union[Value, Split, Scores]


def as_split(walker: AtenWalker, node: fx.Node, env: Any) -> Split:
    """``env`` (a channel tensor or split channels) as split channels."""
    if isinstance(env, Split):
        return env
    if not isinstance(env, Value):
        raise walker.fail(node, f"expected the channels of one tensor, got {type(env).__name__}")
    if env.spread != 1:
        raise walker.fail(node, "moving apart channels flattened together with a spatial map")
    return Split(env.nodes, tuple(env.dims), 0, env.fresh, env.area)


def settle(split: Split) -> Value | Split:
    """A :class:`Value` again once the batch is first and the channel dims are together."""
    dims = split.dims
    # (heads folded into the batch, graph/aten_position.py, stay split: the batch is a head dim)
    if (split.batch == 0 and split.batch not in dims
            and list(dims) == list(range(dims[0], dims[0] + len(dims)))):
        return Value(split.nodes, split.fresh, split.area, dims[0])
    return split


def _fresh(env: Heads, arg: fx.Node) -> bool:
    """Still read only along one chain from the layer that made it (``Value.fresh``)."""
    return env.fresh and len(arg.users) == 1


def _operand(walker: AtenWalker, node: fx.Node, args: list[tuple[fx.Node, Heads]]
             ) -> tuple[fx.Node, Heads]:
    """The one channel argument of an operation whose other arguments are numbers."""
    (arg, env), *rest = args
    tensors = [a for a in (*node.args, *node.kwargs.values())
               if a is not arg and isinstance(a, fx.Node)]
    if rest or tensors or arg is not node.args[0]:
        raise walker.fail(node, f"further tensor inputs {[n.name for n in tensors]} besides "
                          "an attention's queries, keys, values or scores")
    return arg, env


def _move(walker: AtenWalker, node: fx.Node, arg: fx.Node, env: Any, perm: list[int]) -> Env:
    """Output dim i is input dim ``perm[i]``. Scores move their head and batch dims; channels
    whose dims stay together after the batch move as the fx walk moves them (``move_dims``),
    others become (or stay) split channels."""
    if isinstance(env, Scores):
        return replace(env, head=perm.index(env.head), batch=perm.index(env.batch),
                       fresh=_fresh(env, arg))
    if isinstance(env, Value) and env.spread != 1:
        return walker.move_dims(node, arg, env, perm)  # a flattened map: only the moves it allows
    split = as_split(walker, node, env)
    where = [perm.index(d) for d in split.dims]
    order = sorted(range(len(where)), key=where.__getitem__)
    return settle(Split(split.nodes.permute(order), tuple(sorted(where)), perm.index(split.batch),
                        _fresh(split, arg), split.area))


@register_aten(aten.permute)
@register_aten(aten.permute, heads=True)
def _permute(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _operand(walker, node, args)
    ndim = len(node_shape(arg) or ())
    return _move(walker, node, arg, env, [d % ndim for d in op_args(node)["dims"]])


@register_aten(aten.transpose)
@register_aten(aten.transpose, heads=True)
def _transpose(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _operand(walker, node, args)
    a = op_args(node)
    return _move(walker, node, arg, env, swap_dims(len(node_shape(arg) or ()), a["dim0"], a["dim1"]))


def _select(walker: AtenWalker, node: fx.Node, split: Split, dim: int, index: int,
            fresh: bool) -> Value | Split:
    """Entry ``index`` of dim ``dim``: along a channel dim, the channels of that entry (the
    queries of ``qkv[0]``); along a token dim, every channel."""
    if dim == split.batch:
        raise walker.fail(node, "selecting from the batch")
    nodes = split.nodes
    if dim in split.dims:
        if nodes.dim() == 1:
            raise walker.fail(node, "selecting a single channel")
        nodes = nodes.select(split.dims.index(dim), index)
    dims = tuple(d - (d > dim) for d in split.dims if d != dim)
    return settle(Split(nodes, dims, split.batch - (split.batch > dim), fresh, split.area))


def _parts_only(arg: fx.Node, dim: int) -> bool:
    """Every reader of ``arg`` takes another entry of dim ``dim`` (``qkv[0], qkv[1], qkv[2]``):
    the pieces are apart, so each is as fresh as ``arg``."""
    picked = [op_args(user)["index"] for user in arg.users
              if getattr(user.target, "overloadpacket", None) is aten.select
              and op_args(user)["dim"] % len(node_shape(arg) or (0,)) == dim]
    return len(picked) == len(arg.users) and len(set(picked)) == len(picked)


@register_aten(aten.unbind, heads=True)
def _unbind(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _operand(walker, node, args)
    split = as_split(walker, node, env)
    shape = node_shape(arg) or ()
    dim = op_args(node)["dim"] % len(shape)
    fresh = split.fresh and len(arg.users) == 1
    return tuple(_select(walker, node, split, dim, i, fresh) for i in range(shape[dim]))


@register_aten(aten.select, heads=True)
def _select_op(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _operand(walker, node, args)
    split = as_split(walker, node, env)
    a = op_args(node)
    dim = a["dim"] % len(node_shape(arg) or ())
    return _select(walker, node, split, dim, a["index"], split.fresh and _parts_only(arg, dim))


@register_aten(*(getattr(aten, n) for n in (
    "mul", "mul_", "div", "div_", "clone", "contiguous", "alias", "detach", "to")), heads=True)
def _scaled(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """Scaling queries or scores by a number (the attention's scale), copies and casts: every
    channel and head alike."""
    arg, env = _operand(walker, node, args)
    return replace(env, fresh=_fresh(env, arg))


@register_aten(aten.dropout, heads=True)
def _dropout(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    if op_args(node)["train"]:
        raise walker.fail(node, "dropout in training mode")
    return _scaled(walker, node, args)


@register_aten(aten.softmax, aten._softmax, heads=True)
def _softmax(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """Over the keys' tokens: each head's map alone."""
    arg, env = _operand(walker, node, args)
    dim = op_args(node)["dim"] % len(node_shape(arg) or ())
    if isinstance(env, Split):
        raise walker.fail(node, f"a softmax over dim {dim} of split queries, keys or values "
                          "themselves, not of their scores (factorised attention: CoaT's "
                          "softmax of the keys over the tokens)")
    if not isinstance(env, Scores) or dim in (env.head, env.batch):
        raise walker.fail(node, f"a softmax over dim {dim}: only over the tokens of attention "
                          "scores")
    return replace(env, fresh=_fresh(env, arg))


@register_aten(aten.layer_norm, heads=True)
def _head_norm(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    raise walker.fail(node, "a layer norm over each head's channels (timm's qk_norm): one "
                      "weight shared by every head would make the heads' channels permute "
                      "alike, which the head nodes do not express")


def _head_layout(walker: AtenWalker, node: fx.Node, arg: fx.Node, env: Any, last: int
                 ) -> tuple[torch.Tensor, int, int]:
    """The nodes [heads, head size] of an attention operand of ``arg`` whose heads are in a
    dim before the two token/channel dims and whose channels are in dim ``last`` (-1 or -2),
    its head dim and its batch dim."""
    split = as_split(walker, node, env)
    shape = node_shape(arg) or ()
    ndim = len(shape)
    ones = [d for d in range(ndim - 2) if shape[d] == 1 and d != split.batch]
    if split.nodes.dim() == 1 and len(ones) == 1:
        # one head: a reshape drops a dim of size 1 from the channels (PVT-v2's first stage,
        # ``q.reshape(B, N, 1, D)``), so the head is the one dim of size 1 before the tokens
        split = replace(split, nodes=split.nodes[None], dims=(ones[0], *split.dims))
    head = split.dims[0]
    if (split.nodes.dim() != 2 or split.dims[1] != ndim + last or head >= ndim - 2
            or split.batch >= ndim - 2):
        raise walker.fail(node, f"operand {arg.name!r} holds its channels in dims "
                          f"{list(split.dims)} of {ndim}: an attention's queries, keys and "
                          f"values have their heads before the tokens and each head's "
                          f"channels in dim {ndim + last}")
    return split.nodes, head, split.batch


def _attend(walker: AtenWalker, node: fx.Node, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, fresh: bool, heads: tuple[torch.Tensor, torch.Tensor] | None = None,
            shared_values: bool = False) -> torch.Tensor:
    """Record self-attention whose queries, keys and values have nodes ``q``, ``k``, ``v``
    [heads, head size]: the Linear that made them (rows q; k; v, head by head) becomes the
    attention's input projection (``attention_inputs``) and its channels the query/key and
    value nodes. Returns the value nodes [heads, head size], which the output reads. Several
    Linears, or head nodes that talking heads made (``heads``): ``attend_apart``;
    ``shared_values``: the queries and keys are fresh, the values read elsewhere too (taken
    only where a Linear of their own made them: the value nodes are then its channels)."""
    if not fresh and not shared_values:
        raise walker.fail(node, "queries, keys or values that other operations read too (a "
                          "tensor between the Linear and here has another reader, e.g. "
                          "reshape_as reading it for its shape)")
    shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (heads, head size)"
    if q.shape != k.shape or v.shape[0] != q.shape[0]:
        raise walker.fail(node, f"queries, keys and values of shapes {shapes}")
    found = sources(walker, node, [q, k, v])
    one_qkv = found is not None and found == [(found[0][0], i * q.numel()) for i in range(3)]
    if heads is not None or (found is not None and not one_qkv):
        return attend_apart(walker, node, q, k, v, heads, shared_values and not fresh)
    if not fresh:
        raise walker.fail(node, "values that other operations read too, from the Linear that "
                          "makes the queries and keys")
    if not (one_qkv and q.shape == v.shape):
        by_head = _head_by_head(walker, node, q, k, v)
        if by_head is not None:
            return by_head
    if q.shape != v.shape:
        raise walker.fail(node, f"queries, keys and values of shapes {shapes}")
    made = torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)])
    qkv, inputs = walker.retract_linear(node, made, "queries, keys and values")
    if len(inputs) != q.numel():  # attention_inputs reads a [3C, C] in-projection
        raise walker.fail(node, f"an input projection from {len(inputs)} channels to heads of "
                          f"{q.numel()} channels")
    qk, read, _ = walker.attention_inputs(node, inputs, q.shape[0], qkv)
    # nothing reads the Linear's own nodes any more (its records are gone, its output fed
    # only this attention); merged away, they do not stay behind as isolated graph nodes
    for part, into in ((q, qk), (k, qk), (v, read)):
        walker.rec.merge(part.reshape(-1), into)
    return read.view(q.shape)


def _head_by_head(walker: AtenWalker, node: fx.Node, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor | None:
    """Queries, keys and values [heads, d], [heads, d], [heads, e] laid out head by head in
    the rows of the Linear that made them (TinyViT's, EfficientFormer's, LeViT's ``qkv``:
    q_h; k_h; v_h for each head h, each consecutive rows), recorded as ``attention_inputs``
    records block-by-block rows (``_per_head_inputs``); returns the value nodes. None where no
    one layer's output is exactly these channels; refused where one is, laid out otherwise."""
    made = _rows_of(walker, torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)]))
    if made is None:
        return None
    flat, rows = made
    d = q.shape[1]
    qr, kr = rows[:q.numel()].view(q.shape), rows[q.numel():2 * q.numel()].view(k.shape)
    vr = rows[2 * q.numel():].view(v.shape)
    if not (_runs(qr) and _runs(vr) and torch.equal(kr, qr + d)):
        raise walker.fail(node, "queries, keys and values laid out neither block by block "
                          "(q; k; v, values as wide as queries and keys) nor head by head "
                          "(q_h; k_h; v_h, each consecutive rows)")
    qkv, inputs = walker.retract_linear(node, flat, "queries, keys and values")
    if walker.attention_layout == "paper":
        raise walker.fail(node, "the paper's attention layout of an input projection laid out "
                          "head by head (its code reads q; k; v block by block)")
    qk, read = _per_head_inputs(walker, node, inputs, qkv, qr[:, 0], d, vr)
    for part, into in ((q, qk), (k, qk), (v, read)):  # the Linear's nodes, as in _attend
        walker.rec.merge(part.reshape(-1), into.reshape(-1))
    return read


def _rows_of(walker: AtenWalker, made: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The output nodes, in row order, of the layer whose output is exactly the nodes
    ``made`` (each once), and the row of each of ``made``; None if there is none."""
    wanted = made.sort().values
    for _, _, _, dst, _ in walker.rec.weights:
        flat = dst.reshape(-1)
        if flat.numel() == made.numel() and torch.equal(flat.sort().values, wanted):
            row = torch.full((int(flat.max()) + 1,), -1, dtype=torch.long)
            row[flat] = torch.arange(len(flat))
            return flat, row[made]
    return None


def _runs(rows: torch.Tensor) -> bool:
    """Each head's channels [heads, size] are consecutive rows, in order."""
    return torch.equal(rows, rows[:, :1] + torch.arange(rows.shape[1]))


def _per_head_inputs(walker: AtenWalker, node: fx.Node, inputs: torch.Tensor,
                     qkv: tuple[str, str | None], starts: torch.Tensor, d: int,
                     values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_inputs`` for rows laid out head by head: head h's queries and keys are
    rows ``starts[h]`` + [0, 2d) (zipped into 2-feature edges, as there), its values rows
    ``values[h]`` (consecutive); biases and membership edges as there. One record per head
    and part, since a record covers consecutive rows. Returns the query/key nodes [heads, d]
    and the value nodes [heads, e]."""
    (weight, bias), src = qkv, inputs.view(1, -1)
    heads, e = values.shape
    head_nodes = walker.new_nodes(heads)
    qk, read = walker.new_nodes(heads * d).view(heads, d), walker.new_nodes(heads * e).view(heads, e)
    for h, (s, v) in enumerate(zip(starts.tolist(), values[:, 0].tolist())):
        walker.add_weight(node, weight, 2, src, qk[h].view(1, -1), Rows(s, s + 2 * d, zip=2))
        walker.add_weight(node, weight, 1, src, read[h].view(1, -1), Rows(v, v + e))
        if bias is not None:  # the same layer (the Linear) for every head: one slot each
            for i, name in enumerate(ATTENTION.fields):
                walker.add_channels(node, bias, ATTENTION.name, name, qk[h],
                                    Rows(s + i * d, s + (i + 1) * d))
            walker.add_channels(node, bias, BIAS.name, "bias", read[h], Rows(v, v + e))
    for members in (qk, read):
        walker.rec.memberships.append((head_nodes[:, None], members))
    return qk, read


@register_aten(aten.scaled_dot_product_attention, heads=True)
def _sdpa(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    if op_args(node)["attn_mask"] is not None:  # graph/aten_heads.py takes per-head tables
        raise walker.fail(node, "attention with a mask")
    return attend_sdpa(walker, node, args)


def attend_sdpa(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """``scaled_dot_product_attention``, its mask (if any) left to the caller."""
    a = op_args(node)
    if a["dropout_p"] or a.get("enable_gqa") or a.get("is_causal"):
        raise walker.fail(node, "attention with dropout, a causal mask or grouped queries")
    found = dict(args)
    if a["attn_mask"] in found:
        raise walker.fail(node, "an attention mask computed from the channels")
    if any(a[name] not in found for name in ("query", "key", "value")):
        raise walker.fail(node, "attention whose queries, keys or values carry no channels")
    (q, head, batch), (k, *kb), (v, *vb) = (
        _head_layout(walker, node, a[name], found[a[name]], -1) for name in ("query", "key", "value"))
    if kb != [head, batch] or vb != [head, batch]:
        raise walker.fail(node, "queries, keys and values with heads or batch in other dims")
    fresh = all(_fresh(found[a[name]], a[name]) for name in ("query", "key", "value"))
    nodes = _attend(walker, node, q, k, v, fresh)
    return settle(Split(nodes, (head, len(node_shape(node) or ()) - 1), batch, False))


@register_aten(aten.matmul, heads=True)
def _matmul(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """``q @ k.transpose(-2, -1)``: the scores; ``scores @ v``: the attention, recorded."""
    if len(args) != 2 or [arg for arg, _ in args] != list(node.args[:2]):
        raise walker.fail(node, "a matrix product with one channel operand")
    (na, a), (nb, b) = args
    if len(node_shape(na) or ()) != len(node_shape(nb) or ()):
        raise walker.fail(node, "a matrix product that broadcasts")
    fresh = _fresh(a, na) and _fresh(b, nb)
    if isinstance(a, Scores):
        v, head, batch = _head_layout(walker, node, nb, b, -1)
        if (head, batch) != (a.head, a.batch):
            raise walker.fail(node, "scores and values with heads or batch in other dims")
        nodes = _attend(walker, node, a.queries, a.keys, v, fresh, head_nodes(walker, node, a),
                        shared_values=_fresh(a, na))
        return settle(Split(nodes, (head, len(node_shape(node) or ()) - 1), batch, False))
    q, head, batch = _head_layout(walker, node, na, a, -1)
    k, *kb = _head_layout(walker, node, nb, b, -2)
    if kb != [head, batch]:
        raise walker.fail(node, "queries and keys with heads or batch in other dims")
    return Scores(q, k, head, batch, fresh)
