"""The public entry points of the torch.fx walk: :func:`trace` (a network's records and the
state_dict keys they cover) and :func:`symbolic_trace` (its fx graph, every registered module
type a leaf). The walk itself is :class:`graph.walker.Walker`, the handlers it dispatches to
:mod:`graph.handlers` (docs/graph.md, "Encoding").
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import UnsupportedArchitectureError
from .handlers import module_handler
from .walker import Walker
from .walker_core import TraceRecords


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every registered module type as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_handler(type(m)) is not None or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``module``'s fx graph in eval mode (the function its weights define: no dropout or
    stochastic depth), every registered module type one call (a leaf)."""
    was_training = module.training
    module.eval()
    try:
        return fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
    except Exception as e:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} cannot be traced with torch.fx ({type(e).__name__}: {e}); "
            "data-dependent control flow in forward() is not supported"
        ) from e
    finally:
        module.train(was_training)


def trace(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], attention: str = "heads"
          ) -> tuple[TraceRecords, set]:
    """Trace ``module`` on ``example_inputs`` with self-attention in layout ``attention``
    (``ATTENTION_LAYOUTS``); returns the records and the keys they cover."""
    gm = symbolic_trace(module)
    was_training = module.training
    module.eval()  # shape propagation must not touch BN running statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        module.train(was_training)
    walker = Walker(gm, attention)
    return walker.run(), walker.used_keys
