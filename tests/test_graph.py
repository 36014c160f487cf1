"""graph/: exact round trip, same function, gradients through encode and decode, errors (issue 3);
the metanetwork on the graphs: test_metanetwork.py."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import prune_out_channels, random_prune, randomize
from torch import nn

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
