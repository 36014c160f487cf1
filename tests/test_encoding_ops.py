"""graph/: the operations of modern CNNs (issue 15): channel shuffle, squeeze-excitation gates,
channels-last blocks with LayerNorm and layer scale, chunks, stochastic depth, a flattened
spatial map into a Linear; and the census over torchvision's classifiers.

The oracles: where each channel lands is computed by running the network's own operation on
channel indices; every tensor must come back bit for bit; gradients through decode must equal
autograd's on the network itself; and swapping two nodes so that the graph maps onto itself must
leave the function unchanged (``graph.check``), which a graph with a wrongly tied or untied
channel fails, as the monkeypatched encoders below show.
"""
import copy
from dataclasses import replace

import pytest
import torch
import torchvision
from pruning_helpers import random_prune, randomize
from torch import nn
from torch_geometric.data import Data
from torchvision.models import convnext, efficientnet, regnet, shufflenetv2, swin_transformer
from torchvision.ops.misc import SqueezeExcitation

import networks
from graph import Metanetwork, NetworkGraph, check, edge_attr_key, handlers
from graph.check import EXACT, WRONG, check_encoding
from graph.walker import Walker

X = torch.randn(2, 3, 32, 32)

# The blocks of each family at a width that runs in a fraction of a second.
TINY = {
    "convnext": lambda: convnext.ConvNeXt(
        [convnext.CNBlockConfig(16, 32, 2), convnext.CNBlockConfig(32, None, 1)],
        stochastic_depth_prob=0.1, num_classes=10),
    "efficientnet": lambda: efficientnet.EfficientNet(
        [efficientnet.MBConvConfig(1, 3, 1, 16, 16, 1), efficientnet.MBConvConfig(6, 3, 2, 16, 24, 2)],
        dropout=0.2, stochastic_depth_prob=0.2, num_classes=10),
    "regnet_y": lambda: regnet.RegNet(
        regnet.BlockParams.from_init_params(depth=3, w_0=8, w_a=8, w_m=2, group_width=8,
                                            se_ratio=0.25), stem_width=8, num_classes=10),
    "shufflenet_v2": lambda: shufflenetv2.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=10),
    "mobilenet_v3": lambda: torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.25),
}
# A ViT at CIFAR scale: patch 4, width 16, 2 heads.
VIT = {"vit": lambda: torchvision.models.VisionTransformer(
    image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)}


def _swin(v2: bool = False) -> nn.Module:
    """Two Swin stages (window 4, a shifted block in each, a patch merging between)."""
    parts = ({"block": swin_transformer.SwinTransformerBlockV2,
              "downsample_layer": swin_transformer.PatchMergingV2} if v2 else {})
    return swin_transformer.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        stochastic_depth_prob=0.1, num_classes=10, **parts)


def _narrow_mlps(model: nn.Module, seed: int) -> nn.Module:
    """Keep a random subset of every transformer MLP's hidden channels, a different count per
    block: Swin's pruned copies (torch_pruning cannot prune Swin yet, docs/pruning.md)."""
    g = torch.Generator().manual_seed(seed)
    for mlp in [m for m in model.modules() if isinstance(m, torchvision.ops.MLP)]:
        up, down = mlp[0], mlp[3]
        keep = torch.randperm(up.out_features, generator=g)[:int(torch.randint(
            2, up.out_features, (1,), generator=g))].sort().values
        mlp[0], mlp[3] = nn.Linear(up.in_features, len(keep)), nn.Linear(len(keep), down.out_features)
        with torch.no_grad():
            mlp[0].weight.copy_(up.weight[keep])
            mlp[0].bias.copy_(up.bias[keep])
            mlp[3].weight.copy_(down.weight[:, keep])
            mlp[3].bias.copy_(down.bias)
    return model


SWIN = {"swin": _swin, "swin_v2": lambda: _swin(v2=True)}
# MaxViT: MBConv with squeeze-excitation, then block and grid attention with a per-head
# relative position bias
MAXVIT = {"maxvit": lambda: torchvision.models.maxvit.MaxVit(
    input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
    block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.1, num_classes=10)}


def _block(graph: NetworkGraph, key: str, area: int | None = None):
    return next(b for b in graph.blocks if b.key == key and area in (None, b.area))


def _built(name: str, pruned: bool) -> nn.Module:
    """Family ``name`` at test width, pruned to irregular widths if ``pruned``."""
    model = {**TINY, **VIT, **SWIN, **MAXVIT}[name]()
    if pruned and name in TINY:
        random_prune(model, X, ratio=0.4, seed=1)
    elif pruned and name in VIT:  # the residual width and the MLPs pruned, as pipelines do
        networks.prune_to_speed_up(model, X, 1.5, networks.count_macs(model, X), iterative_steps=20)
    elif pruned:
        _narrow_mlps(model, seed=1)
    return model


