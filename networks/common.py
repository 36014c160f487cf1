"""Small helpers every layer uses on a network: its example input and a temporary eval mode."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


def example_input(input_size: Sequence[int]) -> torch.Tensor:
    """A one-image batch of shape ``(1, *input_size)`` for tracing and MAC counting."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size={list(input_size)} must be [channels, height, width], "
                         "e.g. [3, 32, 32] for CIFAR or [3, 224, 224] for ImageNet")
    return torch.zeros(1, *size)


@contextlib.contextmanager
def evaluating(network: nn.Module) -> Iterator[nn.Module]:
    """``network`` in eval mode inside the block, its own mode restored after (also on error).

    Tracing, MAC counting and pruning run the network forward; in train mode that would move
    the BatchNorm running statistics."""
    was_training = network.training
    network.eval()
    try:
        yield network
    finally:
        network.train(was_training)
