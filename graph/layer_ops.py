"""How layers map channels: convolution, Linear, batch and layer norm, pooling and
self-attention, as methods of the walker (:class:`LayerOps`, part of
:class:`graph.walker.Walker`).

The handlers of :mod:`graph.handlers` (torch.fx modules and functions) and of
:mod:`graph.aten_ops` (ATen operations) call these with the state_dict keys of the layer's
tensors; they record edges and node features through :class:`graph.walker_core.WalkerCore`.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx, nn

from .node_slots import ATTENTION, BATCHNORM, BIAS, LAYERNORM, QKV_BIAS
from .walker_core import Rows, Value, WalkerCore


class LayerOps(WalkerCore):
    """The walker's layers: each records its tensors on the channels it reads and writes and
    returns its output's :class:`Value`."""

    def conv(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        if m.transposed:
            raise self.fail(node, "transposed convolutions are not supported")
        return self.convolution(node, value, type(m).__name__, tuple(m.weight.shape), m.groups,
                                f"{node.target}.weight",
                                None if m.bias is None else f"{node.target}.bias")

    def convolution(self, node: fx.Node, value: Value, what: str, shape: tuple[int, ...],
                    groups: int, weight: str, bias: str | None) -> Value:
        """A convolution of ``value``'s channels by state-dict tensor ``weight`` of ``shape``
        [out, in/groups, *kernel] in ``groups`` groups, plus ``bias`` (or None)."""
        self.channels_first(node, value, what)
        in_channels = shape[1] * groups
        if len(value.nodes) != in_channels:
            raise self.fail(node, f"expects {in_channels} channels, input has {len(value.nodes)}")
        out_nodes = self.rec.new_nodes(shape[0])
        area = math.prod(shape[2:])
        self.add_weight(node, weight, area, value.nodes.view(groups, -1), out_nodes.view(groups, -1))
        if bias is not None:
            self.add_channels(node, bias, BIAS.name, "bias", out_nodes)
        return Value(out_nodes, True, area)

    def linear(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        return self.dense(node, arg, value, m.out_features, f"{node.target}.weight",
                          None if m.bias is None else f"{node.target}.bias")

    def dense(self, node: fx.Node, arg: fx.Node, value: Value, out_features: int, weight: str,
              bias: str | None) -> Value:
        """A Linear on the channels (last dim). After a flattened spatial map its weight
        [out, C*H*W] holds one H*W kernel per (channel, output) pair: edges of that area, as
        a conv with a kernel covering the whole map; after a patch merging, one 2x2 kernel."""
        self.channels_last(node, arg, replace(value, spread=1), "Linear")
        out_nodes = self.rec.new_nodes(out_features)
        rows = Rows(columns=value.spread) if value.outer else Rows()
        self.add_weight(node, weight, value.spread, value.nodes.view(1, -1), out_nodes.view(1, -1),
                        rows)
        if bias is not None:
            self.add_channels(node, bias, BIAS.name, "bias", out_nodes)
        return Value(out_nodes, True, 1, value.axis)

    def batchnorm(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        return self.batch_norm(node, arg, value, type(m).__name__, m.num_features, {
            name: f"{node.target}.{name}" for name in BATCHNORM.fields
            if getattr(m, name, None) is not None})

    def batch_norm(self, node: fx.Node, arg: fx.Node, value: Value, what: str, features: int,
                   keys: dict[str, str]) -> Value:
        """A batch norm over ``features`` channels in dim 1; ``keys``: the state-dict key of
        each of its tensors present (``BATCHNORM.fields``)."""
        self.channels_first(node, value, what)
        if len(value.nodes) != features:
            raise self.fail(node, f"expects {features} channels, input has {len(value.nodes)}")
        for name in BATCHNORM.fields:
            if name in keys:
                self.add_channels(node, keys[name], BATCHNORM.name, name, value.nodes)
        return self.passthrough(arg, value)

    def pooling(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        """Pooling works on the dims after dim 1: the channels must be in dim 1."""
        self.channels_first(node, value, "pooling")
        return self.passthrough(arg, value)

    def layer_norm(self, node: fx.Node, arg: fx.Node, value: Value, normalized_shape,
                   weight: str | None, bias: str | None) -> Value:
        """LayerNorm over the channels (in the last dim): its weight and bias become node
        features; a LayerNorm over more than the channels mixes them and is refused. Over
        merged patches (each channel ``spread`` times, outermost) each copy's weight and bias
        take a slot of their own on the channel's node."""
        self.channels_last(node, arg, replace(value, spread=1, outer=False), "LayerNorm")
        if value.spread != 1 and not value.outer:
            self.one_axis(node, value, "LayerNorm")
        count = len(value.nodes)
        if tuple(normalized_shape) != (count * value.spread,):
            raise self.fail(node, f"LayerNorm over shape {tuple(normalized_shape)}: only a "
                            f"normalization over the {count * value.spread} channel entries "
                            "of the last dim is supported")
        for copy in range(value.spread):
            rows = Rows(copy * count, (copy + 1) * count) if value.spread > 1 else Rows()
            layer = f"{node.name}[{copy}]" if value.spread > 1 else None
            for name, key in (("weight", weight), ("bias", bias)):
                if key is not None:
                    self.add_channels(node, key, LAYERNORM.name, name, value.nodes, rows, layer)
        return self.passthrough(arg, value)

    def attention(self, node: fx.Node, value: Value, heads: int, qkv: tuple[str, str | None],
                  proj: tuple[str, str | None]) -> tuple[Value, torch.Tensor | None]:
        """Self-attention on the channels of ``value`` (``attention_inputs``), then its output
        projection (``proj``: the state-dict keys of its weight and bias, or None), which reads
        the values' nodes. Returns the output's value and the head nodes (None in the paper's
        layout)."""
        _, read, head_nodes = self.attention_inputs(node, value.nodes, heads, qkv)
        out = self.new_nodes(len(value.nodes))
        proj_weight, proj_bias = proj
        self.add_weight(node, proj_weight, 1, read.view(1, -1), out.view(1, -1))
        if proj_bias is not None:
            self.add_channels(node, proj_bias, BIAS.name, "bias", out)
        return Value(out, True, 1, value.axis), head_nodes

    def attention_inputs(self, node: fx.Node, inputs: torch.Tensor, heads: int,
                         qkv: tuple[str, str | None]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The input projection of self-attention on channels ``inputs`` [C], with head nodes
        (after NiNo, Knyazev et al. 2025); ``qkv`` are the state-dict keys of its weight and
        bias (or None), [3C, C]: queries, keys, values, head by head. Channel i of a head's
        queries and keys is one node (one edge per input channel with the query and key
        weights as 2 features: the scores need both permuted alike), channel i of its values
        another (the output projection's input i), and a featureless membership edge ties
        each head's nodes to a head node, so that only whole heads and channels within a head
        can be permuted: exactly the network's symmetries. Returns the query/key nodes, the
        value nodes and the head nodes (in the paper's layout, ``_paper_attention``, one node
        per channel for all three and no heads)."""
        if self.attention_layout == "paper":
            inner = self._paper_attention(node, inputs, qkv)
            return inner, inner, None
        width = len(inputs)
        head_nodes, qk, v = self.new_nodes(heads), self.new_nodes(width), self.new_nodes(width)
        weight, bias = qkv
        self.add_weight(node, weight, 2, inputs.view(1, -1), qk.view(1, -1), Rows(0, 2 * width, zip=2))
        self.add_weight(node, weight, 1, inputs.view(1, -1), v.view(1, -1), Rows(2 * width, 3 * width))
        if bias is not None:
            for i, name in enumerate(ATTENTION.fields):
                self.add_channels(node, bias, ATTENTION.name, name, qk, Rows(i * width, (i + 1) * width))
            self.add_channels(node, bias, BIAS.name, "bias", v, Rows(2 * width, 3 * width))
        for members in (qk, v):
            self.rec.memberships.append((head_nodes[:, None], members.view(heads, -1)))
        return qk, v, head_nodes

    def _paper_attention(self, node: fx.Node, inputs: torch.Tensor,
                         qkv: tuple[str, str | None]) -> torch.Tensor:
        """The paper's code's attention layout (its ViT conversion): channel i of the queries,
        keys and values is one node, fed by one 3-feature edge (query, key, value weight) per
        input channel; its bias features are in-projection bias entries 3i, 3i+1, 3i+2, as
        that code reads them (so not channel i's own biases). No head structure: the graph
        cannot tell a permutation across heads, which is no symmetry, from one within.
        Returns the nodes (the output projection reads them)."""
        width = len(inputs)
        inner = self.new_nodes(width)
        weight, bias = qkv
        self.add_weight(node, weight, 3, inputs.view(1, -1), inner.view(1, -1),
                        Rows(0, 3 * width, zip=3))
        if bias is not None:
            for i, name in enumerate(QKV_BIAS.fields):
                self.add_channels(node, bias, QKV_BIAS.name, name, inner, Rows(i, step=3))
        return inner
