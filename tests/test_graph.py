"""graph/: exact round trip, same function, gradients, equivariance, errors (issue 3)."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import output_gradients, prune_out_channels, random_prune, randomize
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

import networks
from graph import Metanetwork, NetworkGraph, NodeColumns, UnsupportedArchitectureError, edge_attr_key

X32 = torch.randn(1, 3, 32, 32)
X64 = torch.randn(1, 3, 64, 64)


def _assert_round_trip(model: nn.Module, example: torch.Tensor) -> NetworkGraph:
    state = model.state_dict()
    graph = NetworkGraph.from_module(model, example)
    decoded = graph.decode(graph.encode(state))
    floating = {k for k, v in state.items() if v.is_floating_point()}
    assert set(decoded) == floating
    for key in floating:
        assert decoded[key].dtype == state[key].dtype
        assert torch.equal(decoded[key], state[key]), key
    return graph


CASES = [("resnet20_cifar", X32, {}), ("resnet56_cifar", X32, {}), ("resnet110_cifar", X32, {}),
         ("vgg19_bn_cifar", X32, {"width": 0.5}), ("resnet18", X64, {}),
         ("resnet50", X64, {"width_per_group": 16}), ("mobilenet_v2", X64, {"width_mult": 0.5})]


@pytest.mark.parametrize("name,example,kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_round_trip_is_bit_exact(name, example, kwargs, pruned):
    model = networks.build(name, 10, **kwargs)
    if pruned:
        random_prune(model, example, ratio=0.4, seed=hash(name) % 100)
    _assert_round_trip(randomize(model), example)


def test_resnet56_with_equal_width_projection_and_class_width_hidden_layer():
    model = networks.build("resnet56_cifar", 10)
    # the layer3 projection block now maps 32 -> 32 channels; a hidden layer is 10 wide
    prune_out_channels(model, X32, model.layer3[0].conv2, keep=32)
    prune_out_channels(model, X32, model.layer1[3].conv1, keep=10)
    assert model.layer3[0].shortcut[0].in_channels == model.layer3[0].shortcut[0].out_channels
    assert model.layer1[3].conv1.out_channels == model.fc.out_features
    graph = _assert_round_trip(randomize(model), X32)
    _assert_same_function(model, graph, X32)


def _assert_same_function(model, graph, example):
    """A same-shaped network with other weights, given the decoded ones, computes the same."""
    rebuilt = networks.network_from_record(
        networks.network_record(model, {"name": "resnet56_cifar", "num_classes": 10}))
    randomize(rebuilt, seed=9)
    assert not torch.equal(rebuilt(example), model(example))
    decoded = graph.decode(graph.encode(model))
    rebuilt.load_state_dict(decoded, strict=False)
    rebuilt.eval()
    assert torch.equal(rebuilt(example), model(example))


def test_decoded_weights_give_the_same_function():
    model = randomize(random_prune(networks.build("resnet56_cifar", 10), X32, 0.3, seed=3))
    graph = NetworkGraph.from_module(model, X32)
    _assert_same_function(model, graph, X32)


def test_projection_shortcut_merges_into_the_main_path_and_identity_edges_are_sparse():
    model = networks.build("resnet20_cifar", 10)
    graph = NetworkGraph.from_module(model, X32)
    blocks = {b.key: b for b in graph.blocks}
    main, shortcut = blocks["layer2.0.conv2.weight"], blocks["layer2.0.shortcut.0.weight"]
    assert torch.equal(main.dst, shortcut.dst)  # same output nodes: one group, two BN slots
    assert graph.columns.slots("bn") == 2 and graph.node_dim == 4 * 2 + 1
    # identity shortcuts: one Dirac edge per channel, not a dense zero block
    assert graph.num_identity_edges == 3 * 16 + 2 * 32 + 2 * 64
    # input + stem + two convs per block + classifier; the projection convs add no nodes
    assert graph.num_nodes == 3 + 16 + 3 * (2 * 16) + 3 * (2 * 32) + 3 * (2 * 64) + 10


def test_grouped_and_depthwise_edges_stay_within_groups():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, groups=6, bias=True), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3))
    graph = _assert_round_trip(randomize(model), torch.randn(1, 4, 8, 8))
    blocks = {b.key: b for b in graph.blocks}
    assert blocks["0.weight"].shape == (2, 3, 2) and blocks["3.weight"].shape == (6, 1, 1)
    s, d = blocks["0.weight"].edge_index()
    assert set(zip(s.tolist(), d.tolist())) == {(i, 4 + o) for o in range(6)
                                                  for i in range(4) if i // 2 == o // 3}
    s, d = blocks["3.weight"].edge_index()
    assert list(zip(s.tolist(), d.tolist())) == [(4 + c, 10 + c) for c in range(6)]


def test_encoded_features_stay_within_1_1x_of_the_weights():
    model = networks.build("resnet50", 10)
    graph = NetworkGraph.from_module(model, X64)
    data = graph.encode(model)
    state_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values()
                      if v.is_floating_point())
    feature_bytes = data.x.numel() * 4 + sum(data[edge_attr_key(a)].numel() * 4
                                             for a in graph.edge_types)
    assert feature_bytes <= 1.1 * state_bytes
    assert graph.edge_types == (1, 9, 49)


def test_gradcheck_through_encode_and_decode():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).double()
    graph = NetworkGraph.from_module(model, torch.randn(1, 2, 5, 5, dtype=torch.double))
    keys = list(graph.shapes)
    base = graph.encode(model)

    def through_decode(x, e9, e1):
        data = base.clone()
        data.x, data[edge_attr_key(9)], data[edge_attr_key(1)] = x, e9, e1
        out = graph.decode(data)
        return tuple(out[k] for k in keys)

    inputs = tuple(t.detach().clone().requires_grad_() for t in
                   (base.x, base[edge_attr_key(9)], base[edge_attr_key(1)]))
    assert torch.autograd.gradcheck(through_decode, inputs)


def test_loss_on_decoded_network_reaches_every_metanetwork_parameter():
    model = networks.build("resnet20_cifar", 10, width=0.25).eval()
    graph = NetworkGraph.from_module(model, X32)
    # random decoders (zero-initialised ones pass gradient only to their own last layer
    # until the first update)
    meta = Metanetwork.for_graph(graph, num_layers=2, hidden=8, zero_init_decoders=False)
    weights = graph.decode(meta(graph.encode(model)))
    loss = F.cross_entropy(torch.func.functional_call(model, weights, (torch.randn(4, 3, 32, 32),)),
                           torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in meta.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def _naive_metanetwork(meta: Metanetwork, data) -> dict:
    """Per-edge message passing of our joint variant (the oracle for its block form; the
    paper's layer has its own oracle in test_paper_layer.py)."""
    src, dst = data.edge_index
    n = data.x.shape[0]
    h = meta.node_encoder(data.x)
    e = h.new_zeros(src.shape[0], h.shape[1])
    for a in meta.edge_types:
        e[data.edge_type == a] = meta.edge_encoders[str(a)](data[edge_attr_key(a)])
    recv = torch.cat([dst, src])
    degree = scatter(torch.ones_like(recv, dtype=h.dtype), recv, 0, n).clamp_min(1)[:, None]
    for layer in meta.layers:
        hid = layer.hidden
        a_, b_ = layer.phi_msg(F.layer_norm(h, (hid,))).split(hid, 1)
        msg = torch.cat([a_[dst] * b_[src] * e, a_[src] * b_[dst] * e * layer.sign])
        mean = scatter(msg, recv, 0, n) / degree
        std = (scatter(msg * msg, recv, 0, n) / degree - mean ** 2).clamp_min(0).add(1e-6).sqrt()
        agg = torch.cat([mean, std, scatter(msg, recv, 0, n, reduce="max"),
                         scatter(msg, recv, 0, n, reduce="min")], 1)
        h = h + layer.aggregate(agg)
        c, d = layer.phi_edge(F.layer_norm(h, (hid,))).split(hid, 1)
        e = e + c[src] * d[dst] * e
    out = {"x": data.x + meta.node_res_ratio * meta.node_decoder(h) * meta.node_update_mask}
    scale = torch.ones(src.shape[0], dtype=h.dtype)
    if meta.gate_decoder is not None:  # gates 1 + g - max g over the layer, 0 below the floor
        writer = {}  # node -> the weight tensor writing it (the last one, as in Metanetwork)
        for i, b in enumerate(data.graph.blocks):
            if b.key is not None:
                writer.update({int(node): i for node in b.dst.reshape(-1)})
        same_layer = [[m for m in range(n) if writer.get(m, -m - 1) == writer.get(node, -node - 1)]
                      for node in range(n)]
        identity = torch.cat([torch.full((b.rows,), b.key is None) for b in data.graph.blocks])
        squares = h.new_zeros(n)
        for a in meta.edge_types:
            typed = data.edge_type == a
            w2 = torch.where(identity[typed], 0.0, data[edge_attr_key(a)].pow(2).sum(1))
            squares = squares.index_add(0, dst[typed], w2).index_add(0, src[typed], w2)
        norm = squares.sqrt()
        largest = torch.stack([norm[same].max() for same in same_layer])
        relative = torch.where(largest > 0, norm / largest, 1.0)
        g = meta.gate_decoder(torch.cat([F.layer_norm(h, h.shape[1:]), relative[:, None]], 1))[:, 0]
        top = torch.stack([g[same].max() for same in same_layer])
        gate = torch.where(1 + g - top < meta.gate_floor, 0.0, 1 + g - top)
        out["x"] = out["x"] * torch.where(meta.gated_node_columns.bool(), gate[:, None], 1.0)
        scale = torch.where(identity, 1.0, gate[src] * gate[dst])
    for a in meta.edge_types:
        key = edge_attr_key(a)
        typed = data.edge_type == a
        out[key] = (data[key] + meta.edge_res_ratio * meta.edge_decoders[str(a)](e[typed])) \
            * scale[typed, None]
    return out


def _random_gates(meta: Metanetwork) -> None:
    """Gate decoder with a random last layer: gates spread around 1, some closed (0)."""
    torch.nn.init.normal_(meta.gate_decoder[-1].weight, std=1.0)


@pytest.mark.parametrize("gates", [False, True], ids=["additive", "channel_gates"])
def test_block_message_passing_equals_per_edge_message_passing(gates):
    torch.manual_seed(0)
    model = random_prune(networks.build("resnet20_cifar", 10, width=0.5), X32, 0.3, seed=0)
    model = randomize(model).double()
    graph = NetworkGraph.from_module(model, X32.double())
    meta = Metanetwork.for_graph(graph, num_layers=3, hidden=16, node_res_ratio=1.0,
                                 edge_res_ratio=1.0, zero_init_decoders=False,
                                 channel_gates=gates, message_passing="joint").double()
    if gates:
        _random_gates(meta)
    data = graph.encode(model)
    data.x.requires_grad_()
    for a in graph.edge_types:
        data[edge_attr_key(a)].requires_grad_()
    fast, slow = meta(data), _naive_metanetwork(meta, data)
    for key, expected in slow.items():
        torch.testing.assert_close(fast[key], expected, rtol=1e-9, atol=1e-9)
    if gates:  # some channels closed, others open: some edges exactly zero, not all
        closed = (fast[edge_attr_key(9)] == 0).all(1).float().mean()
        assert 0 < closed < 0.9
        return  # the gates' floor passes gradients straight through, the oracle's does not
    # the gradients too: the block form's backward is partly hand-written
    for ours, theirs in zip(output_gradients(meta, data, {k: fast[k] for k in slow}),
                            output_gradients(meta, data, slow)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * theirs.abs().max())


def test_a_closed_channel_gate_zeroes_exactly_that_torch_pruning_group(monkeypatch):
    model = randomize(networks.build("resnet20_cifar", 10, width=0.5)).eval()
    graph = NetworkGraph.from_module(model, X32)
    meta = Metanetwork.for_graph(graph, num_layers=2, hidden=8, channel_gates=True)
    channel = graph.blocks[[b.key for b in graph.blocks].index("layer2.1.conv1.weight")].dst[0, 3]
    gates = torch.ones(graph.num_nodes)
    gates[channel] = 0.0
    monkeypatch.setattr(meta, "_gates", lambda *args: gates)
    with torch.no_grad():
        out = graph.decode(meta(graph.encode(model)))
    state = model.state_dict()
    for key in ("layer2.1.conv1.weight", "layer2.1.bn1.weight", "layer2.1.bn1.bias"):
        assert not out[key][3].any() and out[key][:3].all(), key
    assert not out["layer2.1.conv2.weight"][:, 3].any()
    for key in ("layer2.1.bn1.running_mean", "layer2.1.bn1.running_var"):
        assert torch.equal(out[key], state[key]), key  # BN statistics are never gated
    # torch_pruning's view: that channel's group norm is 0, and no other
    before = networks.group_norms(networks.criterion_pruner(model, X32))
    model.load_state_dict(out)
    after = networks.group_norms(networks.criterion_pruner(model, X32))
    assert (after == 0).sum() == 1 and (before > 0).all()


def test_batch_of_widths_equals_one_by_one():
    torch.manual_seed(0)
    models = [networks.build("resnet20_cifar", 10, width=w).eval() for w in (0.25, 0.5)]
    graphs = [NetworkGraph.from_module(m, X32) for m in models]
    meta = Metanetwork.for_graph(graphs[0], num_layers=2, hidden=8, node_res_ratio=1.0,
                                 edge_res_ratio=1.0)
    batch = Batch.from_data_list([g.encode(m) for g, m in zip(graphs, models)])
    split = meta(batch).to_data_list()
    for g, m, out in zip(graphs, models, split):
        alone = g.decode(meta(g.encode(m)))
        for key, value in g.decode(out).items():
            torch.testing.assert_close(value, alone[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("message_passing", ["paper", "joint"])
@pytest.mark.parametrize("gates", [False, True], ids=["additive", "channel_gates"])
def test_permuting_hidden_channels_permutes_nodes_and_metanetwork_output(gates, message_passing):
    torch.manual_seed(0)
    model = randomize(networks.build("resnet20_cifar", 10, width=0.5))
    perm = torch.randperm(model.layer2[1].conv1.out_channels)
    permuted = randomize(networks.build("resnet20_cifar", 10, width=0.5))
    permuted.load_state_dict(model.state_dict())
    block = permuted.layer2[1]
    with torch.no_grad():
        for t in (block.conv1.weight, block.bn1.weight, block.bn1.bias, block.bn1.running_mean,
                  block.bn1.running_var):
            t.copy_(t[perm])
        block.conv2.weight.copy_(block.conv2.weight[:, perm])
    assert torch.allclose(permuted(X32), model(X32), atol=1e-5)  # same function
    graph = NetworkGraph.from_module(model, X32)
    meta = Metanetwork.for_graph(graph, num_layers=2, hidden=16, node_res_ratio=1.0,
                                 edge_res_ratio=1.0, zero_init_decoders=False,
                                 channel_gates=gates, message_passing=message_passing)
    if gates:
        _random_gates(meta)
    data, data_p = graph.encode(model), graph.encode(permuted)
    nodes = graph.blocks[[b.key for b in graph.blocks].index("layer2.1.conv1.weight")].dst[0]
    torch.testing.assert_close(data_p.x[nodes], data.x[nodes[perm]])
    out, out_p = graph.decode(meta(data)), graph.decode(meta(data_p))
    torch.testing.assert_close(out_p["layer2.1.conv1.weight"], out["layer2.1.conv1.weight"][perm],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_p["layer2.1.bn1.bias"], out["layer2.1.bn1.bias"][perm],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_p["layer2.1.conv2.weight"],
                               out["layer2.1.conv2.weight"][:, perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_p["fc.weight"], out["fc.weight"], rtol=1e-4, atol=1e-5)


def test_untrained_metanetwork_is_the_identity_or_near_it_and_keeps_running_statistics():
    model = networks.build("resnet56_cifar", 10).eval()
    graph = NetworkGraph.from_module(model, X32)
    ratio = 0.01
    meta = Metanetwork.for_graph(graph, num_layers=2, hidden=16, node_res_ratio=ratio,
                                 edge_res_ratio=ratio, zero_init_decoders=False)
    with torch.no_grad():
        out = graph.decode(meta(graph.encode(model)))
    state = model.state_dict()
    change = max((out[k] - state[k]).abs().max().item() for k in out)
    assert 0 < change <= 5 * ratio
    for key in out:
        if "running" in key:
            assert torch.equal(out[key], state[key]), key
    # the default: zero-initialised decoders make the untrained metanetwork the identity
    meta = Metanetwork.for_graph(graph, num_layers=2, hidden=16, node_res_ratio=1.0,
                                 edge_res_ratio=1.0)
    with torch.no_grad():
        out = graph.decode(meta(graph.encode(model)))
    assert all(torch.equal(out[k], state[k]) for k in out)


def test_layout_mismatch_names_both_layouts():
    resnet = NetworkGraph.from_module(networks.build("resnet20_cifar", 10), X32)
    vgg = NetworkGraph.from_module(networks.build("vgg19_bn_cifar", 10, width=0.25), X32)
    meta = Metanetwork.for_graph(resnet, num_layers=1, hidden=4)
    meta.check_layout(resnet)
    with pytest.raises(ValueError, match="node_dim.: 9.*node_dim.: 5"):
        meta.check_layout(vgg)


class _Reshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], 2, -1)  # channel groups merged with the spatial dims


class _Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.softmax(self.conv(x), dim=1)


class _Divide(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y / y.amax((2, 3), keepdim=True)


class _ChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)[:, :2]


class _ChannelPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.pad(self.conv(x), (0, 0, 0, 0, 1, 1))


class _LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("net,node,op", [
    (_Reshape, "view", "call_method view"), (_Softmax, "softmax", "call_function softmax"),
    (_Divide, "truediv", "call_function truediv"), (_ChannelSlice, "getitem", "call_function getitem"),
    (_ChannelPad, "pad", "call_function pad"), (_LayerNormNet, "norm", "call_module norm"),
])
def test_unsupported_operations_name_node_module_and_operation(net, node, op):
    """The fx walk's refusals (the ATen walk, which "auto" falls back to, encodes a channel
    slice and a GroupNorm: tests/test_timm_encode.py)."""
    with pytest.raises(UnsupportedArchitectureError) as info:
        NetworkGraph.from_module(net(), torch.randn(1, 3, 8, 8), tracer="fx")
    message = str(info.value)
    assert f"fx node {node!r}" in message
    assert op in message
    assert "module path" in message


def test_graph_package_imports_no_lightning():
    code = ("import sys, graph, networks; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class _ChannelAffine(nn.Module):
    """A user's module the encoding does not know: a learned scale (stored as its logarithm)
    and shift per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.randn(channels))
        self.shift = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.exp().view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class _AffineNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.affine = _ChannelAffine(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.affine(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_custom_module_type_is_added_through_the_registry_alone():
    """Unregistered, the module's forward is traced through and refused (a multiply by a
    tensor). Declared from here (a node slot kind for its two vectors, a handler, a shape
    record) it is a leaf whose values sit in the declared columns with the declared defaults
    elsewhere, the round trip is bit-exact, the function survives encode/decode, and a pruned
    copy's file shapes are recorded and rebuilt."""
    from graph import NodeSlot, module_handler, register_module, register_node_slot
    from networks import LayerShape, layer_shape
    from networks.checkpoint import layer_shapes, reshape_to_state

    torch.manual_seed(0)
    model = _AffineNet()
    with pytest.raises(UnsupportedArchitectureError, match="multiplying by a tensor that is neither"):
        NetworkGraph.from_module(model, X32)
    assert module_handler(_ChannelAffine) is None and layer_shape(model.affine) is None

    register_node_slot(NodeSlot("affine", ("scale", "shift"), (1.0, 0.0)))

    def channels(module, tensors):
        return {"channels": int(tensors["scale"].shape[0])} if "scale" in tensors else None

    @register_module(_ChannelAffine, shape=LayerShape(("channels",), channels))
    def _affine(walker, node, module, arg, value):
        walker.channels_first(node, value, "a channel affine")
        for field in ("scale", "shift"):
            walker.add_channels(node, f"{node.target}.{field}", "affine", field, value.nodes)
        return walker.passthrough(arg, value)

    graph = _assert_round_trip(model, X32)
    other = _AffineNet()  # other weights, then the decoded ones: the same function
    assert not torch.equal(other(X32), model(X32))
    other.load_state_dict(graph.decode(graph.encode(model)))
    assert torch.equal(other(X32), model(X32))
    layout = {k: v for k, v in graph.layout.items() if k.endswith("_slots")}
    assert layout == {"bias_slots": 1, "affine_slots": 1} and graph.node_dim == 3
    x = graph.encode(model.state_dict()).x
    conv = next(b for b in graph.blocks if b.key == "conv.weight")
    conv_out = conv.dst.reshape(-1)  # the nodes the conv writes, in channel order
    for field, default in (("scale", 1.0), ("shift", 0.0)):
        column = x[:, graph.columns.column("affine", 0, field)]
        assert torch.equal(column[conv_out], getattr(model.affine, field).detach())
        others = torch.ones(graph.num_nodes, dtype=torch.bool)
        others[conv_out] = False
        assert torch.all(column[others] == default)

    keep = torch.tensor([0, 2, 3, 5])  # a pruned copy: channels 1 and 4 removed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({"conv.weight": state["conv.weight"][keep], "affine.scale": state["affine.scale"][keep],
                  "affine.shift": state["affine.shift"][keep], "fc.weight": state["fc.weight"][:, keep]})
    pruned = _AffineNet()
    reshape_to_state(pruned, state)
    pruned.load_state_dict(state)
    assert layer_shapes(pruned)["affine"] == {"channels": 4}
    assert pruned.conv.out_channels == 4 and pruned.fc.in_features == 4
    _assert_round_trip(pruned, X32)


def test_layouts_stored_by_older_versions_still_match():
    """Checkpoints store a graph layout; older ones list zero slot counts and lack
    identity_edges. They read the same graphs, and a layout naming a slot kind nobody
    registered is refused by name."""
    graph = NetworkGraph.from_module(networks.build("resnet20_cifar", 10), X32)
    old = {"node_dim": 9, "edge_types": list(graph.edge_types), "bn_slots": 2, "bias_slots": 1}
    Metanetwork.for_layout(old, num_layers=1, hidden=4).check_layout(graph)
    with pytest.raises(ValueError, match="does not match"):
        Metanetwork.for_layout(dict(old, bn_slots=1, node_dim=5), num_layers=1,
                               hidden=4).check_layout(graph)
    with pytest.raises(ValueError, match=r"\['ln'\] are not registered"):
        Metanetwork.for_layout(dict(old, ln_slots=1), num_layers=1, hidden=4)
    no_bias = dict(old, bias_slots=0, node_dim=8)
    assert NodeColumns.from_layout(no_bias).layout() == {"bn_slots": 2}
    assert NodeColumns.from_layout(no_bias).statistics() == (2, 3, 6, 7)
