"""graph/aten_ops.py: the ATen operations of timm's poolformer, fastvit, HRNet, GhostNetV2,
LeViT, ResMLP and ViT class tokens (issue 29), each in a small network walked through
torch.export. The oracle is ``graph.check``: a bit-exact round trip and node swaps that the
graph allows must keep the network's function; a wrongly tied encoding of the same operation
(monkeypatched below) fails it."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from torch import nn

from graph import NetworkGraph, UnsupportedArchitectureError, aten_ops
from graph.aten_walk import trace_aten
from graph.check import EXACT, WRONG, check_encoding
from graph.network_graph import TRACERS
from graph.walker import Walker
from graph.walker_core import Value

aten = torch.ops.aten
X = torch.randn(2, 3, 16, 16)


@pytest.fixture
def aten_only(monkeypatch):
    """``check_encoding`` walks with the default tracer: make it the ATen walk (fx encodes
    some of these networks itself), with no graph cached from before or for after."""
    NetworkGraph.clear_cache()
    monkeypatch.setitem(TRACERS, "auto", trace_aten)
    yield
    NetworkGraph.clear_cache()


def _exact(model: nn.Module) -> str:
    return check_encoding(randomize(model), X, swaps=10).status


def _untied(walker, node, args):
    """A wrong encoding of any operation: its result as new channels tied to nothing."""
    value = args[0][1]
    return Value(walker.new_nodes(len(value.nodes)), False, 1, value.axis)


class _Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean((2, 3)))


class _Differences(_Stem):
    """poolformer's token mixer ``pool(x) - x``, fastvit's ``mixer(x) - norm(x)`` (a fresh
    conv output minus an older tensor), a number and a per-channel parameter subtracted."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        x = x + (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x)
        x = x + (self.conv(x) - self.bn(x))
        return self.pooled(1.0 - (x - self.shift))


def test_differences_are_exact_and_an_untied_difference_is_caught(aten_only, monkeypatch):
    assert _exact(_Differences()) == EXACT
    graph = NetworkGraph(_Differences(), X, tracer="aten")
    assert [key for key, *_ in graph.passengers] == ["shift"]
    # pool(x) - x keeps x's channels; conv(x) - bn(x): new channels fed by the conv's (+1)
    # and the normalized x's (-1), then x plus that difference: new channels fed by both (+1)
    assert graph.num_identity_edges == 32
    taps = torch.cat(list(graph._identity.values()))[:, 0]
    assert sorted(taps.tolist()) == [-1.0] * 8 + [1.0] * 24
    NetworkGraph.clear_cache()
    subtract = aten_ops._HANDLERS[aten.sub]
    monkeypatch.setitem(aten_ops._HANDLERS, aten.sub, lambda walker, node, args: (
        _untied if len(args) == 2 else subtract)(walker, node, args))
    assert check_encoding(randomize(_Differences()), X, swaps=10).status == WRONG


class _ScaledDifference(_Stem):
    def forward(self, x):
        x = self.stem(x)
        return torch.sub(x, self.conv(x), alpha=2)


def test_a_scaled_difference_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match=r"aten node 'sub'.*alpha != 1"):
        NetworkGraph(_ScaledDifference(), X, tracer="aten")


