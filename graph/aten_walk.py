"""Walk a ``torch.export`` program (ATen operations) and record the same channel bookkeeping
as the torch.fx walk (docs/graph.md, "Encoding").

torch.fx sees modules and Python functions, so every spelling of one computation (a
BatchNorm2d, a subclass that calls ``F.batch_norm``, the function itself) needs a handler of
its own. An exported program spells them all as one ATen operation. This walker reuses the fx
walker's bookkeeping (:class:`graph.walker.Walker`) and produces the same
:class:`graph.walker_core.TraceRecords`; the handler of each ATen operation is registered in
:mod:`graph.aten_ops` (convolutions in :mod:`graph.aten_conv`, self-attention in
:mod:`graph.aten_attention`). As in the fx walk, anything it does not model raises
:class:`UnsupportedArchitectureError`.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from . import aten_attention, aten_conv, aten_heads, aten_position, aten_radix  # noqa: F401 - register the attention, convolution, head-layout, position and radix handlers
from .aten_encoding import carry_projection
from .aten_ops import aten_handler
from .errors import UnsupportedArchitectureError
from .walker import Walker
from .walker_core import Env, Logits, Scores, Split, TraceRecords, Value, node_shape

aten = torch.ops.aten
# operations that change a tensor's shape but not its elements' row-major order
_PARAMETER_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze,
                    aten.flatten, aten.alias)


def _stored(tensor):
    """The tensor that ``tensor`` reshapes (through views of it alone), or ``tensor``."""
    while isinstance(tensor, fx.Node) and tensor.op == "call_function" and (
            getattr(tensor.target, "overloadpacket", None) in _PARAMETER_VIEWS):
        tensor = tensor.args[0]
    return tensor


def _one_per_channel(tensor, channels: int) -> bool:
    """Is ``tensor`` a parameter or buffer of ``channels`` entries along one dim (the others
    of size 1)?"""
    shape = node_shape(tensor) or ()
    return (isinstance(tensor, fx.Node) and tensor.op == "placeholder"
            and math.prod(shape) == channels and sum(n != 1 for n in shape) <= 1)


def _module_path(node: fx.Node) -> str:
    """The innermost module whose forward made ``node``, with its type."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", repr(kind))
    return f"{path or '<top level>'} ({kind.rsplit('.', 1)[-1]})"


