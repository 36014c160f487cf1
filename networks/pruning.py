"""Pure-torch pruning helpers shared by the graph tests, callbacks and benchmarks."""
from __future__ import annotations

import torch
from torch import nn


def classifier_layer(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """The layer that produces the network's output, found by running it (by identity, never
    by matching its width to the class count)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    return order[-1]