class _Upsampled(_Stem):
    """HRNet's fusion: a coarser branch upsampled (nearest) and added; GhostNetV2's
    attention map upsampled (bilinear) as a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = x + F.interpolate(self.conv(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="nearest")
        gate = F.interpolate(torch.sigmoid(self.gate(F.avg_pool2d(x, 2))), size=x.shape[-2:],
                             mode="bilinear", align_corners=False)
        return self.pooled(x * gate)


def test_upsampling_keeps_the_channels_and_an_untied_one_is_caught(aten_only, monkeypatch):
    assert _exact(_Upsampled()) == EXACT
    NetworkGraph.clear_cache()
    monkeypatch.setitem(aten_ops._HANDLERS, aten.upsample_nearest2d, _untied)
    assert check_encoding(randomize(_Upsampled()), X, swaps=10).status == WRONG


class _UpsampledChannels(_Stem):
    def forward(self, x):  # the channels in dim 2: interpolation would resize them
        return F.interpolate(self.stem(x).transpose(1, 2), scale_factor=2.0)


def test_upsampling_the_channels_is_refused():
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"aten node 'upsample_nearest2d'.*channels are in dim 2"):
        NetworkGraph(_UpsampledChannels(), X, tracer="aten")


class _Tokens(nn.Module):
    """Patch embedding to tokens [B, N, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(x).flatten(2).transpose(1, 2)


class _NormedTokens(_Tokens):
    """LeViT's LinearNorm: a BatchNorm1d over the flattened tokens, ``reshape_as`` back."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.fc(self.tokens(x))
        y = self.bn(y.flatten(0, 1)).reshape_as(y)
        return self.head(y.mean(1))


class _MixedReshapeAs(_Tokens):
    def forward(self, x):
        t = self.tokens(x)  # [B, 16, 8] as [B, 8, 16]: channels mixed with tokens
        return t.reshape_as(t.transpose(1, 2))


def test_reshape_as_is_a_reshape_to_the_other_shape(aten_only):
    assert _exact(_NormedTokens()) == EXACT
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"aten node 'reshape_as'.*mixes the channel dimension"):
        NetworkGraph(_MixedReshapeAs(), X, tracer="aten")


class _Affine(_Tokens):
    """ResMLP's Affine, ``torch.addcmul(beta, alpha, x)``, with [1, 1, C] parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(1, 1, 8))
        self.beta = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        t = self.tokens(x)
        return self.head(self.fc(torch.addcmul(self.beta, self.alpha, t)).mean(1))


def test_addcmul_is_a_channel_scale_and_a_shift_that_follow_the_channels(aten_only, monkeypatch):
    assert _exact(_Affine()) == EXACT
    graph = NetworkGraph(_Affine(), X, tracer="aten")
    patch = next(b for b in graph.blocks if b.key == "patch.weight").dst.reshape(-1)
    assert graph.columns.slots("scale") == 1
    (key, nodes, dim), = graph.passengers
    assert key == "beta" and dim == 2 and torch.equal(nodes, patch)
    data = graph.encode(randomize(_Affine()))
    assert data.x.shape[1] == graph.node_dim

    def shift_follows_no_channel(walker, node, args):  # beta left out of the swaps
        arg, value = args[0]
        walker.carry(node, "beta")
        return walker.channel_scale(node, arg, value, node.args[1])

    NetworkGraph.clear_cache()
    monkeypatch.setitem(aten_ops._HANDLERS, aten.addcmul, shift_follows_no_channel)
    assert check_encoding(randomize(_Affine()), X, swaps=10).status == WRONG


class _ClassToken(_Tokens):
    """A ViT's class token expanded over the batch and concatenated with the patch tokens,
    then a positional embedding added."""

    def __init__(self, token_shape: tuple[int, ...] = (1, 1, 8)) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(token_shape))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, 8))

    def forward(self, x):
        t = self.tokens(x)
        t = torch.cat((self.cls_token.expand(t.shape[0], 1, 8), t), dim=1) + self.pos_embed
        return self.head(self.fc(t)[:, 0])


def test_an_expanded_class_token_is_a_passenger_of_the_channels(aten_only):
    assert _exact(_ClassToken()) == EXACT
    graph = NetworkGraph(_ClassToken(), X, tracer="aten")
    patch = next(b for b in graph.blocks if b.key == "patch.weight").dst.reshape(-1)
    assert {key for key, *_ in graph.passengers} == {"cls_token", "pos_embed"}
    assert all(torch.equal(nodes, patch) and dim == 2 for _, nodes, dim in graph.passengers)


def test_an_expand_that_makes_the_channel_dim_is_refused():
    """A token of one value for every channel: no slice per channel to travel with."""
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"aten node 'cat'.*cls_token' of shape \(1, 1, 1\) has no dim of "
                             "the 8 channels"):
        NetworkGraph(_ClassToken((1, 1, 1)), X, tracer="aten")


class _ChannelSelected(_Tokens):
    def forward(self, x):
        return self.tokens(x)[:, :, 0]


def test_selecting_one_channel_is_refused():
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"aten node 'select'.*selecting one index of dim 2"):
        NetworkGraph(_ChannelSelected(), X, tracer="aten")


