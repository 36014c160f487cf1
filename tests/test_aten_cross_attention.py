"""graph/aten_cross_attention.py: attention whose queries, keys and values come from different
Linears (PVT-v2's spatial reduction, CrossViT's and CaiT's class attention), talking heads
(CaiT; EfficientFormerV2's, 1x1 convolutions across the heads of the scores), a class token
that rejoins the channels and a stack of branch outputs.

The oracles: separate q, k, v Linears of one input give, bit for bit, the graph of the same
network with one fused qkv Linear (test_aten_attention checks that one against
nn.MultiheadAttention); ``graph.check.check_encoding`` (bit-exact round trip, same outputs,
node swaps that map the graph onto itself keep the function); swaps checked by hand against
the network's weights; and variants that must be refused.
"""
import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from torch import nn

from graph import NetworkGraph, UnsupportedArchitectureError, check, edge_attr_key
from graph.check import EXACT, check_encoding

X = torch.randn(2, 3, 16, 16)
WIDTH, HEADS = 16, 2  # 2 heads of 8 channels; 16 tokens of a 4 x 4 patch grid


def _heads(t: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    B, H, N, D = t.shape
    return t.transpose(1, 2).reshape(B, N, H * D)


class FusedAttention(nn.Module):
    """One qkv Linear (timm's Attention): the reference graph."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class SeparateAttention(nn.Module):
    """Queries, keys and values of three Linears of one input (CrossViT's ``wq, wk, wv``)."""

    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(f(x), self.heads) for f in (self.q, self.k, self.v))
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class ClassAttention(SeparateAttention):
    """Queries from the first token only (CaiT's class attention, CrossViT's fusion), written
    out: scale, ``q @ k^T``, softmax, ``@ v``; the result added to the first token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _heads(self.q(x[:, 0:1]))
        k, v = _heads(self.k(x)), _heads(self.v(x))
        attn = (q * (WIDTH // HEADS) ** -0.5 @ k.transpose(-2, -1)).softmax(-1)
        return self.proj(_merge(attn @ v))  # [B, 1, C]: added to every token


class SpatialReduction(nn.Module):
    """PVT-v2's attention: queries from the tokens, keys and values (one kv Linear) from the
    tokens reduced by a strided convolution and a LayerNorm."""

    def __init__(self, heads: int = HEADS, ratio: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 2 * WIDTH)
        self.sr = nn.Conv2d(WIDTH, WIDTH, ratio, ratio) if ratio > 1 else None
        self.norm = nn.LayerNorm(WIDTH) if ratio > 1 else None
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, -1).permute(0, 2, 1, 3)
        if self.sr is not None:
            x = x.permute(0, 2, 1).reshape(B, C, 4, 4)
            x = self.norm(self.sr(x).reshape(B, C, -1).permute(0, 2, 1))
        kv = self.kv(x).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class TalkingHeads(FusedAttention):
    """CaiT's talking heads: a Linear across the heads of the scores before and after the
    softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_l, self.proj_w = nn.Linear(HEADS, HEADS), nn.Linear(HEADS, HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        attn = q * (C // HEADS) ** -0.5 @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj(_merge(attn @ v))


class Block(nn.Module):
    """Patch embedding, a pre-norm attention block with its residual, mean pooling and a
    classifier."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, WIDTH, 4, 4)
        self.norm, self.attn = nn.LayerNorm(WIDTH), attention
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


def _exact(model: nn.Module) -> None:
    # variants of one type with the same tensors (one head or two) would share a cached graph
    NetworkGraph.clear_cache()
    verdict = check_encoding(randomize(model), X, swaps=8)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict


def _graph(model: nn.Module, layout: str = "heads") -> NetworkGraph:
    return NetworkGraph(model, X, tracer="aten", attention=layout)


def test_separate_projections_give_the_fused_graph_bit_for_bit():
    """Three Linears of one input: the query and key weights zipped across the two tensors,
    so the graph is the fused qkv Linear's; decoding gives the three tensors back."""
    model = randomize(Block(SeparateAttention())).eval()
    fused = Block(FusedAttention())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("attn.")}
    for field in ("weight", "bias"):
        state[f"attn.qkv.{field}"] = torch.cat([model.state_dict()[f"attn.{n}.{field}"] for n in "qkv"])
        state[f"attn.proj.{field}"] = model.state_dict()[f"attn.proj.{field}"]
    fused.load_state_dict(state)
    torch.testing.assert_close(fused.eval()(X), model(X))  # the same function
    ours, reference = _graph(model), _graph(fused)
    assert ours.layout == reference.layout and ours.num_nodes == reference.num_nodes
    a, f = ours.encode(model), reference.encode(fused)
    for name in ["x", "edge_index", "edge_type", *(edge_attr_key(t) for t in ours.edge_types)]:
        assert torch.equal(a[name], f[name]), name
    assert [b.key for b in ours.blocks if b.area == 2] == [("attn.q.weight", "attn.k.weight")]
    decoded = ours.decode(a)
    assert all(torch.equal(decoded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("attention", [ClassAttention, TalkingHeads])
def test_attention_of_several_linears_or_talking_heads_encodes_exactly(attention):
    """(Separate q, k, v Linears of one input: the fused graph, above.)"""
    _exact(Block(attention()))


@pytest.mark.parametrize("heads,ratio", [(2, 2), (1, 2)])
def test_spatial_reduction_encodes_exactly(heads, ratio):
    """Keys and values from the reduced tokens (query and key edges from different nodes), and
    a single head (a reshape drops its dim of size 1)."""
    model = Block(SpatialReduction(heads, ratio))
    _exact(model)
    graph = NetworkGraph.from_module(model, X)  # the graph the check built (cached)
    areas = {b.key: b.area for b in graph.blocks if b.key and "attn" in str(b.key)}
    assert areas["attn.q.weight"] == 1 and areas["attn.kv.weight"] == 1  # queries, keys apart


def test_decoded_weights_carry_gradients():
    model = randomize(Block(SpatialReduction())).eval()
    graph = _graph(model)
    data = graph.encode(model)
    data.edge_attr_1.requires_grad_(True)
    out = torch.func.functional_call(model, graph.decode(data), (X,))
    out.square().sum().backward()
    assert data.edge_attr_1.grad is not None and data.edge_attr_1.grad.abs().sum() > 0


def test_talking_heads_are_edges_between_head_nodes_and_permute_with_them():
    """proj_l's weight joins the query/key head nodes to new head nodes, proj_w's those to the
    values' head nodes; swapping two query/key heads moves proj_l's columns with them (the
    same function), while the heads' rows moved alone change it."""
    model = randomize(Block(TalkingHeads())).eval()
    graph = _graph(model)
    data, expected = graph.encode(model), model(X)
    blocks = {b.key: b for b in graph.blocks}
    proj_l, proj_w = blocks["attn.proj_l.weight"], blocks["attn.proj_w.weight"]
    members = [b for b in graph.blocks if b.area == 0]
    qk_heads = set(proj_l.src.reshape(-1).tolist())
    v_heads = set(proj_w.dst.reshape(-1).tolist())
    assert qk_heads.isdisjoint(v_heads) and len(qk_heads) == len(v_heads) == HEADS
    assert {frozenset(b.src.reshape(-1).tolist()) for b in members} == {
        frozenset(qk_heads), frozenset(v_heads)}
    qk = next(b for b in graph.blocks if b.key == "attn.qkv.weight" and b.area == 2).dst.reshape(-1)
    swapped = check.swapped(graph, data, int(qk[1]), int(qk[9]))  # heads 0 and 1 of the queries/keys
    assert swapped is not None
    assert not torch.equal(swapped[edge_attr_key(1)], data[edge_attr_key(1)])  # proj_l moved
    torch.testing.assert_close(torch.func.functional_call(model, graph.decode(swapped), (X,)), expected)
    for pair in (proj_l.dst.reshape(-1), proj_w.dst.reshape(-1)):  # the maps' heads, the values' heads
        moved = check.swapped(graph, data, int(pair[0]), int(pair[1]))
        assert moved is not None
        torch.testing.assert_close(torch.func.functional_call(model, graph.decode(moved), (X,)), expected)
    weights = dict(model.state_dict())
    qkv = weights["attn.qkv.weight"].clone()
    rows = torch.arange(2 * WIDTH).view(2, HEADS, -1)  # query and key rows, head by head
    qkv[rows.reshape(-1)] = qkv[rows.flip(1).reshape(-1)]  # heads swapped, proj_l left alone
    weights["attn.qkv.weight"] = qkv
    assert not torch.allclose(torch.func.functional_call(model, weights, (X,)), expected, atol=1e-4)


class ClassToken(nn.Module):
    """CaiT's class-attention stage: a class token concatenated with the patch tokens, then
    added to the class attention's output (its channels are the tokens' channels). ``add``:
    "fresh" (the attention's output, as CaiT), "same" (the tokens themselves: the channels the
    token follows already) or "older" (an output that something else reads too)."""

    def __init__(self, add: str = "fresh") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, WIDTH, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.norm, self.attn = nn.LayerNorm(WIDTH), ClassAttention()
        self.gamma = nn.Parameter(torch.ones(WIDTH))
        self.head = nn.Linear(WIDTH, 10)
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        out = self.attn(self.norm(torch.cat((cls, x), dim=1)))
        if self.add == "same":
            return self.head((cls + x[:, :1])[:, 0] + (self.gamma * out)[:, 0])
        if self.add == "older":
            return self.head((cls + self.gamma * out)[:, 0] + out.mean(1))
        return self.head((cls + self.gamma * out)[:, 0])


@pytest.mark.parametrize("add", ["fresh", "same"])
def test_a_class_token_that_rejoins_the_channels_encodes_exactly(add):
    _exact(ClassToken(add))


def test_a_class_token_meeting_older_other_channels_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="follows channels already"):
        _graph(randomize(ClassToken("older")))


class TwoHeads(nn.Module):
    """Two branches' classifiers averaged (CrossViT): ``mean(stack(logits), 0)``."""

    def __init__(self, read: str = "mean") -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 5)
        self.heads = nn.ModuleList([nn.Linear(8, 10), nn.Linear(4, 10)])
        self.read = read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.a(x).mean((2, 3)), self.b(x).mean((2, 3))]
        stacked = torch.stack([h(f) for h, f in zip(self.heads, feats)], dim=0)
        return stacked.mean(0) if self.read == "mean" else stacked[1]


def test_a_stack_averaged_over_its_new_dim_encodes_and_other_reads_are_refused():
    _exact(TwoHeads())
    with pytest.raises(UnsupportedArchitectureError, match="stack along a new dim before the batch"):
        _graph(TwoHeads("index"))


class KeysBeforeQueries(SeparateAttention):
    """Keys and queries from one Linear with the keys first: no zip of query then key rows."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(WIDTH, 2 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k, q = self.q(x).reshape(B, N, 2, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, _heads(self.v(x)))))


class OverlappingInputs(SeparateAttention):
    """Keys from a concatenation of the queries' input and other channels: inputs that share
    some channels only."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.extra = nn.Linear(2 * WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _heads(self.q(x))
        k, v = _heads(self.k(torch.cat([x, self.extra(x)], -1))), _heads(self.v(x))
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class PartRead(SeparateAttention):
    """Keys and values the first two thirds of a Linear whose last third nothing reads: no
    in-projection of this attention alone."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(WIDTH, 3 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k, v, _ = self.k(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(_merge(F.scaled_dot_product_attention(_heads(self.q(x)), k, v)))


@pytest.mark.parametrize("attention,match", [
    (KeysBeforeQueries, "keys not right after the queries"),
    (OverlappingInputs, "share only some channels"),
    (PartRead, "not the rows, in that order"),
])
def test_projections_the_record_cannot_express_are_refused(attention, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        _graph(randomize(Block(attention())))


class Factorised(FusedAttention):
    """CoaT's factorised attention: a softmax of the keys over the tokens, ``q @ (k^T v)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(_merge(q @ (k.softmax(dim=2).transpose(-1, -2) @ v)))


def test_a_softmax_of_the_keys_themselves_is_refused_with_the_operation_named():
    with pytest.raises(UnsupportedArchitectureError, match="softmax.*factorised attention"):
        _graph(Block(Factorised()))


def test_the_papers_layout_refuses_several_projections():
    with pytest.raises(UnsupportedArchitectureError, match="paper's attention layout"):
        _graph(Block(SeparateAttention()), layout="paper")


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("pvt_v2_b0", 64), ("cait_xxs24_224", 32), ("crossvit_tiny_240", 240)])
def test_timm_models_encode_exactly(name, size):
    import timm
    kwargs = {"img_size": size} if name != "pvt_v2_b0" else {}
    if name == "cait_xxs24_224":
        kwargs.update(depth=2, patch_size=8)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    verdict = check_encoding(randomize(model), torch.randn(1, 3, size, size), swaps=8)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict


