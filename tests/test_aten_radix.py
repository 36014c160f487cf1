"""graph/aten_radix.py: split attention over a radix (ResNeSt's ``SplitAttn``, SKNet's
``SelectiveKernel``) and ECA's convolution along the channels, walked through torch.export.

Small hand-written networks reproduce each pattern (timm's own layers too, in tiny networks).
The oracles: ``graph.check.check_encoding`` (a bit-exact round trip, the decoded weights giving
the same outputs, node swaps that map the graph onto itself keeping the function); a channel
moved in every radix slice at once (a permutation no single swap reaches) maps the graph onto
itself and keeps the function, moved in one slice only it does not map the graph onto itself;
the softmax's groups or ECA's order edges left out (monkeypatched) give "wrong"; other
layouts are refused naming the operation.
"""
import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from timm.layers import EcaModule, SelectiveKernel, SplitAttn
from torch import nn

from graph import Metanetwork, NetworkGraph, UnsupportedArchitectureError, aten_ops, aten_radix
from graph.aten_walk import trace_aten
from graph.check import EXACT, WRONG, check_encoding, permuted
from graph.network_graph import TRACERS

X = torch.randn(2, 3, 12, 12)
R, C = 2, 8  # radix and channels per radix slice


class _Net(nn.Module):
    """A stem, the block under test, a classifier over the pooled channels."""

    def __init__(self, block: nn.Module, width: int = C) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = block
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class _SplitAttention(nn.Module):
    """ResNeSt's split attention written out: a grouped conv to R x C channels, their sum over
    the radix pooled into a gate MLP, a softmax over the radix (timm's ``RadixSoftmax``
    spelling, cardinality ``card``) weighting the radix slices, summed."""

    def __init__(self, card: int = 1) -> None:
        super().__init__()
        self.card = card
        self.conv = nn.Conv2d(C, R * C, 3, padding=1, groups=R * card)
        self.bn0 = nn.BatchNorm2d(R * C)
        self.fc1 = nn.Conv2d(C, 6 * card, 1, groups=card)
        self.bn1 = nn.BatchNorm2d(6 * card)
        self.fc2 = nn.Conv2d(6 * card, R * C, 1, groups=card)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(x)))
        B = x.shape[0]
        x = x.reshape(B, R, C, *x.shape[2:])
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        a = self.fc2(F.relu(self.bn1(self.fc1(gap))))
        a = F.softmax(a.view(B, self.card, R, -1).transpose(1, 2), dim=1).reshape(B, -1)
        return (x * a.view(B, R, C, 1, 1)).sum(dim=1)


