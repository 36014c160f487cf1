"""graph/aten_position.py: attention with position terms added to its scores, and
self-attention over conv feature maps, in the ATen walk.

Small modules written out as timm's Swin (a per-head relative position bias gathered from a
table, a shifted-window mask, ``roll``, window partition and patch merging) and BotNet
(heads cut from the channels of a [B, C, H, W] map and folded into the batch, relative
position logits from tables shared by the heads) write them. The oracles: a bit-exact round
trip, the decoded network's outputs, gradients through ``decode``, swaps the graph allows
that keep the network's function (``graph.check``), the same swaps with the position tables
left in place changing it, and what must be refused.
"""
import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from torch import nn

from graph import NetworkGraph, UnsupportedArchitectureError, check
from graph.check import EXACT, WRONG, check_encoding

WIDTH, HEADS, WINDOW = 8, 2, 2  # 2 heads of 4 channels, 2 x 2 windows


def _relative_index(size: int) -> torch.Tensor:
    """Entry (i, j) of a size x size window: which of the (2 size - 1)^2 offsets j - i is."""
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
    offset = (coords[:, None, :] - coords[:, :, None]).permute(1, 2, 0) + size - 1
    return offset[..., 0] * (2 * size - 1) + offset[..., 1]


class WindowAttention(nn.Module):
    """Self-attention within each window plus a per-head bias table gathered by the tokens'
    offset (timm's Swin spelling), and a mask the same for every head."""

    def __init__(self, masked: bool, heads_gathered: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.table = nn.Parameter(torch.randn((2 * WINDOW - 1) ** 2, HEADS))
        self.register_buffer("index", _relative_index(WINDOW), persistent=False)
        n = WINDOW * WINDOW
        mask = torch.zeros(4, n, n)
        mask[1:, 0, 1:] = -100.0  # windows 1..3 hide tokens 1.. from token 0
        self.register_buffer("mask", mask if masked else None, persistent=False)
        self.heads_gathered = heads_gathered

    def bias(self) -> torch.Tensor:
        n = WINDOW * WINDOW
        if self.heads_gathered:  # the head dim gathered: head h reads another head's column
            return self.table.t()[torch.tensor([1, 0])][:, self.index.view(-1)].view(1, HEADS, n, n)
        return self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * 0.5) @ k.transpose(-2, -1) + self.bias()
        if self.mask is not None:
            windows = self.mask.shape[0]
            attn = attn.view(-1, windows, HEADS, N, N) + self.mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, HEADS, N, N)
        x = attn.softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwinLike(nn.Module):
    """Patch embedding, a shifted-window block (roll, window partition and reverse), patch
    merging (2 x 2 neighbours' channels concatenated, LayerNorm, Linear), a classifier."""

    def __init__(self, heads_gathered: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, WIDTH, 4, 4)
        self.norm = nn.LayerNorm(WIDTH)
        self.attn = WindowAttention(masked=True, heads_gathered=heads_gathered)
        self.merge_norm = nn.LayerNorm(4 * WIDTH)
        self.reduction = nn.Linear(4 * WIDTH, 2 * WIDTH, bias=False)
        self.head = nn.Linear(2 * WIDTH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)  # [B, 4, 4, C]
        B, H, W, C = x.shape
        shifted = torch.roll(self.norm(x), shifts=(-1, -1), dims=(1, 2))
        windows = shifted.view(B, H // WINDOW, WINDOW, W // WINDOW, WINDOW, C).permute(0, 1, 3, 2, 4, 5)
        windows = self.attn(windows.reshape(-1, WINDOW * WINDOW, C))
        windows = windows.view(B, H // WINDOW, W // WINDOW, WINDOW, WINDOW, C).permute(0, 1, 3, 2, 4, 5)
        x = x + torch.roll(windows.reshape(B, H, W, C), shifts=(1, 1), dims=(1, 2))
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.reduction(self.merge_norm(x))
        return self.head(x.mean((1, 2)))


def _skew(logits: torch.Tensor, size: int) -> torch.Tensor:
    """[n, size, 2 size - 1] logits by offset -> [n, size, size] by key position (pad, shift
    each row by one through a flat view, crop)."""
    flat = F.pad(F.pad(logits, [0, 1]).flatten(1), [0, size - 1])
    return flat.reshape(-1, size + 1, 2 * size - 1)[:, :size, size - 1:]


class ConvAttention(nn.Module):
    """Self-attention over a [B, C, H, W] map, written as timm's BottleneckAttn: one 1x1 conv
    makes q, k, v, whose heads are folded into the batch; relative position logits from
    per-offset vectors (one table per axis, shared by the heads) are added to the scores."""

    def __init__(self, size: int, mixing: bool = False) -> None:
        super().__init__()
        self.size, self.mixing = size, mixing
        self.qkv = nn.Conv2d(WIDTH, 3 * WIDTH, 1, bias=False)
        self.height = nn.Parameter(torch.randn(2 * size - 1, WIDTH // HEADS))
        self.width = nn.Parameter(torch.randn(2 * size - 1, WIDTH // HEADS))

    def rel(self, q: torch.Tensor, table: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
        n, s, _, d = q.shape
        logits = _skew((q @ table.transpose(-1, -2)).reshape(-1, s, 2 * s - 1), s)
        logits = logits.reshape(n, s, 1, s, s).expand(-1, -1, s, -1, -1)
        if self.mixing:  # mixes the (sample, head) pairs with the positions: no attention term
            logits = logits.transpose(0, 1)
        return logits.permute(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = torch.split(self.qkv(x), [WIDTH, WIDTH, WIDTH], dim=1)
        q = q.reshape(B * HEADS, -1, H * W).transpose(-1, -2)
        k = k.reshape(B * HEADS, -1, H * W)
        v = v.reshape(B * HEADS, -1, H * W).transpose(-1, -2)
        grid = q.reshape(B * HEADS, H, W, -1)
        logits = (self.rel(grid, self.width, (0, 1, 3, 2, 4))
                  + self.rel(grid.transpose(1, 2), self.height, (0, 3, 1, 4, 2)))
        attn = (q @ k) * 0.5 + logits.reshape(B * HEADS, H * W, H * W)
        out = (attn.softmax(-1) @ v).transpose(-1, -2).reshape(B, WIDTH, H, W)
        return out


class BotLike(nn.Module):
    def __init__(self, mixing: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 3, padding=1)
        self.attn = ConvAttention(4, mixing)
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.attn(self.stem(x))).mean((2, 3)))


X_SWIN, X_BOT = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4)


def _model(cls, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize(cls(**kwargs)).eval()


@pytest.mark.parametrize("cls, x", [(SwinLike, X_SWIN), (BotLike, X_BOT)])
def test_exact_with_swaps(cls, x):
    result = check_encoding(_model(cls), x, swaps=6)
    assert result.status == EXACT, result.reason
    assert result.swaps > 0


@pytest.mark.parametrize("cls, x", [(SwinLike, X_SWIN), (BotLike, X_BOT)])
def test_round_trip_and_gradient(cls, x):
    model = _model(cls)
    graph = NetworkGraph.from_module(model, x)
    state = model.state_dict()
    data = graph.encode(model)
    decoded = graph.decode(data)
    assert all(torch.equal(decoded[k], state[k]) for k in state if state[k].is_floating_point())
    torch.testing.assert_close(torch.func.functional_call(model, decoded, (x,)), model(x))
    data.x.requires_grad_(True)
    for name in [k for k in data.keys() if k.startswith("edge_attr_")]:
        data[name].requires_grad_(True)
    torch.func.functional_call(model, graph.decode(data), (x,)).square().sum().backward()
    assert data.x.grad is not None and data.x.grad.abs().sum() > 0
    assert data.edge_attr_1.grad is not None and data.edge_attr_1.grad.abs().sum() > 0


def _passenger(graph: NetworkGraph, suffix: str):
    return next((nodes, dim) for key, nodes, dim in graph.passengers if key.endswith(suffix))


def _swap_keeps_function(model: nn.Module, x: torch.Tensor, u: int, v: int, suffixes):
    """Swap graph nodes ``u`` and ``v`` (with what must move along): is it an automorphism,
    does it keep the function, and does it still with the tables ``suffixes`` left as they
    were?"""
    graph = NetworkGraph.from_module(model, x)
    data = graph.encode(model)
    moved = check.swapped(graph, data, u, v)
    assert moved is not None  # the swap maps the graph onto itself
    expected = model(x)
    same = torch.allclose(torch.func.functional_call(model, graph.decode(moved), (x,)), expected,
                          atol=1e-5)
    decoded = graph.decode(moved)
    for key in [k for k in decoded if k.endswith(suffixes)]:
        decoded[key] = model.state_dict()[key]
    kept = torch.allclose(torch.func.functional_call(model, decoded, (x,)), expected, atol=1e-5)
    return same, kept


def test_head_swap_moves_the_bias_table():
    """Swapping the two heads' nodes keeps the network; leaving the bias table's columns in
    place does not: the table is a passenger of the head nodes."""
    model = _model(SwinLike)
    graph = NetworkGraph.from_module(model, X_SWIN)
    heads, dim = _passenger(graph, "attn.table")
    assert dim == 1 and len(heads) == HEADS
    same, kept = _swap_keeps_function(model, X_SWIN, int(heads[0]), int(heads[1]), ("attn.table",))
    assert same and not kept


def test_channel_swap_moves_every_head_and_the_tables():
    """Swapping query/key channels 0 and 1 of one head: the index nodes make the swap move
    channels 0 and 1 of every head and the tables' entries; with the tables left in place
    the function changes."""
    model = _model(BotLike)
    graph = NetworkGraph.from_module(model, X_BOT)
    index, dim = _passenger(graph, "attn.width")
    assert dim == 1 and len(index) == WIDTH // HEADS
    same, kept = _swap_keeps_function(model, X_BOT, int(index[0]), int(index[1]),
                                      ("attn.width", "attn.height"))
    assert same and not kept


def test_a_swap_in_one_head_alone_is_no_symmetry(monkeypatch):
    """Without the index nodes' membership edges the graph would let one head's channels
    permute alone: the check then finds a swap that maps the graph onto itself and changes
    the function."""
    import graph.aten_position_logits as position

    class Untied(BotLike):  # a type of its own: NetworkGraph.from_module caches per type
        pass

    monkeypatch.setattr(position, "index_nodes",
                        lambda walker, members: walker.new_nodes(members.shape[1]))
    result = check_encoding(_model(Untied), X_BOT, swaps=24)
    assert result.status == WRONG, result


def test_refusals():
    with pytest.raises(UnsupportedArchitectureError, match="mixes the head"):
        NetworkGraph(_model(SwinLike, heads_gathered=True), X_SWIN, tracer="aten")
    with pytest.raises(UnsupportedArchitectureError, match="reaches across"):
        NetworkGraph(_model(BotLike, mixing=True), X_BOT, tracer="aten")


class _TimmBottleneck(nn.Module):
    """timm's own BottleneckAttn over a conv stem (the layer of botnet26t and sebotnet33ts)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers.bottleneck_attn import BottleneckAttn

        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = BottleneckAttn(16, feat_size=(4, 4), num_heads=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.stem(x)).mean((2, 3)))


def _timm_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                           num_heads=(2, 4), num_classes=5)


@pytest.mark.slow
@pytest.mark.parametrize("make, x", [(_timm_swin, torch.randn(2, 3, 32, 32)),
                                     (_TimmBottleneck, torch.randn(2, 3, 4, 4))])
def test_timm_layers_exact(make, x):
    """timm's Swin (shifted windows, bias tables, patch merging) and BottleneckAttn, small."""
    torch.manual_seed(0)
    result = check_encoding(randomize(make()).eval(), x, swaps=8)
    assert result.status == EXACT and result.swaps > 0, result.reason