class _TokenMixing(_Tokens):
    """MLP-Mixer's token MLP: Linears over the tokens of [B, C, N], then back to tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.mix1, self.mix2 = nn.Linear(16, 12), nn.Linear(12, 16)

    def forward(self, x):
        t = self.tokens(x)
        t = t + self.mix2(F.gelu(self.mix1(t.transpose(1, 2)))).transpose(1, 2)
        return self.head(self.fc(t).mean(1))


def test_a_token_mixing_linear_connects_no_channels(aten_only):
    assert _exact(_TokenMixing()) == EXACT
    graph = NetworkGraph(_TokenMixing(), X, tracer="aten")
    assert {key: dim for key, _, dim in graph.passengers} == {
        f"mix{i}.{name}": None for i in (1, 2) for name in ("weight", "bias")}
    assert {b.key for b in graph.blocks if b.key} == {"patch.weight", "fc.weight", "head.weight"}


class _ResponseNorm(_Tokens):
    """ConvNeXt V2's global response norm (channels last): each channel's spatial norm over
    the mean of all channels' norms, then ``addcmul`` with viewed [C] parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        norms = x.norm(p=2, dim=(1, 2), keepdim=True)
        scaled = x * (norms / (norms.mean(dim=-1, keepdim=True) + 1e-6))
        x = x + torch.addcmul(self.beta.view(1, 1, 1, -1), self.gamma.view(1, 1, 1, -1), scaled)
        return self.head(self.fc(x).mean((1, 2)))


def test_a_mean_over_all_channels_divides_every_channel_alike(aten_only):
    assert _exact(_ResponseNorm()) == EXACT
    graph = NetworkGraph(_ResponseNorm(), X, tracer="aten")
    patch = next(b for b in graph.blocks if b.key == "patch.weight").dst.reshape(-1)
    (key, nodes, dim), = graph.passengers
    assert key == "beta" and dim == 0 and torch.equal(nodes, patch)


class _ByOneChannelsWeight(_Tokens):
    def forward(self, x):  # every channel divided alike, by what channel 0's weights give
        return self.tokens(x) / self.patch.weight[0].abs().sum()


class _MeanAdded(_Tokens):
    def forward(self, x):
        t = self.tokens(x)
        return t + t.mean(-1, keepdim=True)


class _SomeChannelsReduced(_Tokens):
    def forward(self, x):
        t = self.tokens(x).reshape(2, 16, 2, 4)
        return t / t.mean(-1, keepdim=True)


class _ShiftOfTwoRows(_Tokens):
    """A [2, 4] parameter viewed as 8 shifts: channel c's entry lies in neither dim alone."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        return self.tokens(x) + self.shift.view(1, 1, 8)


@pytest.mark.parametrize("net,node,why", [
    (_ByOneChannelsWeight, "div", "dividing by a tensor"),
    (_ShiftOfTwoRows, "add", "only a parameter as stored, or one entry per channel reshaped"),
    (_MeanAdded, "add", "only a parameter as stored"),
    (_SomeChannelsReduced, "mean", r"reduction over dims \[3\] touches batch or channels"),
])
def test_what_a_channel_reduction_or_a_parameter_may_single_out_is_refused(net, node, why):
    with pytest.raises(UnsupportedArchitectureError, match=rf"aten node '{node}'.*{why}"):
        NetworkGraph(net(), X, tracer="aten")


class _GlobalContext(_Stem):
    """GCNet's global context (timm's ``GlobalContext``): a one-channel map from a 1x1 conv,
    a softmax over the positions, each channel pooled with that map (a matrix product), then
    a gate and a context added at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Conv2d(8, 1, 1)
        self.scale, self.shift = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.bn(self.stem(x))
        B, C, H, W = x.shape
        attn = F.softmax(self.attn(x).reshape(B, 1, H * W), dim=-1).unsqueeze(3)
        context = (x.reshape(B, C, H * W).unsqueeze(1) @ attn).view(B, C, 1, 1)
        x = x * torch.sigmoid(self.scale(context))
        return self.pooled(self.conv(x + self.shift(context)))


def test_a_context_pooled_by_a_one_channel_map_keeps_the_channels(aten_only, monkeypatch):
    assert _exact(_GlobalContext()) == EXACT
    graph = NetworkGraph(_GlobalContext(), X, tracer="aten")
    stem = next(b for b in graph.blocks if b.key == "stem.weight").dst.reshape(-1)
    assert torch.equal(next(b for b in graph.blocks if b.key == "scale.weight").src.reshape(-1), stem)
    # a matrix product that also mixed the channels (here: reversed them) must be caught
    NetworkGraph.clear_cache()
    monkeypatch.setitem(aten_ops._HANDLERS, aten.matmul, lambda walker, node, args: Value(
        args[0][1].nodes.flip(0), False, 1, args[0][1].axis))
    assert _exact(_GlobalContext()) == WRONG


