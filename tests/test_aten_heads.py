"""graph/aten_heads.py: attention whose input projection is laid out head by head (each head's
queries, keys and values one after another; values wider than queries and keys), with a
learned per-head table of biases gathered by position and added to the scores, as timm's
TinyViT, EfficientFormer and LeViT write it.

The oracles are the network's own: a network-level permutation of its tensors (two heads
swapped whole, with their bias rows; two channels swapped within a head) keeps its outputs,
and its encoding is the original graph relabelled by the matching node permutation (a graph
automorphism), edge by edge and node by node; moving one channel to another head, or the
heads without their bias rows, changes the function, and the former is no relabelling.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from torch import nn

from graph import NetworkGraph, UnsupportedArchitectureError, edge_attr_key
from graph.check import EXACT, check_encoding

X = torch.randn(2, 3, 32, 32)
WIDTH, HEADS, KEY, VALUE = 12, 2, 3, 6  # per head: 3 query, 3 key, 6 value channels
SIDE = 4                                # 4 x 4 tokens
PER_HEAD = 2 * KEY + VALUE


def _offsets() -> torch.Tensor:
    """Token pair -> index of its (|dy|, |dx|) offset, as timm's attention_bias_idxs."""
    pos = torch.stack(torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")).flatten(1)
    rel = (pos[:, :, None] - pos[:, None, :]).abs()
    return rel[0] * SIDE + rel[1]


class HeadAttention(nn.Module):
    """One Linear laid out head by head, a per-head bias table; ``spelling`` picks timm's
    variant: EfficientFormer (permute, then split; ``q @ k^T``), TinyViT (split, then permute;
    ``scaled_dot_product_attention`` with the table as mask), LeViT (split, keys permuted
    straight to ``[B, H, d, N]``)."""

    def __init__(self, spelling: str, order: tuple[int, ...] = (0, 1, 2)) -> None:
        super().__init__()
        self.spelling, self.order = spelling, order
        self.qkv, self.proj = nn.Linear(WIDTH, HEADS * PER_HEAD), nn.Linear(HEADS * VALUE, WIDTH)
        self.attention_biases = nn.Parameter(torch.zeros(HEADS, SIDE * SIDE))
        self.register_buffer("attention_bias_idxs", _offsets(), persistent=False)

    def bias(self) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        sizes = [(KEY, KEY, VALUE)[i] for i in self.order]
        if self.spelling == "efficientformer":
            parts = self.qkv(x).reshape(B, N, HEADS, -1).permute(0, 2, 1, 3).split(sizes, dim=3)
            q, k, v = (parts[self.order.index(i)] for i in range(3))
            attn = (q @ k.transpose(-2, -1)) * KEY ** -0.5 + self.bias()
            x = attn.softmax(dim=-1) @ v
        else:
            parts = self.qkv(x).view(B, N, HEADS, -1).split(sizes, dim=3)
            q, k, v = (parts[self.order.index(i)] for i in range(3))
            q, v = q.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            if self.spelling == "tinyvit":
                x = F.scaled_dot_product_attention(q, k.permute(0, 2, 1, 3), v, attn_mask=self.bias())
            else:
                attn = q @ k.permute(0, 2, 3, 1) * KEY ** -0.5 + self.bias()
                x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, HEADS * VALUE))


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, WIDTH, 8, 8)
        self.norm, self.attn = nn.LayerNorm(WIDTH), attention
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


SPELLINGS = ("efficientformer", "tinyvit", "levit")


def _model(spelling: str, **kwargs) -> Block:
    torch.manual_seed(0)  # the same weights for every spelling
    model = randomize(Block(HeadAttention(spelling, **kwargs))).eval()
    with torch.no_grad():  # zero-initialised in timm: random, so that a misplaced row shows
        model.attn.attention_biases.normal_(generator=torch.Generator().manual_seed(1))
    return model