class ScaledPair(nn.Module):
    """Two per-channel scales of one module (one layer by name, as timm's ``gamma_1`` and
    ``gamma_2``) on two channel sets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.ls1, self.ls2 = nn.Parameter(torch.ones(8)), nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2 * self.fc2(self.ls1 * self.fc1(x))


class LaterScale(nn.Module):
    """A later module's scale on the second set: it must take another slot than ``ls2``
    (ResMLP's ``ls2`` of one block and ``ls1`` of the next shared one before, which only
    equal initial values hid; CaiT's class token brings the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.pair, self.scale = ScaledPair(), nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale * self.pair(x))


def test_a_layer_writing_two_channel_sets_holds_its_slot_on_both():
    model = randomize(LaterScale()).eval()
    verdict = check_encoding(model, torch.randn(2, 8), swaps=8)
    assert verdict.status == EXACT, verdict
    graph = NetworkGraph(model, torch.randn(2, 8))
    columns = graph._node_index.tolist()
    assert len(columns) == len(set(columns))  # no two tensors share a node feature


class ConvTalkingHeads(nn.Module):
    """EfficientFormerV2's ``Attention2d`` on a [B, C, H, W] map: queries, keys and values from
    three 1x1 convolutions each followed by a BatchNorm (values twice as wide, and read also by
    a depthwise convolution added to the output), a per-head bias table added to the scores,
    and talking heads as 1x1 convolutions across the heads of the scores [B, heads, N, N]."""

    def __init__(self, kernel: int = 1, groups: int = 1) -> None:
        super().__init__()
        d, self.e = WIDTH // HEADS, 2 * WIDTH // HEADS

        def conv_bn(cin: int, cout: int, k: int = 1, g: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=g), nn.BatchNorm2d(cout))

        self.q, self.k, self.v = conv_bn(WIDTH, HEADS * d), conv_bn(WIDTH, HEADS * d), conv_bn(
            WIDTH, HEADS * self.e)
        self.v_local = conv_bn(HEADS * self.e, HEADS * self.e, 3, HEADS * self.e)
        self.talking_head1 = nn.Conv2d(HEADS, HEADS, kernel, padding=kernel // 2, groups=groups)
        self.talking_head2 = nn.Conv2d(HEADS, HEADS, 1)
        self.proj = conv_bn(HEADS * self.e, WIDTH)
        self.biases = nn.Parameter(torch.randn(HEADS, 16))
        self.register_buffer("idx", torch.randint(0, 16, (16, 16)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.q(x).reshape(B, HEADS, -1, H * W).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, HEADS, -1, H * W)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, HEADS, -1, H * W).permute(0, 1, 3, 2)
        attn = (q @ k) * (WIDTH // HEADS) ** -0.5 + self.biases[:, self.idx]
        attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
        x = (attn @ v).transpose(2, 3).reshape(B, HEADS * self.e, H, W) + v_local
        return self.proj(F.gelu(x))


class ConvBlock(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Conv2d(3, WIDTH, 4, 4), attention, nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head((x + self.attn(x)).mean((2, 3)))


def test_talking_heads_as_1x1_convolutions_with_convolved_projections_encode_exactly():
    _exact(ConvBlock(ConvTalkingHeads()))


@pytest.mark.parametrize("kernel,groups", [(3, 1), (1, 2)])
def test_a_convolution_of_the_scores_mixing_tokens_or_grouped_is_refused(kernel, groups):
    with pytest.raises(UnsupportedArchitectureError, match="convolution of attention scores"):
        _graph(randomize(ConvBlock(ConvTalkingHeads(kernel, groups))))


class ConvTalkingHeadsOfTokens(TalkingHeads):
    """CaiT's talking heads written as EfficientFormerV2 writes them: 1x1 convolutions of the
    scores [B, heads, N, N] (no permutes)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_l, self.proj_w = nn.Conv2d(HEADS, HEADS, 1), nn.Conv2d(HEADS, HEADS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        attn = q * (C // HEADS) ** -0.5 @ k.transpose(-2, -1)
        return self.proj(_merge(self.proj_w(self.proj_l(attn).softmax(-1)) @ v))


def test_a_1x1_convolution_across_the_heads_gives_the_linears_graph_bit_for_bit():
    model = randomize(Block(TalkingHeads())).eval()
    conv = Block(ConvTalkingHeadsOfTokens())
    conv.load_state_dict({k: v.view(HEADS, HEADS, 1, 1) if k.endswith(("proj_l.weight", "proj_w.weight"))
                          else v for k, v in model.state_dict().items()})
    torch.testing.assert_close(conv.eval()(X), model(X))  # the same function
    ours, reference = _graph(conv), _graph(model)
    a, f = ours.encode(conv), reference.encode(model)
    for name in ["x", "edge_index", "edge_type", *(edge_attr_key(t) for t in ours.edge_types)]:
        assert torch.equal(a[name], f[name]), name
    decoded = ours.decode(a)
    assert all(torch.equal(decoded[k], v) for k, v in conv.state_dict().items())
