"""graph/aten_walk.py: the torch.export walk gives the fx walk's graphs, and encodes what fx
cannot (issue 29)."""
import pytest
import torch
import torch.nn.functional as F
from graph_helpers import edges
from pruning_helpers import random_prune, randomize
from torch import nn

import networks
from graph import GraphOptions, NetworkGraph, UnsupportedArchitectureError, edge_attr_key

X32 = torch.randn(1, 3, 32, 32)


def _assert_same_graph(fx_graph: NetworkGraph, aten_graph: NetworkGraph, model: nn.Module) -> None:
    """Both graphs, and the model's encodings through them, agree bit for bit."""
    assert fx_graph is not aten_graph
    assert aten_graph.num_nodes == fx_graph.num_nodes
    assert aten_graph.layout == fx_graph.layout
    assert [b.key for b in aten_graph.blocks] == [b.key for b in fx_graph.blocks]
    assert torch.equal(aten_graph.input_nodes, fx_graph.input_nodes)
    assert torch.equal(aten_graph.output_nodes, fx_graph.output_nodes)
    a, f = aten_graph.encode(model), fx_graph.encode(model)
    for name in ["x", "edge_index", "edge_type", *(edge_attr_key(t) for t in fx_graph.edge_types)]:
        assert a[name].dtype == f[name].dtype and torch.equal(a[name], f[name]), name


CASES = [("resnet8_cifar", {"width": 0.25}), ("resnet20_cifar", {"width": 0.25}), ("resnet18", {}),
         ("mobilenet_v2", {"width_mult": 0.5}), ("mobilenet_v3_small", {"width_mult": 0.5}),
         ("efficientnet_b0", {})]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
# dense networks are slow: their regular widths are the easier case of the pruned ones
@pytest.mark.parametrize("pruned", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["dense", "pruned"])
def test_aten_graph_equals_the_fx_graph(name, kwargs, pruned):
    model = networks.build(name, 10, **kwargs)
    if pruned:
        random_prune(model, X32, ratio=0.3, seed=len(name))
    randomize(model)
    _assert_same_graph(NetworkGraph(model, X32), NetworkGraph(model, X32, tracer="aten"), model)


