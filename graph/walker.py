"""The torch.fx walk: :class:`Walker` visits an fx graph node by node and hands each call to
the handler :mod:`graph.handlers` registered for its module type or function; the layers and
tensor operations it records through are :mod:`graph.layer_ops` and :mod:`graph.tensor_ops`,
its bookkeeping :mod:`graph.walker_core`. :class:`graph.aten_walk.AtenWalker` walks an ATen
program with the same methods.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
from torch import fx

from .handlers import function_handler, module_handler
from .layer_ops import LayerOps
from .tensor_ops import TensorOps
from .walker_core import Env, TraceRecords, Value, node_shape


class Walker(LayerOps, TensorOps):
    """Walks an fx graph node by node and records the channels each state_dict tensor
    connects; handlers of modules, functions (and :mod:`graph.aten_walk`'s ATen operations)
    record through its methods."""

    # -- walk -----------------------------------------------------------------------------
    def step(self, node: fx.Node) -> Env:
        if node.op == "placeholder":
            if self.rec.num_nodes:
                raise self.fail(node, "networks with more than one input tensor")
            shape = node_shape(node)
            if shape is None or len(shape) < 2:
                raise self.fail(node, "the input must be a tensor [batch, channels, ...]")
            self.rec.input_channels = shape[1]
            return Value(self.rec.new_nodes(shape[1]), False, 1)
        if node.op == "get_attr":
            return None
        args = self.channel_args(node)
        if node.op == "output":
            values = [v for _, v in args if isinstance(v, Value)]
            if values:
                self.rec.outputs = torch.cat([v.nodes.reshape(-1) for v in values])
            return None
        if not args:
            return None  # shape arithmetic and the like: no channels involved
        if node.op == "call_function" and node.target is operator.getitem:
            return self.getitem(node, args)
        if any(not isinstance(v, Value) for _, v in args):
            raise self.fail(node, "a tuple of channel tensors used other than by indexing")
        arg, value = args[0]
        if node.op == "call_module":
            m = self.modules[node.target]
            handler = module_handler(type(m))
            if handler is None:
                raise self.fail(node, f"module type {type(m).__name__} is not supported "
                                "(graph.register_module adds a type)")
            return handler(self, node, m, arg, value)
        function = function_handler(node.target)
        if function is not None:
            return function(self, node, args)
        if node_shape(node) is None:
            return None  # x.size(), x.dim() and the like: no channels in the result
        raise self.fail(node, "this operation on channel tensors is not supported")

    def getitem(self, node: fx.Node, args) -> Env:
        """An output of a multi-output call, or ``x[:, 0]`` (a token) and other indexing that
        leaves the channel dims whole."""
        (source, env), = args[:1]
        index = node.args[1]
        if isinstance(env, tuple):
            return env[index]
        index = index if isinstance(index, tuple) else (index,)
        whole = slice(None)
        if isinstance(env, Value) and all(isinstance(i, int) or i == whole for i in index):
            touched = [d for d, i in enumerate(index) if i != whole]
            if 0 not in touched and not set(touched) & set(env.dims):
                axis = env.axis - sum(d < env.axis for d, i in enumerate(index) if isinstance(i, int))
                return replace(self.passthrough(source, env), axis=axis)
        raise self.fail(node, f"indexing {index} of a tensor whose channels are in dims "
                        f"{list(env.dims) if isinstance(env, Value) else '?'} (only whole "
                        "channel dims and integer or full indices elsewhere are supported)")

    def run(self) -> TraceRecords:
        for node in self.gm.graph.nodes:
            self.env[node] = self.step(node)
        return self.rec