FAMILIES = ([(n, p) for n in sorted(TINY) for p in (False, True)]
            + [(n, p) for n in (*VIT, *SWIN) for p in (False, True)] + [("maxvit", False)])


@pytest.mark.parametrize("name,pruned", FAMILIES)
def test_modern_blocks_are_exact_and_their_node_swaps_are_symmetries(name, pruned):
    verdict = check_encoding(randomize(_built(name, pruned)), X, swaps=12)
    assert verdict.status == EXACT, verdict.reason
    assert verdict.swaps >= 4  # enough swaps were symmetries of the graph to test something


@pytest.mark.parametrize("name,pruned", FAMILIES)
def test_gradients_through_decode_equal_autograd_on_the_network(name, pruned):
    model = randomize(_built(name, pruned))
    graph = NetworkGraph.from_module(model, X)
    data = graph.encode(model)
    names = ["x"] + [edge_attr_key(a) for a in graph.edge_types]
    names += ["passengers"] if graph.passengers else []
    leaves = {k: data[k].clone().requires_grad_() for k in names}
    decoded = graph.decode(Data(**leaves))
    torch.func.functional_call(model, decoded, (X,)).square().mean().backward()
    model.zero_grad()
    model(X).square().mean().backward()
    grads = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}
    through_graph = graph.decode(Data(**grads))  # (featureless membership edges: no gradient)
    for key, param in model.named_parameters():
        torch.testing.assert_close(through_graph[key], param.grad, rtol=1e-5, atol=1e-7)


class _Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(shufflenetv2.channel_shuffle(self.conv1(x), 2))


def test_channel_shuffle_reorders_the_nodes_as_the_shuffle_moves_channels():
    graph = NetworkGraph.from_module(_Shuffle(), X)
    moved = shufflenetv2.channel_shuffle(torch.arange(8.0).view(1, 8, 1, 1), 2).view(-1).long()
    written = _block(graph, "conv1.weight").dst[0]
    assert torch.equal(_block(graph, "conv2.weight").src[0], written[moved])
    assert graph.num_nodes == 3 + 8 + 4  # one node per channel, nothing added