def _heads(graph: NetworkGraph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query/key nodes [heads, KEY], value nodes [heads, VALUE] and head nodes [heads]."""
    blocks = [b for b in graph.blocks if b.key == "attn.qkv.weight"]
    qk = torch.stack([b.dst[0] for b in blocks if b.area == 2])
    v = torch.stack([b.dst[0] for b in blocks if b.area == 1])
    member = next(b for b in graph.blocks if b.area == 0 and b.key is None
                  and torch.equal(b.dst, qk))
    return qk, v, member.src[:, 0]


def _relabelled(graph: NetworkGraph, data, perm: torch.Tensor) -> dict | None:
    """The node features and per-area edge features of ``data`` with node n relabelled
    ``perm[n]``; None unless the relabelled edges are the graph's edges (an automorphism)."""
    x = torch.empty_like(data.x)
    x[perm] = data.x
    out = {"x": x}
    for area in graph.edge_types:
        edges = data.edge_index[:, data.edge_type == area].t().tolist()
        where = {(s, d): i for i, (s, d) in enumerate(edges)}
        assert len(where) == len(edges)  # no parallel edges of one type
        features, moved = data[edge_attr_key(area)], torch.empty_like(data[edge_attr_key(area)])
        for i, (s, d) in enumerate(edges):
            j = where.get((int(perm[s]), int(perm[d])))
            if j is None:
                return None
            moved[j] = features[i]
        out[edge_attr_key(area)] = moved
    return out


def _assert_encodes_as(graph: NetworkGraph, state: dict, expected: dict) -> None:
    data = graph.encode(state)
    for name, tensor in expected.items():
        assert torch.equal(data[name], tensor), name


def _swap_rows(tensor: torch.Tensor, a: list[int], b: list[int], dim: int = 0) -> torch.Tensor:
    out = tensor.clone()
    out.index_copy_(dim, torch.tensor(a + b), tensor.index_select(dim, torch.tensor(b + a)))
    return out


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_head_by_head_attention_encodes_exactly(spelling):
    model = _model(spelling)
    verdict = check_encoding(model, X, swaps=12)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict
    graph = NetworkGraph(model, X, tracer="aten")
    state = model.state_dict()
    decoded = graph.decode(graph.encode(state))
    assert set(decoded) == set(state) - {"attn.attention_bias_idxs"}
    assert all(torch.equal(decoded[k], state[k]) for k in decoded)  # bit for bit
    qk, v, heads = _heads(graph)
    assert qk.shape == (HEADS, KEY) and v.shape == (HEADS, VALUE)
    # the bias table travels with the head nodes, its dim 0 holding them
    (key, nodes, dim), = graph.passengers
    assert key == "attn.attention_biases" and dim == 0 and torch.equal(nodes, heads)


def test_the_spellings_give_one_graph():
    graphs = [NetworkGraph(_model(s), X, tracer="aten") for s in SPELLINGS]
    datas = [g.encode(_model(s)) for g, s in zip(graphs, SPELLINGS)]
    for g, d in zip(graphs[1:], datas[1:]):
        assert g.layout == graphs[0].layout
        for name in ["x", "edge_index", "edge_type", "passengers",
                     *(edge_attr_key(a) for a in g.edge_types)]:
            assert torch.equal(d[name], datas[0][name]), name


@pytest.mark.parametrize("spelling", ["efficientformer", "tinyvit"])
def test_swapping_heads_with_their_tables_is_a_symmetry_and_an_automorphism(spelling):
    model = _model(spelling)
    graph = NetworkGraph(model, X, tracer="aten")
    state, expected = model.state_dict(), model(X)
    data = graph.encode(state)
    qk, v, heads = _heads(graph)

    def function(weights):
        return torch.func.functional_call(model, weights, (X,))

    rows = [list(range(h * PER_HEAD, (h + 1) * PER_HEAD)) for h in range(HEADS)]
    columns = [list(range(h * VALUE, (h + 1) * VALUE)) for h in range(HEADS)]
    swapped = dict(state)
    for key in ("attn.qkv.weight", "attn.qkv.bias"):
        swapped[key] = _swap_rows(state[key], rows[0], rows[1])
    swapped["attn.proj.weight"] = _swap_rows(state["attn.proj.weight"], columns[0], columns[1], 1)
    untabled = dict(swapped)
    swapped["attn.attention_biases"] = _swap_rows(state["attn.attention_biases"], [0], [1])
    torch.testing.assert_close(function(swapped), expected)
    assert not torch.allclose(function(untabled), expected, atol=1e-4)  # the table must move too
    perm = torch.arange(graph.num_nodes)
    for a, b in ((qk[0], qk[1]), (v[0], v[1]), (heads[:1], heads[1:])):
        perm[a], perm[b] = b, a
    moved = _relabelled(graph, data, perm)
    assert moved is not None
    _assert_encodes_as(graph, swapped, moved)
    assert torch.equal(graph.encode(swapped).passengers, swapped["attn.attention_biases"].reshape(-1))


def test_channels_move_within_a_head_but_not_to_another():
    model = _model("efficientformer")
    graph = NetworkGraph(model, X, tracer="aten")
    state, expected = model.state_dict(), model(X)
    data = graph.encode(state)
    qk, v, _ = _heads(graph)

    def function(weights):
        return torch.func.functional_call(model, weights, (X,))

    # query and key channels 0 and 2 of head 1 (rows alike); value channels 1 and 4 of head 0
    within = dict(state)
    for key in ("attn.qkv.weight", "attn.qkv.bias"):
        h = PER_HEAD
        within[key] = _swap_rows(state[key], [h, h + KEY, 2 * KEY + 1],
                                 [h + 2, h + KEY + 2, 2 * KEY + 4])
    within["attn.proj.weight"] = _swap_rows(state["attn.proj.weight"], [1], [4], 1)
    torch.testing.assert_close(function(within), expected)
    perm = torch.arange(graph.num_nodes)
    for a, b in ((qk[1, 0], qk[1, 2]), (v[0, 1], v[0, 4])):
        perm[a], perm[b] = b, a
    moved = _relabelled(graph, data, perm)
    assert moved is not None
    _assert_encodes_as(graph, within, moved)
    # query and key channel 0 of head 0 traded with those of head 1: another function, and
    # no relabelling (the membership edges would change heads)
    across = dict(state)
    for key in ("attn.qkv.weight", "attn.qkv.bias"):
        across[key] = _swap_rows(state[key], [0, KEY], [PER_HEAD, PER_HEAD + KEY])
    assert not torch.allclose(function(across), expected, atol=1e-4)
    perm = torch.arange(graph.num_nodes)
    perm[qk[0, 0]], perm[qk[1, 0]] = qk[1, 0], qk[0, 0]
    assert _relabelled(graph, data, perm) is None


def test_decoding_passes_gradients_to_weights_and_tables():
    model = _model("tinyvit")
    graph = NetworkGraph(model, X, tracer="aten")
    data = graph.encode(model)
    leaves = {"x": data.x, "passengers": data.passengers,
              **{edge_attr_key(a): data[edge_attr_key(a)] for a in graph.edge_types if a}}
    for tensor in leaves.values():
        tensor.requires_grad_(True)
    torch.func.functional_call(model, graph.decode(data), (X,)).square().sum().backward()
    for name, tensor in leaves.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


def test_interleaved_layouts_are_refused():
    # per head: queries, values, keys: neither block by block nor head by head
    with pytest.raises(UnsupportedArchitectureError, match="laid out neither block by block"):
        NetworkGraph(_model("efficientformer", order=(0, 2, 1)), X, tracer="aten")


class GatheredAcrossHeads(HeadAttention):
    """A table gathered along its head dim (``table[perm][:, idx]``): a fixed reordering of
    heads that no head permutation of the graph follows."""

    def bias(self) -> torch.Tensor:
        return self.attention_biases[torch.tensor([1, 0])][:, self.attention_bias_idxs]


def test_a_table_gathered_along_the_heads_is_refused():
    model = randomize(Block(GatheredAcrossHeads("efficientformer"))).eval()
    with pytest.raises(UnsupportedArchitectureError, match="added to attention scores"):
        NetworkGraph(model, X, tracer="aten")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientformer_l1", "tiny_vit_5m_224"])
def test_timm_head_by_head_attention_encodes_exactly(name):
    """At the models' own 224 x 224 (the tables are sized for it). timm caches the gathered
    table in eval mode, which would hide the table from the check's swaps: gathered anew."""
    model = timm.create_model(name, num_classes=10).eval()
    for module in model.modules():
        if hasattr(module, "attention_bias_cache"):
            nn.init.normal_(module.attention_biases)
            module.get_attention_biases = (
                lambda device, m=module: m.attention_biases[:, m.attention_bias_idxs])
    verdict = check_encoding(model, torch.randn(1, 3, 224, 224), swaps=16)
    assert verdict.status == EXACT and verdict.swaps > 0, verdict
