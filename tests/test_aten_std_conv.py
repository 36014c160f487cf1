"""graph/aten_conv.py: convolutions whose weight is standardised filter by filter in forward
(timm's ScaledStdConv2d and StdConv2d, the NF-Nets; a hand-written one in plain torch), walked
through torch.export. The oracle is ``graph.check``: a bit-exact round trip and node swaps that
the graph allows must keep the network's function; the gain left out of the swaps (a wrong
encoding, monkeypatched below) fails it. Weights computed any other way are refused."""
import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from timm.layers import ScaledStdConv2d, StdConv2d
from torch import nn

from graph import NetworkGraph, UnsupportedArchitectureError, edge_attr_key
from graph.aten_walk import AtenWalker, trace_aten
from graph.check import EXACT, WRONG, check_encoding
from graph.network_graph import TRACERS

X = torch.randn(2, 3, 12, 12)


@pytest.fixture
def aten_only(monkeypatch):
    """``check_encoding`` walks with the default tracer: make it the ATen walk, with no graph
    cached from before or for after."""
    NetworkGraph.clear_cache()
    monkeypatch.setitem(TRACERS, "auto", trace_aten)
    yield
    NetworkGraph.clear_cache()


class _HandStdConv(nn.Conv2d):
    """ScaledStdConv2d's math in plain torch, spelled otherwise: a gain of shape [out], a view
    back to the weight's shape, the number applied after the standardisation."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(cout))

    def forward(self, x):
        w = F.batch_norm(self.weight.view(1, self.out_channels, -1), None, None, self.gain,
                         training=True, eps=1e-5)
        return F.conv2d(x, w.view(self.weight.shape) * 0.5, self.bias, padding=1)


class _StdConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ScaledStdConv2d(3, 8, 3, padding=1)
        self.g = ScaledStdConv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.hand = _HandStdConv(8, 6)
        self.b = StdConv2d(6, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.hand(F.relu(self.g(F.relu(self.a(x))))))
        return self.head(F.relu(self.b(x)).mean((2, 3)))


def test_standardised_convolutions_are_exact_and_their_swaps_symmetries(aten_only):
    result = check_encoding(randomize(_StdConvNet()), X, swaps=10)
    assert result.status == EXACT, result.reason
    assert result.swaps > 0


def test_edges_hold_the_stored_weights_and_the_gains_sit_on_the_output_channels():
    model = randomize(_StdConvNet())
    graph = NetworkGraph(model, X, tracer="aten")
    data = graph.encode(model)
    column = graph.columns.column("scale", 0, "weight")
    for name in ("a", "g", "hand", "b"):
        conv = getattr(model, name)
        block = next(b for b in graph.blocks if b.key == f"{name}.weight")
        features = data[edge_attr_key(block.area)][block.start:block.start + block.rows]
        assert torch.equal(features, conv.weight.detach().reshape(block.rows, block.area))
        if hasattr(conv, "gain"):
            gains = data.x[block.dst.reshape(-1), column]
            assert torch.equal(gains, conv.gain.detach().reshape(-1))


def test_a_gain_that_does_not_follow_its_channel_is_wrong(aten_only, monkeypatch):
    add_channels = AtenWalker.add_channels

    def gain_follows_no_channel(walker, node, key, kind, *args, **kwargs):
        if kind == "scale":
            return walker.carry(node, key)
        return add_channels(walker, node, key, kind, *args, **kwargs)

    monkeypatch.setattr(AtenWalker, "add_channels", gain_follows_no_channel)
    assert check_encoding(randomize(_StdConvNet()), X, swaps=10).status == WRONG


class _ComputedWeight(nn.Module):
    """A convolution whose weight ``weight(self)`` computes in forward."""

    def __init__(self, weight) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.v = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.gain = nn.Parameter(torch.rand(4))
        self.weight = weight

    def forward(self, x):
        return F.conv2d(x, self.weight(self), padding=1).mean((2, 3))


def _standardised(w, gain=None, groups=None):
    rows = w.shape[0] if groups is None else groups
    return F.batch_norm(w.reshape(1, rows, -1), None, None, gain, training=True).reshape_as(w)


@pytest.mark.parametrize("weight, why", [
    # the whole tensor standardised at once: each filter's weights depend on the others'
    (lambda m: (m.w - m.w.mean()) / m.w.std(), r"the weight 'div' .* is neither a parameter"),
    (lambda m: m.w + m.v, r"the weight 'add' .* is neither a parameter"),
    # two filters standardised together
    (lambda m: _standardised(m.w, groups=2),
     r"shape \(1, 2, 54\), which is not a parameter reshaped to \[1, 4 filters, -1\]"),
    (lambda m: _standardised(m.w, m.gain * m.gain.detach().flip(0)),
     r"multiplied by 'mul'.*not a parameter of one entry per filter"),
    (lambda m: F.batch_norm(m.w.reshape(1, 4, -1), None, None, None, m.gain, training=True
                            ).reshape_as(m.w), r"and then shifted by 'p_gain'"),
    (lambda m: _standardised(m.w).reshape(3, 4, 3, 3).transpose(0, 1),
     r"the weight 'transpose' .* is neither a parameter"),
])
def test_other_computed_weights_are_refused_naming_the_node(weight, why):
    with pytest.raises(UnsupportedArchitectureError, match=r"aten node 'conv2d'.*" + why):
        NetworkGraph(_ComputedWeight(weight), X, tracer="aten")