class _Chunks(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.conv1(x).chunk(2, dim=1)
        return self.conv2(torch.cat([b, a], dim=1))


def test_chunks_along_the_channels_take_their_share_of_the_nodes():
    graph = NetworkGraph.from_module(_Chunks(), X)
    written = _block(graph, "conv1.weight").dst[0]
    assert torch.equal(_block(graph, "conv2.weight").src[0], torch.cat([written[4:], written[:4]]))


class _Excite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.se = SqueezeExcitation(8, 2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.se(self.conv(x)))


def test_a_squeeze_excitation_gate_is_the_channel_it_gates():
    graph = NetworkGraph.from_module(_Excite(), X)
    gated = _block(graph, "conv.weight").dst[0]
    assert torch.equal(_block(graph, "se.fc2.weight").dst[0], gated)
    assert torch.equal(_block(graph, "se.fc1.weight").src[0], gated)
    assert torch.equal(_block(graph, "head.weight").src[0], gated)
    columns = graph.columns  # the gated conv's bias and the gate's bias: two bias slots
    assert columns.slots("bias") == 2


def test_untying_the_gate_is_caught_by_the_swap_check(monkeypatch):
    model = randomize(_Excite())
    assert check_encoding(model, X, swaps=10).status == EXACT
    NetworkGraph.clear_cache()
    monkeypatch.setattr(Walker, "gate", lambda self, node, args: replace(args[0][1], fresh=False))
    verdict = check_encoding(model, X, swaps=10)
    NetworkGraph.clear_cache()
    assert verdict.status == WRONG and "changes the network's function" in verdict.reason


def test_a_shuffle_read_in_channel_order_is_caught_by_the_swap_check(monkeypatch):
    model = randomize(_Shuffle())
    assert check_encoding(model, X, swaps=10).status == EXACT
    NetworkGraph.clear_cache()

    def in_channel_order(walker, node, args):  # moves the dims but not the channels' nodes
        arg, value = args[0]
        moved = walker.permute(node, arg, value)
        return replace(moved, nodes=value.nodes.reshape(moved.nodes.shape))

    for target in handlers._PERMUTES:
        monkeypatch.setitem(handlers._FUNCTION_HANDLERS, target, in_channel_order)
    verdict = check_encoding(model, X, swaps=10)
    NetworkGraph.clear_cache()
    assert verdict.status == WRONG


class _ChannelsLast(nn.Module):
    """A ConvNeXt-style block written out: depthwise conv, LayerNorm and MLP on channels-last
    tensors, layer scale, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.down(nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.fc(x.mean((2, 3)))


def test_channels_last_layers_and_layer_scale_sit_on_the_channels_they_act_on():
    model = randomize(_ChannelsLast())
    graph = NetworkGraph.from_module(model, X)
    x = graph.encode(model).x
    dw = _block(graph, "dw.weight").dst.reshape(-1)
    assert torch.equal(_block(graph, "up.weight").src[0], dw)
    for field in ("weight", "bias"):
        column = graph.columns.column("layernorm", 0, field)
        assert torch.equal(x[dw, column], getattr(model.norm, field).detach())
    down = _block(graph, "down.weight").dst[0]
    assert torch.equal(x[down, graph.columns.column("scale", 0, "weight")], model.gamma.detach().view(-1))
    assert check_encoding(model, X, swaps=10).status == EXACT


class _FlatHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=5)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_a_linear_after_a_flattened_map_has_one_kernel_per_channel_pair():
    model = randomize(_FlatHead())
    graph = NetworkGraph.from_module(model, X)
    block = _block(graph, "fc.weight")
    assert block.area == 36 and block.shape == (1, 5, 4)
    assert torch.equal(block.src[0], _block(graph, "conv.weight").dst[0])
    features = graph.encode(model)[edge_attr_key(36)][block.start:block.start + block.rows]
    weight = model.fc.weight.detach()
    for o, c in ((0, 0), (3, 2), (4, 3)):  # edge (channel c -> output o): the c-th 6x6 slice
        assert torch.equal(features[o * 4 + c], weight[o, c * 36:(c + 1) * 36])
    assert check_encoding(model, X, swaps=10).status == EXACT


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "squeezenet1_1"])
def test_census_small_torchvision_classifiers(name):
    verdict = check_encoding(randomize(networks.build(name, 10)), X[:1], swaps=2)
    assert verdict.status == EXACT, verdict.reason


_CENSUS = [n for n in torchvision.models.list_models(module=torchvision.models)
           if n not in ("shufflenet_v2_x0_5", "squeezenet1_1")]


@pytest.mark.slow
@pytest.mark.parametrize("name", _CENSUS)
def test_census_every_torchvision_classifier_is_exact(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    size = 299 if name == "inception_v3" else 224
    verdict = check_encoding(networks.build(name, 10, **kwargs), torch.randn(1, 3, size, size), swaps=2)
    assert verdict.status == EXACT, verdict.reason  # every one is (docs/graph.md, census)


def test_attention_heads_permute_whole_and_channels_only_within_a_head():
    model = randomize(VIT["vit"]())
    graph = NetworkGraph.from_module(model, X)
    data, expected = graph.encode(model), model(X)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the output sees the input
    prefix = "encoder.layers.encoder_layer_0.self_attention"
    # 2 heads x 8 query/key channels, one edge per input channel with both weights (area 2)
    qk = _block(graph, f"{prefix}.in_proj_weight", area=2).dst[0]
    assert len(qk) == 16

    def function(permuted):
        return torch.func.functional_call(model, graph.decode(permuted), (X,))

    within = check.swapped(graph, data, int(qk[1]), int(qk[5]))  # same head
    assert within is not None
    torch.testing.assert_close(function(within), expected)
    across = check.swapped(graph, data, int(qk[1]), int(qk[9]))  # heads 0 and 1: the closure
    assert across is not None                                    # swaps the whole heads
    torch.testing.assert_close(function(across), expected)
    moved = across.x.ne(data.x).any(1).nonzero().view(-1)  # every channel of both heads moved
    assert set(moved.tolist()) >= set(qk.tolist())
    # one query/key channel moved to the other head alone: not a symmetry of the network, and
    # not an automorphism of the graph (its membership edge would change heads)
    perm = torch.arange(graph.num_nodes)
    perm[qk[1]], perm[qk[9]] = qk[9], qk[1]
    members = next(b for b in graph.blocks if b.area == 0 and b.dst.numel() == len(qk)
                   and set(b.dst.reshape(-1).tolist()) == set(qk.tolist()))
    assert check._permuted_block(members, data[edge_attr_key(0)], perm, graph.num_nodes) is None
    weights = dict(model.state_dict())
    in_proj = weights[f"{prefix}.in_proj_weight"].clone()
    in_proj[[1, 9, 17, 25]] = in_proj[[9, 1, 25, 17]]  # query and key rows 1 <-> 9
    weights[f"{prefix}.in_proj_weight"] = in_proj
    assert not torch.allclose(torch.func.functional_call(model, weights, (X,)), expected, atol=1e-4)


def test_class_token_and_positional_embedding_stay_out_of_the_graph_and_follow_channels():
    model = randomize(VIT["vit"]())
    graph = NetworkGraph.from_module(model, X)
    keys = {key for key, *_ in graph.passengers}
    assert keys == {"class_token", "encoder.pos_embedding"}
    stream = _block(graph, "conv_proj.weight").dst.reshape(-1)
    assert all(torch.equal(nodes, stream) and dim == 2 for _, nodes, dim in graph.passengers)
    data = graph.encode(model)
    assert data.x.shape[1] == graph.node_dim  # not among the node features
    decoded = graph.decode(data)
    assert torch.equal(decoded["class_token"], model.class_token.detach())


def test_patch_merging_then_linear_is_a_2x2_kernel_per_channel_pair():
    model = randomize(_swin())
    graph = NetworkGraph.from_module(model, X)
    stream = _block(graph, "features.1.1.mlp.3.weight").dst[0]  # stage 1's 16 output channels
    block = _block(graph, "features.2.reduction.weight")
    assert block.area == 4 and block.shape == (1, 32, 16) and torch.equal(block.src[0], stream)
    data = graph.encode(model)
    features = data[edge_attr_key(4)][block.start:block.start + block.rows]
    weight = model.features[2].reduction.weight.detach()  # [32, 4 x 16]: neighbour-major
    for o, c in ((0, 0), (5, 3), (31, 15)):
        assert torch.equal(features[o * 16 + c], weight[o, c::16])
    norm = model.features[2].norm  # LayerNorm over the 4 x 16 merged entries: 4 slots a node
    slots = [graph.columns.column("layernorm", s, "weight") for s in range(graph.columns.slots("layernorm"))]
    for c in (0, 7):
        assert set(norm.weight.detach()[c::16].tolist()) <= set(data.x[stream[c], slots].tolist())


def test_swin_heads_carry_their_relative_position_bias():
    model = randomize(_swin())
    prefix = "features.3.0.attn"  # 4 heads of 8 channels
    table = model.get_parameter(f"{prefix}.relative_position_bias_table")
    torch.nn.init.normal_(table, std=2.0)  # biases that change the attention visibly
    graph = NetworkGraph.from_module(model, X)
    data, expected = graph.encode(model), model(X)
    qk = _block(graph, f"{prefix}.qkv.weight", area=2).dst[0]
    assert {key: dim for key, _, dim in graph.passengers} == {
        f"features.{s}.{b}.attn.relative_position_bias_table": 1 for s in (1, 3) for b in (0, 1)}

    def function(permuted):
        return torch.func.functional_call(model, graph.decode(permuted), (X,))

    across = check.swapped(graph, data, int(qk[1]), int(qk[17]))  # heads 0 and 2 swap whole
    assert across is not None
    torch.testing.assert_close(function(across), expected)
    # the same swap with each head keeping its old bias table column: another network
    across.passengers = data.passengers
    assert not torch.allclose(function(across), expected, atol=1e-4)


@pytest.mark.parametrize("name", [*VIT, "swin"])
@pytest.mark.parametrize("message_passing", ["paper", "joint"])
def test_the_metanetwork_commutes_with_a_head_swap(name, message_passing):
    """On an attention graph (featureless membership edges, 2-feature query/key edges,
    passengers) the metanetwork's output of the head-swapped graph is its output, swapped."""
    model = randomize({**VIT, **SWIN}[name]())
    graph = NetworkGraph.from_module(model, X)
    torch.manual_seed(0)
    meta = Metanetwork.for_graph(graph, num_layers=2, hidden=8, node_res_ratio=1.0,
                                 edge_res_ratio=1.0, zero_init_decoders=False,
                                 channel_gates=True, message_passing=message_passing)
    torch.nn.init.normal_(meta.gate_decoder[-1].weight, std=1.0)  # gates away from 1
    data = graph.encode(model)
    qk = _block(graph, next(b.key for b in graph.blocks if b.area == 2), area=2).dst[0]
    u, v = int(qk[1]), int(qk[len(qk) // 2 + 1])  # channel 1 of heads 0 and 1
    swapped = copy.copy(data)
    for key, value in check.swapped(graph, data, u, v).items():
        swapped[key] = value
    out = meta(data)
    expected = check.swapped(graph, out, u, v)
    got = meta(swapped)
    assert not torch.allclose(out.x, data.x, atol=1e-3)  # the metanetwork changes the graph
    for key in ["x"] + [edge_attr_key(a) for a in graph.edge_types]:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    decoded = torch.func.functional_call(model, graph.decode(out), (X,))
    assert torch.isfinite(decoded).all()


def test_the_papers_attention_layout_ties_query_key_and_value_and_cannot_see_heads():
    model = randomize(VIT["vit"]())
    graph = NetworkGraph.from_module(model, X, attention="paper")
    data, expected = graph.encode(model), model(X)
    assert graph.layout["attention"] == "paper" and 0 not in graph.edge_types  # no head nodes
    decoded = graph.decode(data)
    assert all(torch.equal(decoded[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
    prefix = "encoder.layers.encoder_layer_0.self_attention"
    block = _block(graph, f"{prefix}.in_proj_weight", area=3)
    weight = model.get_parameter(f"{prefix}.in_proj_weight").detach()  # [q; k; v], 16 rows each
    features = data[edge_attr_key(3)][block.start:block.start + block.rows]
    for i, j in ((0, 0), (5, 3), (15, 15)):  # edge (input j -> channel i): q, k, v weights
        assert torch.equal(features[i * 16 + j], weight[[i, 16 + i, 32 + i], j])
    # the paper's code reads the in-projection bias in steps of 3: channel i gets entries 3i..3i+2
    bias = model.get_parameter(f"{prefix}.in_proj_bias").detach()
    columns = [graph.columns.column("qkv_bias", 0, f) for f in ("q_bias", "k_bias", "v_bias")]
    assert torch.equal(data.x[block.dst[0]][:, columns], bias.view(16, 3))
    # channel 1 of head 0 swapped with channel 1 of head 1 maps this graph onto itself, but
    # the network it decodes to computes something else
    swapped = check.swapped(graph, data, int(block.dst[0, 1]), int(block.dst[0, 9]))
    assert swapped is not None
    assert not torch.allclose(torch.func.functional_call(model, graph.decode(swapped), (X,)),
                              expected, atol=1e-4)


class _Cancelling(nn.Module):
    """Its output is ``x`` times the sum of three parameters, added left to right, so the order
    of the three decides the float32 result when two of them cancel."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([1e8, -1e8, 1.0]))

    def forward(self, x):
        return x * (self.p[0] + self.p[1] + self.p[2])


def test_outputs_that_differ_by_float32_rounding_alone_are_the_same_function():
    model, x = _Cancelling(), torch.ones(1)
    outputs = check._Outputs(model, x, atol=1e-5)
    reordered = {"p": torch.tensor([1e8, 1.0, -1e8])}  # the same sum; 0 instead of 1 in float32
    assert not torch.equal(torch.func.functional_call(model, reordered, (x,)), outputs.expected)
    assert outputs.same(reordered)
    assert not outputs.same({"p": torch.tensor([1e8, -1e8, 2.0])})  # another function


class _CancellingBuffers(_Cancelling):
    """The same, times a float buffer outside the state dict picked by an integer buffer: the
    float64 comparison must take both from the model, since a decoded state has neither."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([3.0, 5.0]), persistent=False)
        self.register_buffer("pick", torch.tensor([1]))

    def forward(self, x):
        return super().forward(x) * self.scale[self.pick]


def test_float64_comparison_keeps_the_buffers_a_state_leaves_out():
    model, x = _CancellingBuffers(), torch.ones(1)
    outputs = check._Outputs(model, x, atol=1e-5)
    assert outputs.same({"p": torch.tensor([1e8, 1.0, -1e8])})
    assert not outputs.same({"p": torch.tensor([1e8, -1e8, 2.0])})
    assert outputs.expected.item() == 5.0 and model.p.device.type == "cpu"  # model untouched


def test_check_decodes_from_features_alone(monkeypatch):
    """The check never builds the graph's edge_index/edge_type (11 of ViT-H/14's 16 GB)."""
    def refuse(self):
        raise AssertionError("the check built the edge structure")
    monkeypatch.setattr(NetworkGraph, "edge_index", property(refuse))
    monkeypatch.setattr(NetworkGraph, "edge_type", property(refuse))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = check.check_encoding(model, torch.randn(1, 3, 8, 8), swaps=4)
    assert result.status == check.EXACT and result.swaps > 0
    assert result.edges == 8 * 3 + 4 * 8  # one edge per pair of channels a weight joins