@pytest.mark.parametrize("name", ["squeezenet1_1", "shufflenet_v2_x0_5"])
def test_aten_graph_equals_the_fx_graph_through_concatenation_and_channel_shuffle(name):
    """squeezenet's fire modules concatenate along the channels; shufflenet splits them
    (chunk) and shuffles them (view, transpose, view)."""
    model = randomize(networks.build(name, 10))
    _assert_same_graph(NetworkGraph(model, X32), NetworkGraph(model, X32, tracer="aten"), model)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's spelling: a BatchNorm2d subclass whose forward calls F.batch_norm, then an
    activation (fx traces it through and meets a function it does not know)."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(channels)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class FunctionalConv(nn.Module):
    """A convolution written as F.conv2d on the module's own parameters."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        self.stride, self.padding, self.groups = stride, kernel // 2, groups
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, kernel, kernel))
        self.bias = nn.Parameter(torch.randn(cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)


class TimmStyleNet(nn.Module):
    """An inverted residual block in timm's spellings: stem, expand, depthwise, project."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1 = FunctionalConv(3, 8, 3, stride=2, bias=False), BatchNormAct2d(8)
        self.expand, self.bn2 = FunctionalConv(8, 12, 1), BatchNormAct2d(12)
        self.dw, self.bn3 = FunctionalConv(12, 12, 3, groups=12), BatchNormAct2d(12, nn.ReLU)
        self.project, self.bn4 = nn.Conv2d(12, 8, 1, bias=False), BatchNormAct2d(8, nn.Identity)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.stem(x))
        x = x + self.bn4(self.project(self.bn3(self.dw(self.bn2(self.expand(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _block(graph: NetworkGraph, key: str):
    return next(b for b in graph.blocks if b.key == key)


def _timm_net(seed: int) -> TimmStyleNet:
    torch.manual_seed(seed)
    return randomize(TimmStyleNet(), seed=seed)


def test_timm_spellings_refused_by_fx_are_encoded_exactly_by_aten():
    model = _timm_net(0)
    # the tracer is part of the cache key: the aten graph built first is not handed to fx
    graph = NetworkGraph.from_module(model, X32, tracer="aten")
    with pytest.raises(UnsupportedArchitectureError, match="fx node"):
        NetworkGraph.from_module(model, X32, tracer="fx")
    _assert_same_graph(graph, NetworkGraph.from_module(model, X32), model)  # "auto": aten here
    # nodes: input, stem, expand, depthwise, project (the residual's target), classifier
    assert graph.num_nodes == 3 + 8 + 12 + 12 + 8 + 5
    assert graph.columns.slots("bn") == 1 and graph.columns.slots("bias") == 1
    assert graph.num_identity_edges == 8  # bn1's output into the project conv's channels
    assert _block(graph, "dw.weight").shape == (12, 1, 1)
    assert torch.equal(_block(graph, "dw.weight").src.reshape(-1), _block(graph, "expand.weight").dst[0])
    state = model.state_dict()
    decoded = graph.decode(graph.encode(model))
    assert set(decoded) == {k for k, v in state.items() if v.is_floating_point()}
    assert all(torch.equal(decoded[k], state[k]) for k in decoded)
    x = graph.encode(model).x  # bn2's four tensors sit on the expand conv's nodes
    nodes = _block(graph, "expand.weight").dst[0]
    for field in ("weight", "bias", "running_mean", "running_var"):
        column = graph.columns.column("bn", 0, field)
        assert torch.equal(x[nodes, column], getattr(model.bn2, field))
    other = _timm_net(1)  # other weights, then the decoded ones: the same function, bit for bit
    assert not torch.equal(other(X32), model(X32))
    other.load_state_dict(decoded, strict=False)
    assert torch.equal(other(X32), model(X32))


def test_a_swap_of_twin_channels_is_the_same_function_and_a_relabelled_graph():
    """Permuting the expand conv's output channels (and, with them, bn2, the depthwise conv
    that reads them channel by channel, bn3 and the project conv's inputs) keeps the
    function; the permuted network's graph is the original one with those nodes relabelled:
    node features and edges (with their features) map onto each other exactly."""
    model = _timm_net(0)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted = _timm_net(0)
    with torch.no_grad():
        for t in (permuted.expand.weight, permuted.expand.bias, permuted.dw.weight, permuted.dw.bias,
                  *(getattr(bn, f) for bn in (permuted.bn2, permuted.bn3)
                    for f in ("weight", "bias", "running_mean", "running_var"))):
            t.copy_(t[perm])
        permuted.project.weight.copy_(permuted.project.weight[:, perm])
    torch.testing.assert_close(permuted(X32), model(X32), rtol=1e-5, atol=1e-5)
    graph = NetworkGraph.from_module(model, X32, tracer="aten")
    data, data_p = graph.encode(model), graph.encode(permuted)
    sigma = torch.arange(graph.num_nodes)  # node of the permuted graph -> node of the original
    for key in ("expand.weight", "dw.weight"):
        nodes = _block(graph, key).dst.reshape(-1)
        sigma[nodes] = nodes[perm]
    assert not torch.equal(data_p.x, data.x)
    assert torch.equal(data_p.x, data.x[sigma])
    relabelled, original = edges(data_p, sigma), edges(data)
    assert relabelled.keys() == original.keys()
    assert all(torch.equal(relabelled[e], original[e]) for e in original)
    assert edges(data_p) != original  # not the identity relabelling


class _Softmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.softmax(self.conv(x), dim=1)


class _GroupNorm(_Softmax):
    def forward(self, x):
        return F.group_norm(self.conv(x).transpose(1, 2), 2)


class _ChannelPad(_Softmax):
    def forward(self, x):
        return F.pad(self.conv(x), (1, 1, 1, 1, 0, 1))


class _ChannelSlice(_Softmax):
    def forward(self, x):  # channel groups (as a shuffle makes): which channels a slice takes?
        return self.conv(x).view(1, 2, 2, 6, 6)[:, :1]


class _PReLU(_Softmax):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.PReLU(4)

    def forward(self, x):
        return self.act(self.conv(x))


class _ScaledResidual(_Softmax):
    def forward(self, x):
        y = self.conv(x)
        return torch.add(y, torch.relu(y), alpha=2.0)


class _TrainingDropout(_Softmax):
    def forward(self, x):
        return F.dropout(self.conv(x), 0.5, training=True)


@pytest.mark.parametrize("net,node,op,why", [
    (_Softmax, "softmax", "aten.softmax.int", "a softmax over dim 1, the batch or a channel dim"),
    (_GroupNorm, "group_norm", "aten.group_norm.default", "a group norm on a tensor whose "
     "channels are in dim 2"),
    (_ChannelPad, "pad", "aten.pad.default", "reaches the batch or the channel dims [1]"),
    (_ChannelSlice, "slice_1", "aten.slice.Tensor", "channels are spread over dims [1, 2]"),
    (_PReLU, "prelu", "aten.prelu.default", "not supported"),
    (_ScaledResidual, "add", "aten.add.Tensor", "alpha != 1"),
    (_TrainingDropout, "dropout", "aten.dropout.default", "dropout in training mode"),
])
def test_unsupported_operations_name_the_aten_op_node_and_module(net, node, op, why):
    with pytest.raises(UnsupportedArchitectureError) as info:
        NetworkGraph(net(), torch.randn(1, 3, 8, 8), tracer="aten")
    message = str(info.value)
    assert f"aten node {node!r}" in message and f"operation {op}" in message
    assert "module path" in message and why in message


class _DataDependent(_Softmax):
    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_data_dependent_control_flow_is_refused_as_unexportable():
    with pytest.raises(UnsupportedArchitectureError, match="cannot be exported with torch.export"):
        NetworkGraph(_DataDependent(), torch.randn(1, 3, 8, 8), tracer="aten")


def test_the_tracer_is_an_option_that_leaves_layouts_alone():
    with pytest.raises(ValueError, match="tracer='jit'"):
        GraphOptions(tracer="jit")
    model = networks.build("resnet8_cifar", 10, width=0.25)
    graph = GraphOptions(tracer="aten").graph(model, X32)
    assert graph.layout == GraphOptions(tracer="fx").graph(model, X32).layout
    assert GraphOptions.of_layout(graph.layout) == GraphOptions()
    assert GraphOptions().tracer == "auto"


def test_auto_keeps_every_graph_fx_builds():
    """The default tracer walks with fx first: where fx encodes a network, its graph is the
    fx graph, bit for bit (a fresh build, not the cached fx graph)."""
    model = randomize(networks.build("mobilenet_v3_small", 10, width_mult=0.5))
    fx_graph = NetworkGraph(model, X32, tracer="fx")
    _assert_same_graph(fx_graph, NetworkGraph(model, X32), model)


def test_auto_names_both_refusals():
    with pytest.raises(UnsupportedArchitectureError) as info:
        NetworkGraph(_Softmax(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert message.startswith("both walkers refuse _Softmax")
    assert "torch.fx: fx node 'softmax'" in message
    assert "torch.export: aten node 'softmax'" in message and "aten.softmax.int" in message