class AtenWalker(Walker):
    """The fx walker's bookkeeping over an exported program: parameters and buffers are the
    program's placeholders (``graph_signature``), every call an ATen operation."""

    def __init__(self, program: torch.export.ExportedProgram, attention: str = "heads") -> None:
        super().__init__(program.graph_module, attention)
        signature = program.graph_signature
        # placeholder name -> state_dict key of the parameter or buffer it stands for
        self.keys = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        self.parameters = set(signature.inputs_to_parameters)  # placeholders of parameters
        self.user_inputs = set(signature.user_inputs)
        # tensors computed from the channels by functions that treat every channel alike (a
        # mean over the channels, then numbers added): no channel permutation changes them
        self.invariant: set[fx.Node] = set()

    def fail(self, node: fx.Node, why: str) -> UnsupportedArchitectureError:
        called = node.meta.get("torch_fn")
        called = f", called as {called[1]}" if called else ""
        return UnsupportedArchitectureError(
            f"aten node {node.name!r} (module path {_module_path(node)!r}, operation "
            f"{node.target}{called}): {why}. docs/graph.md lists the supported operations; "
            "graph.register_aten adds one"
        )

    def parameter_key(self, tensor) -> str | None:
        """Also through reshapes of the parameter alone (timm's layer scale multiplies by
        ``gamma.reshape(1, -1, 1, 1)``): a reshape keeps the elements' row-major order, and
        the callers check that the channels lie along one dim of the reshaped tensor."""
        tensor = _stored(tensor)
        if isinstance(tensor, fx.Node) and tensor.op == "placeholder":
            return self.keys.get(tensor.name)
        return None

    def add_passenger(self, node: fx.Node, param: fx.Node, value: Value) -> None:
        """A passenger's record names the dim of the stored tensor holding the channels. An
        ``expand`` (a class token over the batch, ``cls_token.expand(B, -1, -1)``) only
        repeats the stored tensor along its size-1 dims, or new leading ones: broadcasting
        aligns the stored tensor's dims as they were, and ``channel_dim`` refuses a channel
        dim that the expand made. Through a reshape the aligned dim is another than the
        stored one; only a parameter of one entry per channel (a per-channel shift,
        ``bias.view(1, 1, 1, -1)``) keeps channel c at entry c along its one dim of size C."""
        while (param.op == "call_function" and isinstance(param.args[0], fx.Node)
               and getattr(param.target, "overloadpacket", None) is aten.expand):
            param = param.args[0]
        stored = _stored(param)
        if self.rejoin(node, stored, value):
            return
        if stored is not param and _one_per_channel(stored, len(value.nodes)):
            self.channel_dim(node, param, value)  # the reshape aligns the C entries
            shape = node_shape(stored) or ()
            dim = next((d for d, n in enumerate(shape) if n != 1), 0)
            self.carry(node, self.state_key(node, stored), value.nodes, dim)
            return
        if param.op != "placeholder" and carry_projection(self, node, param, value):
            return  # a convolution of fixed position features (EdgeNeXt's positional encoding)
        if param.op != "placeholder":
            raise self.fail(node, f"{param.name!r} (operation {param.target}) joins the "
                            "channels: only a parameter as stored, or one entry per channel "
                            "reshaped, can travel with them")
        super().add_passenger(node, param, value)

    def rejoin(self, node: fx.Node, stored: fx.Node, value: Value) -> bool:
        """A parameter that already follows channels meets another tensor's (CaiT's class
        token: concatenated with the patch tokens, then added to the class attention's
        output): channel i of both is channel i of the parameter, so they permute alike.
        A layer's fresh channels become the earlier ones (as a projection shortcut's do in a
        sum); anything else is refused. False where the parameter follows no channels yet."""
        key = self.parameter_key(stored)
        earlier = [(nodes, dim) for k, nodes, dim in self.rec.passengers if k == key]
        if not earlier:
            return False
        nodes, dim = earlier[0]
        shape = node_shape(stored) or ()
        aligned = (dim is not None and len(nodes) == len(value.nodes) == shape[dim]
                   and self.channel_dim(node, stored, value) == dim)
        if aligned and [self.rec.find(n) for n in nodes.tolist()] == [
                self.rec.find(n) for n in value.nodes.tolist()]:
            return True  # the same channels again: nothing new to record
        fresh = value.fresh and all(len(arg.users) == 1 for arg, _ in self.channel_args(node))
        if not (aligned and fresh):
            raise self.fail(node, f"parameter {key!r} follows channels already and meets "
                            "channels that are no layer's fresh output (only those can become "
                            "the channels it follows)")
        self.one_axis(node, value, "a parameter that follows channels")
        self.rec.merge(value.nodes, nodes)
        return True

    def step(self, node: fx.Node) -> Env:
        if node.op == "placeholder" and node.name not in self.user_inputs:
            return None  # a parameter, buffer or constant: read by the operations using it
        if node.op == "output" and any(isinstance(v, (Split, Scores, Logits))
                                       for _, v in self.channel_args(node)):
            raise self.fail(node, "an output whose channels are split into attention heads")
        if node.op != "call_function":
            return super().step(node)  # the input, the output
        args = self.channel_args(node)
        if not args:
            # operations on parameters or constants alone; on invariant tensors alone (and
            # numbers), another invariant tensor
            if node.all_input_nodes and all(n in self.invariant for n in node.all_input_nodes):
                self.invariant.add(node)
            return None
        if node.target is operator.getitem:
            return self.getitem(node, args)
        if any(isinstance(v, (Split, Scores, Logits)) for _, v in args):
            return self.on_heads(node, args)
        values = [(arg, v) for arg, v in args if isinstance(v, Value)]
        if len(values) != len(args):
            raise self.fail(node, "a tuple of channel tensors used other than by indexing")
        handler = aten_handler(node.target)
        if handler is None:
            raise self.fail(node, "this operation on channel tensors is not supported")
        return handler(self, node, values)

    def on_heads(self, node: fx.Node, args) -> Env:
        """An operation on an attention's split channels or scores (graph/aten_attention.py)."""
        handler = aten_handler(node.target, heads=True)
        if handler is None:
            where = ", ".join(f"{arg.name!r}: {_described(v)}" for arg, v in args)
            raise self.fail(node, f"this operation on channels that an earlier permute moved "
                            f"apart or before the batch, or on attention scores ({where}), is "
                            "not supported")
        return handler(self, node, args)


def _described(env: Env) -> str:
    if isinstance(env, Split):
        return f"channels split over dims {list(env.dims)}, batch in dim {env.batch}"
    if isinstance(env, Scores):
        return f"attention scores, heads in dim {env.head}"
    if isinstance(env, Logits):
        return "relative position logits of an attention's queries"
    return "channels" if isinstance(env, Value) else "no channels"


def export(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``module``'s ATen program in eval mode (the function its weights define: no dropout or
    stochastic depth)."""
    was_training = module.training
    module.eval()
    try:
        return torch.export.export(module, example_inputs, strict=False)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} cannot be exported with torch.export ({type(e).__name__}: "
            f"{first_line}); data-dependent control flow in forward() is not supported"
        ) from e
    finally:
        module.train(was_training)


def trace_aten(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], attention: str = "heads"
               ) -> tuple[TraceRecords, set[str]]:
    """``graph.tracing.trace`` through ``torch.export`` instead of torch.fx: the records of
    ``module`` on ``example_inputs`` and the state_dict keys they cover."""
    walker = AtenWalker(export(module, example_inputs), attention)
    return walker.run(), walker.used_keys