class _SelectiveKernel(nn.Module):
    """SKNet's selective kernel written out: the input split between two paths of different
    dilation, stacked, a gate MLP of their pooled sum, a softmax over the paths."""

    def __init__(self) -> None:
        super().__init__()
        self.paths = nn.ModuleList(nn.Sequential(nn.Conv2d(C // 2, C, 3, padding=d, dilation=d),
                                                 nn.BatchNorm2d(C), nn.ReLU()) for d in (1, 2))
        self.reduce = nn.Conv2d(C, 4, 1)
        self.select = nn.Conv2d(4, R * C, 1)

    def forward(self, x):
        x = torch.stack([p(h) for p, h in zip(self.paths, x.split(C // 2, 1))], dim=1)
        a = self.select(F.relu(self.reduce(x.sum(1).mean((2, 3), keepdim=True))))
        return (x * torch.softmax(a.view(x.shape[0], R, C, 1, 1), dim=1)).sum(1)


class _Eca(nn.Module):
    """ECA written out: a sigmoid gate from a 1-d convolution along the pooled channels."""

    def __init__(self, out: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.eca = nn.Conv1d(1, out, 3, padding=1, bias=bias)

    def forward(self, x):
        x = self.bn(self.conv(x))
        y = torch.sigmoid(self.eca(x.mean((2, 3)).view(x.shape[0], 1, -1)))
        return x * y.view(x.shape[0], -1, 1, 1).expand_as(x)


class _RadixSoftmax(nn.Module):
    """A softmax over the radix whose output a conv reads as R x C channels, no sum over the
    radix: only the softmax's groups tie the radix entries of a channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Conv2d(C, R * C, 1)
        self.out = nn.Conv2d(R * C, C, 1)

    def forward(self, x):
        B, _, H, W = x.shape
        a = torch.softmax(self.fc(x).view(B, R, C, H, W), dim=1)
        return self.out(a.reshape(B, R * C, H, W))


class _All(nn.Module):
    """Every pattern in one network (one export for most tests): split attention of two
    groups, a selective kernel, a softmax over the radix alone, ECA."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
        self.split, self.sk = _SplitAttention(card=2), _SelectiveKernel()
        self.softmax, self.eca = _RadixSoftmax(), _Eca(bias=True)
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        x = self.sk(self.split(self.stem(x)))
        return self.head(self.eca(self.softmax(x)).mean((2, 3)))


class _Timm(nn.Module):
    """timm's own layers in a row: SplitAttn (radix 2, one group), SelectiveKernel, EcaModule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.split = SplitAttn(16, 16, radix=2, rd_channels=8, norm_layer=nn.BatchNorm2d)
        self.sk = SelectiveKernel(16, 16, rd_channels=8)
        self.eca = EcaModule(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.eca(self.sk(self.split(self.stem(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def aten_only():
    """``check_encoding`` walks with the default tracer: make it the ATen walk; graphs are
    cached (``NetworkGraph.from_module``) within this file only, one export per network."""
    NetworkGraph.clear_cache()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TRACERS, "auto", trace_aten)
        yield
    NetworkGraph.clear_cache()


@pytest.fixture(scope="module")
def every_pattern(aten_only):
    model = randomize(_All()).eval()
    return model, NetworkGraph.from_module(model, X)


@pytest.fixture(scope="module")
def timm_layers(aten_only):
    model = randomize(_Timm()).eval()
    return model, NetworkGraph.from_module(model, X)


@pytest.mark.parametrize("network", ["every_pattern", "timm_layers"])
def test_the_patterns_are_exact(network, request):
    model, _ = request.getfixturevalue(network)
    result = check_encoding(model, X, swaps=16)
    assert result.status == EXACT, result.reason
    assert result.swaps > 0


def test_round_trip_is_bit_exact_and_decoding_passes_gradients(every_pattern):
    model, graph = every_pattern
    state = model.state_dict()
    data = graph.encode(state)
    decoded = graph.decode(data)
    assert {k for k, v in state.items() if v.is_floating_point()} == set(decoded)
    assert all(torch.equal(decoded[k], state[k]) for k in decoded)
    torch.testing.assert_close(torch.func.functional_call(model, decoded, (X,)), model(X))
    meta = Metanetwork.for_graph(graph, num_layers=1, hidden=8)  # the graph's blocks run
    out = meta(data)
    torch.func.functional_call(model, graph.decode(out), (X,)).square().sum().backward()
    grads = [p.grad for p in meta.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def _follow(graph: NetworkGraph, moves: dict[int, int]) -> torch.Tensor | None:
    """The permutation moving node ``u`` to ``moves[u]``, extended along the constant edges: a
    node fed by an identity edge from a moved node moves to the node its image feeds; a
    group's node moves with its members. None where two edges ask for different images."""
    images = dict(moves)

    def move(node: int, image: int) -> bool:
        if images.setdefault(node, image) != image:
            raise LookupError(node)
        return True

    try:
        changed = True
        while changed:
            changed = False
            for block in graph.blocks:
                if block.key is not None:
                    continue
                src, dst = block.src.reshape(-1).tolist(), block.dst.tolist()
                if block.area:  # diagonal identity edges src[k] -> dst[k]
                    targets = {s: d[0] for s, d in zip(src, dst)}
                    for s, d in zip(src, dst):
                        if s in images and d[0] not in images:
                            changed = move(d[0], targets.get(images[s], -1))
                        elif s in images:
                            move(d[0], targets.get(images[s], -1))
                else:  # group nodes src[g], members dst[g]
                    group_of = {m: g for g, members in enumerate(dst) for m in members}
                    for g, members in enumerate(dst):
                        moved = [group_of.get(images[m], -1) for m in members if m in images]
                        for image in moved:
                            changed |= src[g] not in images
                            move(src[g], src[image] if image >= 0 else -1)
    except LookupError:
        return None
    perm = torch.arange(graph.num_nodes)
    perm[list(images)] = torch.tensor(list(images.values()))
    return perm if sorted(perm.tolist()) == list(range(graph.num_nodes)) else None


@pytest.mark.parametrize("network, groups", [("timm_layers", 1), ("every_pattern", 2)])
def test_a_channel_moved_in_every_radix_slice_is_a_symmetry_in_one_slice_it_is_not(
        network, groups, request):
    model, graph = request.getfixturevalue(network)
    data = graph.encode(model)
    conv = next(b for b in graph.blocks if b.key == "split.conv.weight")
    assert conv.src.shape[0] == R * groups
    branches = conv.dst.reshape(R, -1)  # node of channel (r, c)
    def swap(slices) -> dict[int, int]:  # channels 1 and 2 (one group) of radix slices ``slices``
        return {int(branches[r, a]): int(branches[r, b]) for r in slices for a, b in ((1, 2), (2, 1))}

    every = _follow(graph, swap(range(R)))
    assert every is not None and (every != torch.arange(graph.num_nodes)).sum() > 2 * R
    moved = permuted(graph, data, every)
    assert moved is not None
    got = torch.func.functional_call(model, graph.decode(moved), (X,))
    torch.testing.assert_close(got, model(X))
    one = _follow(graph, swap([0]))
    assert one is None or permuted(graph, data, one) is None


def _constant_blocks(graph: NetworkGraph, nodes: torch.Tensor, area: bool) -> list:
    """The identity (``area``) or membership blocks whose edges touch ``nodes``."""
    return [b for b in graph.blocks if b.key is None and bool(b.area) == area
            and torch.isin(torch.cat([b.src.reshape(-1), b.dst.reshape(-1)]), nodes).any()]


@pytest.mark.parametrize("conv", ["split.conv", "sk.paths.0.0", "softmax.fc"])
def test_radix_sums_are_identity_edges_and_softmax_groups_membership_edges(conv, every_pattern):
    model, graph = every_pattern
    block = next(b for b in graph.blocks if b.key == f"{conv}.weight")
    nodes = block.dst.reshape(-1)
    if conv == "sk.paths.0.0":  # the paths are stacked: both convolutions' channels
        other = next(b for b in graph.blocks if b.key == "sk.paths.1.0.weight")
        nodes = torch.cat([nodes, other.dst.reshape(-1)])
    sums = _constant_blocks(graph, nodes, area=True)
    # the pooled gate input and the output each sum R slices of C channels (no sum when the
    # softmax is read as R x C channels)
    assert sum(b.rows for b in sums) == (0 if conv == "softmax.fc" else 2 * R * C)
    group, = _constant_blocks(graph, nodes, area=False)
    assert group.src.shape == (C, 1) and group.dst.shape == (C, R)
    assert set(group.dst.reshape(-1).tolist()) == set(nodes.tolist())


def test_eca_kernel_is_a_passenger_and_the_channels_a_path(every_pattern):
    model, graph = every_pattern
    assert [(key, dim) for key, _, dim in graph.passengers] == [("eca.eca.weight", None),
                                                                  ("eca.eca.bias", None)]
    channels = next(b for b in graph.blocks if b.key == "eca.conv.weight").dst.reshape(-1)
    path, = _constant_blocks(graph, channels, area=False)
    assert torch.equal(path.src.reshape(-1), channels[:-1])
    assert torch.equal(path.dst.reshape(-1), channels[1:])
    swap = torch.arange(graph.num_nodes)
    swap[channels[2]], swap[channels[5]] = channels[5], channels[2]
    assert permuted(graph, graph.encode(model), swap) is None


@pytest.fixture
def fresh_cache(aten_only):
    """Graphs built with a monkeypatched walker stay out of the other tests' cache."""
    NetworkGraph.clear_cache()
    yield
    NetworkGraph.clear_cache()


def test_without_the_order_edges_eca_is_wrong(fresh_cache, monkeypatch):
    def no_order(walker, node, args):
        out = convolution(walker, node, args)
        if out is not aten_radix.NOT_MINE:
            walker.rec.memberships.pop()
        return out

    convolution = aten_radix._convolution_along_the_channels
    patterns = aten_ops._PATTERNS[torch.ops.aten.conv1d]
    monkeypatch.setitem(aten_ops._PATTERNS, torch.ops.aten.conv1d,
                        [no_order if p is convolution else p for p in patterns])
    result = check_encoding(randomize(_Net(_Eca())), X, swaps=16)
    assert result.status == WRONG and "swapping nodes" in result.reason


def test_without_the_softmax_groups_the_radix_is_wrong(fresh_cache, monkeypatch):
    def ungrouped(walker, node, args):
        out = softmax(walker, node, args)
        if out is not aten_radix.NOT_MINE:
            walker.rec.memberships.pop()
        return out

    softmax = aten_radix._softmax_over_a_channel_dim
    for op in (torch.ops.aten.softmax, torch.ops.aten._softmax):
        monkeypatch.setitem(aten_ops._PATTERNS, op, [
            ungrouped if p is softmax else p for p in aten_ops._PATTERNS[op]])
    result = check_encoding(randomize(_Net(_RadixSoftmax())), X, swaps=16)
    assert result.status == WRONG and "swapping nodes" in result.reason


class _Refused(nn.Module):
    def __init__(self, forward) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, R * C, 3, padding=1)
        self.fn = forward

    def forward(self, x):
        return self.fn(self, self.conv(x)).mean()


@pytest.mark.parametrize("forward, why", [
    (lambda m, x: x.view(2, R, C, 12, 12).amax(1), r"'amax'.*touches batch or channels"),
    (lambda m, x: x.view(2, R, C, 12, 12).mean(1), r"'mean'.*touches batch or channels"),
    (lambda m, x: torch.stack([x, x], 1), r"'stack'.*a tensor with itself"),
    # channel (r, c) times channel (c, r) of the same tensor: not one channel each
    (lambda m, x: x.view(2, R, C, 12, 12) * x.view(2, C, R, 12, 12).transpose(1, 2),
     r"'mul'.*channels overlap in part"),
    (lambda m, x: F.conv1d(x.mean((2, 3)).view(2, 1, -1), torch.ones(2, 1, 3), padding=1),
     r"'conv1d'.*only one input and one output feature"),
    (lambda m, x: F.conv1d(x.mean((2, 3)).view(2, 1, -1), torch.ones(1, 1, 3)),
     r"'conv1d'.*not one output per channel"),
])
def test_other_layouts_are_refused_naming_the_operation(forward, why):
    with pytest.raises(UnsupportedArchitectureError, match=r"aten node " + why):
        NetworkGraph(_Refused(forward), X, tracer="aten")