class _SoftmaxOverChannels(_Stem):
    def forward(self, x):
        return self.pooled(F.log_softmax(self.bn(self.stem(x)), dim=1))


class _GramMatrix(_Stem):
    def forward(self, x):  # [B, C, C]: every channel against every other
        t = self.stem(x).flatten(2)
        return (t @ t.transpose(1, 2)).mean((1, 2))


@pytest.mark.parametrize("net,node,why", [
    (_SoftmaxOverChannels, "log_softmax", "a softmax over dim 1, the batch or a channel dim"),
    (_GramMatrix, "matmul", "a matrix product that sums over channels"),
])
def test_a_softmax_or_product_over_the_channels_is_refused(net, node, why):
    with pytest.raises(UnsupportedArchitectureError, match=rf"aten node '{node}'.*{why}"):
        NetworkGraph(net(), X, tracer="aten")


class _SpatialGating(_Tokens):
    """gMLP's spatial gating unit: one Linear's output split into halves u and v; v
    normalized and mixed over the tokens, then u * v."""

    def __init__(self, halves=lambda h: h.chunk(2, dim=-1)) -> None:
        super().__init__()
        self.halves = halves
        self.fc1 = nn.Linear(8, 16)
        self.norm, self.proj = nn.LayerNorm(8), nn.Linear(16, 16)

    def forward(self, x):
        t = self.tokens(x)
        u, v = self.halves(F.gelu(self.fc1(t)))
        v = self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2)
        return self.head((t + self.fc(u * v)).mean(1))


def test_a_gate_of_two_halves_ties_them_and_an_untied_one_is_caught(aten_only, monkeypatch):
    assert _exact(_SpatialGating()) == EXACT
    graph = NetworkGraph(_SpatialGating(), X, tracer="aten")
    # one 2-feature edge per (input, gated channel): the u row and the v row of fc1
    fc1 = next(b for b in graph.blocks if b.key == "fc1.weight")
    assert fc1.area == 2 and fc1.shape == (1, 8, 8)
    assert torch.equal(next(b for b in graph.blocks if b.key == "fc.weight").src, fc1.dst)
    assert graph.columns.slots("bias") == 2  # fc1's bias of u and of v on one node
    NetworkGraph.clear_cache()
    monkeypatch.setattr(Walker, "gate", lambda self, node, args: replace(args[0][1], fresh=False))
    verdict = _exact(_SpatialGating())
    assert verdict == WRONG


@pytest.mark.parametrize("halves,why", [
    (lambda h: (h[..., :8], h[..., 4:12]), "channels overlap in part"),
    (lambda h: (h[..., ::2], h[..., 1::2]), "'fc1.weight' holds channels of both tensors "
                                            "multiplied, other than as its two halves"),
])
def test_a_gate_of_halves_one_layer_interleaves_or_overlaps_is_refused(halves, why):
    with pytest.raises(UnsupportedArchitectureError, match=rf"aten node 'mul'.*{why}"):
        NetworkGraph(_SpatialGating(halves), X, tracer="aten")


class _TokenConv(_Tokens):
    """CoaT's convolutional position encoding: the class token sliced off, the image tokens
    through a depthwise conv plus themselves, the class token put back along the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        t = self.tokens(x)
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        cls, img = t[:, :1], t[:, 1:]
        feat = img.transpose(1, 2).reshape(t.shape[0], 8, 4, 4)
        img = (self.dw(feat) + feat).flatten(2).transpose(1, 2)
        return self.head(self.fc(torch.cat((cls, img), dim=1))[:, 0])


def test_tokens_of_different_channels_concatenated_are_joined_as_a_sum(aten_only, monkeypatch):
    assert _exact(_TokenConv()) == EXACT
    graph = NetworkGraph(_TokenConv(), X, tracer="aten")
    fc = next(b for b in graph.blocks if b.key == "fc.weight").src.reshape(-1)
    # two older tensors: new nodes fed by both (the depthwise conv's output and the tokens)
    identities = [b for b in graph.blocks if b.key is None]
    assert {int(n) for b in identities for n in b.dst.reshape(-1)} >= set(fc.tolist())
    NetworkGraph.clear_cache()
    cat = aten_ops._HANDLERS[aten.cat]
    monkeypatch.setitem(aten_ops._HANDLERS, aten.cat, lambda walker, node, args: (
        _untied if len(args) == 2 else cat)(walker, node, args))
    assert _exact(_TokenConv()) == WRONG
