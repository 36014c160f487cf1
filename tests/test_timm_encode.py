"""timm classifiers encode exactly (issue 29): the default tracer ("auto") walks them with
torch.fx where it can and through torch.export (graph/aten_walk.py) where fx refuses them."""
import pytest
import torch
from benchmark_helpers import benchmark_module
from graph_helpers import edges
from pruning_helpers import randomize

from graph import NetworkGraph, UnsupportedArchitectureError, edge_attr_key
from graph.check import check_encoding

timm = pytest.importorskip("timm")

X = torch.randn(2, 3, 32, 32)

# (model, what it exercises; fx refuses all but resnet10t)
MODELS = [
    ("resnet10t", "plain convs and BatchNorm2d: the fx walk"),
    ("mobilenetv3_small_050", "BatchNormAct2d (F.batch_norm), squeeze-excitation gates"),
    ("tf_mobilenetv3_small_minimal_100", "'same' padding (F.pad) before convs"),
    ("efficientnet_b0", "BatchNormAct2d, SiLU, gates, drop path in eval"),
    ("convnext_atto", "layer scale (a reshaped parameter), LayerNorm2d via permutes"),
    ("rexnet_100", "channel slices x[:, :c] + shortcut, concatenated back"),
    ("ghostnet_050", "concatenated ghost features, a whole slice out[:, :c]"),
    ("test_efficientnet_gn", "GroupNormAct (F.group_norm): group nodes"),
    ("hgnetv2_b0", "learnable scalar scale and bias: passengers"),
    ("convnextv2_atto", "global response norm: a mean over the channels divides them, addcmul"),
    ("nf_regnet_b0", "ScaledStdConv2d: filters standardised in forward, gains on the nodes"),
]


