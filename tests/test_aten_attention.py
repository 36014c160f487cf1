"""graph/aten_attention.py: self-attention written out in tensor operations (timm's
``Attention``) gets, through the ATen walk, the head nodes the fx walk gives
``nn.MultiheadAttention`` (issue 29).

The oracles: the graph equals, bit for bit, the fx graph of the same network with an
``nn.MultiheadAttention`` holding the same weights (its in-projection has the rows of the
``qkv`` Linear: queries, keys, values, head by head); swapping whole heads, or channels within
a head, maps the graph onto itself and keeps the network's function, while moving one channel
to another head is neither (``graph.check``).
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from torch import nn

from graph import NetworkGraph, UnsupportedArchitectureError, check, edge_attr_key
from graph.check import EXACT, check_encoding

X = torch.randn(2, 3, 32, 32)
WIDTH, HEADS = 16, 2  # 2 heads of 8 channels


class Attention(nn.Module):
    """timm's spelling: one qkv Linear, reshape to (3, heads, head size), permute, unbind,
    ``scaled_dot_product_attention``."""

    fused = True

    def __init__(self, qk_norm: bool = False) -> None:
        super().__init__()
        self.head_dim = WIDTH // HEADS
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q_norm(q)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = (q * self.head_dim ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ExplicitAttention(Attention):
    """The same, written out: scale, ``q @ k^T``, softmax, ``@ v`` (a type of its own, so that
    ``NetworkGraph.from_module``'s cache, per architecture, traces it anew)."""

    fused = False


class IndexedAttention(Attention):
    """Query, key and value as ``qkv[0], qkv[1], qkv[2]`` (timm's older spelling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


SPELLINGS = {"sdpa": Attention, "matmul": ExplicitAttention, "indexed": IndexedAttention}


class MultiheadAttention(nn.Module):
    """The same function as ``Attention`` through nn.MultiheadAttention (fx encodes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Patch embedding, a pre-norm transformer block (attention and MLP, residuals), mean
    pooling over the tokens and a classifier."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, WIDTH, 8, 8)
        self.norm1, self.attn = nn.LayerNorm(WIDTH), attention
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, WIDTH))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def _with_multihead_attention(model: Block) -> Block:
    """``model`` with its attention as an nn.MultiheadAttention holding the same weights."""
    twin = Block(MultiheadAttention())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("attn.")}
    for ours, theirs in (("qkv", "in_proj_"), ("proj", "out_proj.")):
        for field in ("weight", "bias"):
            state[f"attn.mha.{theirs}{field}"] = model.state_dict()[f"attn.{ours}.{field}"]
    twin.load_state_dict(state)
    return twin.eval()


@pytest.mark.parametrize("layout", ["heads", "paper"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_written_out_attention_gives_the_multihead_attention_graph(spelling, layout):
    model = randomize(Block(SPELLINGS[spelling]())).eval()
    twin = _with_multihead_attention(model)
    torch.testing.assert_close(twin(X), model(X))  # the same function
    aten = NetworkGraph(model, X, tracer="aten", attention=layout)
    fx = NetworkGraph(twin, X, tracer="fx", attention=layout)
    assert aten.num_nodes == fx.num_nodes and aten.layout == fx.layout
    a, f = aten.encode(model), fx.encode(twin)
    for name in ["x", "edge_index", "edge_type", *(edge_attr_key(t) for t in fx.edge_types)]:
        assert torch.equal(a[name], f[name]), name
    if layout == "heads":
        assert 0 in aten.edge_types  # head nodes; query and key weights zipped into one edge
        assert [b.area for b in aten.blocks if b.key == "attn.qkv.weight"] == [1, 2]  # values; queries+keys


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_written_out_attention_encodes_exactly(spelling):
    verdict = check_encoding(randomize(Block(SPELLINGS[spelling]())), X, swaps=24)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict


def test_heads_swap_whole_and_a_channel_cannot_move_to_another_head():
    model = randomize(Block(Attention())).eval()
    graph = NetworkGraph(model, X, tracer="aten")
    data, expected = graph.encode(model), model(X)
    qk = next(b for b in graph.blocks if b.key == "attn.qkv.weight" and b.area == 2).dst[0]
    assert len(qk) == WIDTH

    def function(permuted):
        return torch.func.functional_call(model, graph.decode(permuted), (X,))

    within = check.swapped(graph, data, int(qk[1]), int(qk[5]))  # head 0's channels 1 and 5
    assert within is not None
    torch.testing.assert_close(function(within), expected)
    across = check.swapped(graph, data, int(qk[1]), int(qk[9]))  # heads 0 and 1 swap whole
    assert across is not None
    moved = across.x.ne(data.x).any(1).nonzero().view(-1)
    assert set(moved.tolist()) >= set(qk.tolist())
    torch.testing.assert_close(function(across), expected)
    # channel 1 of head 0 and channel 1 of head 1 swapped alone: the membership edges would
    # change heads (no graph automorphism), and the network computes something else
    perm = torch.arange(graph.num_nodes)
    perm[qk[1]], perm[qk[9]] = qk[9], qk[1]
    members = next(b for b in graph.blocks
                   if b.area == 0 and set(b.dst.reshape(-1).tolist()) == set(qk.tolist()))
    assert check._permuted_block(members, data[edge_attr_key(0)], perm, graph.num_nodes) is None
    weights = dict(model.state_dict())
    qkv = weights["attn.qkv.weight"].clone()
    qkv[[1, 9, 17, 25]] = qkv[[9, 1, 25, 17]]  # query and key rows of the two channels
    weights["attn.qkv.weight"] = qkv
    assert not torch.allclose(torch.func.functional_call(model, weights, (X,)), expected, atol=1e-4)


def test_a_norm_over_each_heads_channels_is_refused_with_the_operation_named():
    with pytest.raises(UnsupportedArchitectureError, match="layer_norm.*qk_norm"):
        NetworkGraph(Block(Attention(qk_norm=True)), X, tracer="aten")


class SeparateProjections(nn.Module):
    """Queries from one Linear, keys and values from another (PVT-v2's spelling; more in
    tests/test_aten_cross_attention.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.proj = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.kv = nn.Linear(WIDTH, 2 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, HEADS, C // HEADS).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def test_queries_keys_and_values_of_different_linears_encode_exactly():
    verdict = check_encoding(randomize(Block(SeparateProjections())), X, swaps=24)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict


class QueriesReadTwice(Attention):
    """The queries also added to the attention's output: the query channels feed more than
    the attention, so the qkv Linear is no in-projection alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v) + q
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def test_queries_read_by_other_operations_are_refused():
    with pytest.raises(UnsupportedArchitectureError, match="other operations read too"):
        NetworkGraph(Block(QueriesReadTwice()), X, tracer="aten")


class TokenPooled(Block):
    """Pooling by taking the first token (``x[:, 0]``, as a ViT reads its class token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


def test_a_token_read_by_indexing_keeps_every_channel():
    model = randomize(TokenPooled(Attention())).eval()
    verdict = check_encoding(model, X, swaps=24)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict
    assert NetworkGraph(model, X, tracer="aten").num_nodes == NetworkGraph(model, X).num_nodes


def test_timm_vit_without_class_token_encodes_exactly():
    """timm's VisionTransformer (its Attention, LayerScale-free blocks, mean pooling); the
    class token's ``expand`` is another operation's business."""
    model = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                        img_size=32, patch_size=8, depth=2, class_token=False,
                                        global_pool="avg"))
    verdict = check_encoding(model, X[:1], swaps=24)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict
