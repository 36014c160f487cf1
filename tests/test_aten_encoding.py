"""graph/aten_encoding.py: a positional encoding computed from the token positions (Fourier
features of the grid, no parameters) and mapped onto the channels by a 1x1 convolution, added
to the tokens (EdgeNeXt's ``PositionalEncodingFourier``): the convolution's weight and bias
are passengers of the channels.

The oracles: a bit-exact round trip and the same outputs (``check_encoding``); swapping two
channels (with the passengers' rows) keeps the function, leaving the passengers in place does
not; an encoding fed by the input is refused.
"""
import math

import pytest
import torch
from pruning_helpers import randomize
from torch import nn

from graph import NetworkGraph, UnsupportedArchitectureError, check
from graph.check import EXACT, check_encoding

X = torch.randn(2, 3, 32, 32)
WIDTH, HIDDEN = 8, 4


def fourier(shape: tuple[int, int, int]) -> torch.Tensor:
    """[B, 2 * HIDDEN, H, W] sines and cosines of the normalised grid coordinates."""
    ones = torch.ones(shape)
    y, x = ones.cumsum(1) / shape[1] * 2 * math.pi, ones.cumsum(2) / shape[2] * 2 * math.pi
    freq = 100.0 ** (torch.arange(HIDDEN // 2).float() / HIDDEN)
    parts = [f(c[..., None] / freq) for c in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=3).permute(0, 3, 1, 2)


class Positioned(nn.Module):
    """Patch embedding, tokens plus the projected Fourier features, a channels-last MLP,
    mean pooling and a classifier; ``learned``: the features scaled by a parameter (no longer
    a fixed function of the positions, and a tensor the passengers would not hold)."""

    def __init__(self, learned: bool = False) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1)) if learned else None
        self.embed = nn.Conv2d(3, WIDTH, 8, 8)
        self.token_projection = nn.Conv2d(2 * HIDDEN, WIDTH, 1)
        self.mlp = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 16), nn.GELU(), nn.Linear(16, WIDTH))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        B, C, H, W = x.shape
        features = fourier((B, H, W))
        if self.gain is not None:
            features = features * self.gain
        pos = self.token_projection(features).reshape(B, C, H * W).permute(0, 2, 1)
        x = x.reshape(B, C, H * W).permute(0, 2, 1) + pos
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def test_a_projected_fourier_encoding_travels_with_the_channels():
    model = randomize(Positioned()).eval()
    verdict = check_encoding(model, X, swaps=16)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict
    graph = NetworkGraph(model, X, tracer="aten")
    embedded = next(b for b in graph.blocks if b.key == "embed.weight").dst[0]
    carried = {key: (nodes, dim) for key, nodes, dim in graph.passengers}
    assert set(carried) == {"token_projection.weight", "token_projection.bias"}
    for nodes, dim in carried.values():
        assert dim == 0 and torch.equal(nodes, embedded)
    # channels 1 and 5 swapped: with the projection's rows the same function, without not
    data, expected = graph.encode(model), model(X)
    swapped = check.swapped(graph, data, int(embedded[1]), int(embedded[5]))
    assert swapped is not None
    decoded = graph.decode(swapped)
    torch.testing.assert_close(torch.func.functional_call(model, decoded, (X,)), expected)
    state = model.state_dict()
    left = {**decoded, **{k: state[k] for k in carried}}
    assert not torch.allclose(torch.func.functional_call(model, left, (X,)), expected, atol=1e-4)
    # the metanetwork's decode reaches the passengers differentiably
    data.passengers.requires_grad_(True)
    torch.func.functional_call(model, graph.decode(data), (X,)).square().sum().backward()
    assert data.passengers.grad is not None and data.passengers.grad.abs().sum() > 0


def test_an_encoding_of_learned_features_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="joins the channels"):
        NetworkGraph(randomize(Positioned(learned=True)), X, tracer="aten")