def _timm(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(timm.create_model(name, num_classes=10), seed=seed)


@pytest.mark.parametrize("name,what", MODELS, ids=[m[0] for m in MODELS])
def test_a_timm_classifier_round_trips_bit_for_bit(name, what):
    """Every floating tensor comes back bit for bit; loaded into a copy with other weights,
    the decoded tensors give the network's outputs bit for bit; and node swaps that map the
    graph onto itself keep the network's function (graph.check)."""
    model = _timm(name, 0)
    graph = NetworkGraph.from_module(model, X)
    state = model.state_dict()
    decoded = graph.decode(graph.encode(model))
    assert set(decoded) == {k for k, v in state.items() if v.is_floating_point()}
    assert all(torch.equal(decoded[k], state[k]) for k in decoded)
    other = _timm(name, 1)
    with torch.no_grad():
        assert not torch.equal(other(X), model(X))
        other.load_state_dict(decoded, strict=False)
        assert torch.equal(other(X), model(X))
    assert check_encoding(model, X, swaps=4).status == "exact"


def test_fx_refuses_what_auto_encodes_through_aten():
    model = _timm("mobilenetv3_small_050", 0)
    with pytest.raises(UnsupportedArchitectureError, match="operation call_function batch_norm"):
        NetworkGraph(model, X, tracer="fx")
    assert NetworkGraph(model, X).layout == NetworkGraph(model, X, tracer="aten").layout


def test_timm_resnet_aten_graph_is_the_fx_graph():
    model = _timm("resnet10t", 0)
    fx_data = NetworkGraph(model, X, tracer="fx").encode(model)
    aten_data = NetworkGraph(model, X, tracer="aten").encode(model)
    for name in ["x", "edge_index", "edge_type", *(edge_attr_key(a) for a in fx_data.graph.edge_types)]:
        assert torch.equal(fx_data[name], aten_data[name]), name


def _group_swap(groups: int, size: int, seed: int) -> torch.Tensor:
    """A permutation of groups x size channels that keeps every group together: whole groups
    shuffled, and channels shuffled inside each."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(groups, generator=g)
    return torch.cat([order[i] * size + torch.randperm(size, generator=g) for i in range(groups)])


def _permute_expansion(model: torch.nn.Module, perm: torch.Tensor) -> None:
    """Permute the channels of blocks.1.0's expansion conv and of every tensor that reads them:
    its group norm (8 groups of 8) and the projection conv's inputs."""
    block = model.blocks[1][0]
    with torch.no_grad():
        for t in (block.conv_exp.weight, block.bn1.weight, block.bn1.bias):
            t.copy_(t[perm])
        block.conv_pwl.weight.copy_(block.conv_pwl.weight[:, perm])


def test_a_group_preserving_swap_is_the_same_function_and_a_relabelled_graph():
    """In test_efficientnet_gn, permuting the expansion channels group by group (whole groups
    and channels inside them) keeps the function, and the permuted network's graph is the
    original with the channel and group nodes relabelled; moving one channel to another group
    changes the function, and the channel relabelling is then no longer a graph map."""
    model = _timm("test_efficientnet_gn", 0)
    graph = NetworkGraph.from_module(model, X)
    channels = next(b for b in graph.blocks if b.key == "blocks.1.0.conv_exp.weight").dst.reshape(-1)
    membership = next(b for b in graph.blocks if b.key is None and b.area == 0
                      and torch.equal(b.dst.reshape(-1), channels))
    assert membership.dst.shape == (8, 8)
    perm = _group_swap(8, 8, seed=0)
    permuted = _timm("test_efficientnet_gn", 0)
    _permute_expansion(permuted, perm)
    with torch.no_grad():
        torch.testing.assert_close(permuted(X), model(X), rtol=1e-5, atol=1e-5)
    sigma = torch.arange(graph.num_nodes)  # node of the permuted graph -> node of the original
    sigma[channels] = channels[perm]
    group_nodes = membership.src.reshape(-1)
    sigma[group_nodes] = group_nodes[perm.view(8, 8)[:, 0] // 8]
    data, data_p = graph.encode(model), graph.encode(permuted)
    assert not torch.equal(data_p.x, data.x)
    assert torch.equal(data_p.x, data.x[sigma])
    relabelled, original = edges(data_p, sigma), edges(data)
    assert relabelled.keys() == original.keys()
    assert all(torch.equal(relabelled[e], original[e]) for e in original)

    across = torch.arange(64)
    across[[0, 8]] = across[[8, 0]]  # channel 0 of group 0 and channel 0 of group 1 trade groups
    moved = _timm("test_efficientnet_gn", 0)
    _permute_expansion(moved, across)
    with torch.no_grad():
        assert not torch.allclose(moved(X), model(X), rtol=1e-3, atol=1e-3)
    sigma = torch.arange(graph.num_nodes)
    sigma[channels] = channels[across]
    assert edges(graph.encode(moved), sigma).keys() != original.keys()


def test_a_refused_timm_model_names_the_aten_op():
    """efficientvit_b0's linear attention (LiteMLA) chunks queries, keys and values out of
    channels a permute moved apart, which no handler models: refused there, naming the op and
    the module (its convolutions, norms and gates before it encode)."""
    with pytest.raises(UnsupportedArchitectureError) as info:
        NetworkGraph(_timm("efficientvit_b0", 0), X)
    message = str(info.value)
    assert "torch.fx:" in message and "torch.export: aten node 'chunk'" in message
    assert "operation aten.chunk.default" in message and "(LiteMLA)" in message


@pytest.mark.slow
@pytest.mark.parametrize("name", benchmark_module("census").TIMM_MODELS)
def test_timm_census_model_is_exact_or_refused_naming_the_operation(name: str) -> None:
    """The census's fixed timm list at each model's default input size: exact (bit-exact round
    trip, node swaps are symmetries) or refused with the fx node or ATen operation named; never
    wrong, never a crash. Models above 30M parameters are outside the census."""
    row = benchmark_module("census").census_one(f"timm:{name}", None, 2)
    if row["params_m"] > 30:
        pytest.skip(f"{row['params_m']}M parameters: outside the census")
    assert row["status"] in ("exact", "refused"), row
    if row["status"] == "refused":
        assert "fx node" in row["reason"] or "aten" in row["reason"], row["reason"]
