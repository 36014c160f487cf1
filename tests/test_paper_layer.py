"""The paper's metanetwork layer, its dense identity edges, and import of its weights (issue 12).

The oracle is a per-edge implementation written from the layer's specification (docs/graph.md,
"Metanetwork") with torch_geometric's MessagePassing and its mean/std/max/min aggregators, the
tools the paper's code uses; it shares nothing with the block computation in graph/.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import output_gradients, random_prune, randomize
from torch import nn
from torch_geometric.data import Data
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.aggr import VarAggregation

import networks
from graph import Metanetwork, NetworkGraph, PaperWeightsError, edge_attr_key

X32 = torch.randn(1, 3, 32, 32, dtype=torch.double)


class _OneDirection(MessagePassing):
    """Receiver t gets phi2[t] * phi1[s] * feature from each sender s (edge_index[0] = s);
    [mean, std, max, min] over t's messages, all 0 when it has none."""

    def __init__(self) -> None:
        super().__init__(aggr=["mean", "std", "max", "min"])

    def forward(self, phi1, phi2, edge_index, feature):
        return self.propagate(edge_index, s=phi1, r=phi2, feature=feature)

    def message(self, s_j, r_i, feature):
        return r_i * s_j * feature


def _paper_layers(h, e, src, dst, layers) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Node and edge states after the paper's layers; ``src``/``dst`` are each edge's input and
    output channel; ``layers`` yields (phi1, phi2, phi3, phi4, A) callables. Also returns how
    many (receiver, feature) message sets had a variance in (0, 1e-5), where std must be 0."""
    conv, tiny = _OneDirection(), 0
    for phi1, phi2, phi3, phi4, aggregate in layers:
        hid = h.shape[1]
        x = F.layer_norm(h, (hid,))
        sigma = torch.cat([torch.ones(hid // 2), -torch.ones(hid - hid // 2)]).to(h)
        out_to_in = conv(phi1(x), phi2(x), torch.stack([dst, src]), e)
        in_to_out = conv(phi1(x), phi2(x), torch.stack([src, dst]), sigma * e)
        var = VarAggregation()(phi2(x)[src] * phi1(x)[dst] * e, src, dim_size=h.shape[0])
        tiny += int(((var > 1e-12) & (var < 1e-5)).sum())
        h = h + aggregate(out_to_in) + aggregate(in_to_out)
        e = e + (phi3(x)[dst] * phi4(x)[src] + phi3(x)[src] * phi4(x)[dst]) * e
    return h, e, tiny


def _our_layers(meta: Metanetwork):
    for layer in meta.layers:
        hid = layer.hidden
        yield (lambda x, m=layer, h=hid: m.phi_msg(x)[:, :h], lambda x, m=layer, h=hid: m.phi_msg(x)[:, h:],
               lambda x, m=layer, h=hid: m.phi_edge(x)[:, :h], lambda x, m=layer, h=hid: m.phi_edge(x)[:, h:],
               layer.aggregate)


def _oracle(meta: Metanetwork, data: Data) -> tuple[dict, int]:
    src, dst = data.edge_index
    h = meta.node_encoder(data.x)
    e = torch.zeros(src.shape[0], h.shape[1], dtype=h.dtype)
    for a in meta.edge_types:
        e[data.edge_type == a] = meta.edge_encoders[str(a)](data[edge_attr_key(a)])
    h, e, tiny = _paper_layers(h, e, src, dst, _our_layers(meta))
    out = {"x": data.x + meta.node_res_ratio * meta.node_decoder(h) * meta.node_update_mask}
    for a in meta.edge_types:
        key = edge_attr_key(a)
        out[key] = data[key] + meta.edge_res_ratio * meta.edge_decoders[str(a)](
            e[data.edge_type == a])
    return out, tiny


class _ConcatGrouped(nn.Module):
    """Channel concat, a grouped conv, a depthwise conv with bias (one message per output
    channel in one direction) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 6, 3, groups=2, bias=False)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = self.depthwise(F.relu(self.grouped(y)))
        return self.fc(y.mean((2, 3)))


def _resnet20() -> nn.Module:
    return random_prune(networks.build("resnet20_cifar", 10, width=0.5), X32.float(), 0.3, seed=0)


CASES = {"resnet20-dense": (_resnet20, "dense"), "resnet20-diagonal": (_resnet20, "diagonal"),
         "concat-grouped": (_ConcatGrouped, "diagonal"), "tiny-messages": (_resnet20, "dense")}


@pytest.mark.parametrize("case", list(CASES))
def test_paper_layer_equals_the_per_edge_oracle(case):
    torch.manual_seed(0)
    build, identity_edges = CASES[case]
    model = randomize(build()).double()
    graph = NetworkGraph.from_module(model, X32, identity_edges=identity_edges)
    meta = Metanetwork.for_graph(graph, num_layers=3, hidden=15, node_res_ratio=1.0,
                                 edge_res_ratio=1.0, zero_init_decoders=False).double()
    assert meta.message_passing == "paper"
    if case == "tiny-messages":  # phi1, phi2 near SiLU(-9): messages ~1e-4, variances < 1e-5
        with torch.no_grad():
            meta.layers[0].phi_msg[0].weight.mul_(1e-3)
            meta.layers[0].phi_msg[0].bias.fill_(-9.0)
    data = graph.encode(model)
    fast = meta(data)
    expected, tiny = _oracle(meta, data)
    assert tiny > 0  # the std threshold is exercised
    for key, value in expected.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", ["resnet20-dense", "tiny-messages"])
def test_paper_layer_gradients_equal_the_per_edge_oracle_on_dense_identity_blocks(case):
    """The block computation with its hand-written backward (graph.block_statistics.PaperBlock,
    ScatterExtreme) against autograd through the per-edge oracle, in float64,
    on a graph whose identity blocks are dense (zero features off the diagonal)."""
    torch.manual_seed(0)
    model = randomize(_resnet20()).double()
    graph = NetworkGraph.from_module(model, X32, identity_edges="dense")
    meta = Metanetwork.for_graph(graph, num_layers=3, hidden=15, node_res_ratio=1.0,
                                 edge_res_ratio=1.0, zero_init_decoders=False).double()
    if case == "tiny-messages":  # variances below 1e-5: std and its gradient are 0
        with torch.no_grad():
            meta.layers[0].phi_msg[0].weight.mul_(1e-3)
            meta.layers[0].phi_msg[0].bias.fill_(-9.0)
    data = graph.encode(model)
    data.x.requires_grad_()
    for a in graph.edge_types:
        data[edge_attr_key(a)].requires_grad_()
    fast = meta(data)
    expected, tiny = _oracle(meta, data)
    assert graph.num_identity_edges > 0 and tiny > 0  # the std threshold is exercised
    for key, value in expected.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(output_gradients(meta, data, {k: fast[k] for k in expected}),
                            output_gradients(meta, data, expected)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * theirs.abs().max())


def test_scatter_max_and_min_share_a_tied_gradient_as_torch_geometric_does():
    from torch_geometric.utils import scatter

    from graph.block_statistics import ScatterExtreme

    # ties for the max of receiver 0 in both columns; no extreme is exactly 0, where torch's
    # scatter_reduce backward also counts the initial zero as a tie (include_self=False)
    src = torch.tensor([[1.0, 2.0], [1.0, -3.0], [0.5, 2.0], [5.0, 5.0]], dtype=torch.double,
                       requires_grad=True)
    index, grad = torch.tensor([0, 0, 0, 2]), torch.randn(3, 2, dtype=torch.double)
    for reduce in ("max", "min"):
        ours = ScatterExtreme.apply(src, index, 3, reduce)
        theirs = scatter(src, index, 0, 3, reduce=reduce)
        assert torch.equal(ours, theirs)
        torch.testing.assert_close(*(torch.autograd.grad(out, src, grad)[0]
                                     for out in (ours, theirs)), rtol=1e-15, atol=0)


def test_paper_and_joint_layers_compute_different_functions():
    model = randomize(_resnet20()).double()
    graph = NetworkGraph.from_module(model, X32)
    data = graph.encode(model)
    outputs = []
    for variant in ("paper", "joint"):
        torch.manual_seed(0)  # same parameters for both
        meta = Metanetwork.for_graph(graph, num_layers=2, hidden=8, node_res_ratio=1.0,
                                     edge_res_ratio=1.0, zero_init_decoders=False,
                                     message_passing=variant).double()
        outputs.append(meta(data).x)
    assert not torch.allclose(*outputs, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet56_cifar", "resnet110_cifar"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_dense_identity_edges_round_trip_bit_exact(name, pruned):
    model = networks.build(name, 10)
    if pruned:
        random_prune(model, X32.float(), ratio=0.4, seed=1)
    model = randomize(model)
    state = model.state_dict()
    dense = NetworkGraph.from_module(model, X32.float(), identity_edges="dense")
    diagonal = NetworkGraph.from_module(model, X32.float())
    decoded = dense.decode(dense.encode(state))
    assert set(decoded) == {k for k, v in state.items() if v.is_floating_point()}
    assert all(torch.equal(decoded[k], state[k]) for k in decoded)
    # every identity block of C channels becomes C x C edges; only i -> i carries the Dirac tap
    widths = [b.src.shape[0] for b in diagonal.blocks if b.key is None]
    assert dense.num_identity_edges == sum(c * c for c in widths)
    identity = torch.cat([dense.encode(state)[edge_attr_key(9)][b.start:b.start + b.rows]
                          for b in dense.blocks if b.key is None])
    centre = torch.cat([torch.eye(c).reshape(-1) for c in widths])
    expected = torch.zeros(len(centre), 9)
    expected[:, 4] = centre
    assert torch.equal(identity, expected)
    assert dense.layout["identity_edges"] == "dense" != diagonal.layout["identity_edges"]


# -- the paper's own weights ----------------------------------------------------------------

def _paper_state_dict(node_cols: int, hidden: int, num_layers: int, seed: int = 0) -> dict:
    """Random weights under the names and shapes of the paper's MyGNN (CIFAR: 9-wide edges)."""
    g = torch.Generator().manual_seed(seed)

    def linear(name, fan_in, fan_out):
        return {f"{name}.weight": torch.randn(fan_out, fan_in, generator=g, dtype=torch.double)
                / fan_in ** 0.5,
                f"{name}.bias": 0.1 * torch.randn(fan_out, generator=g, dtype=torch.double)}

    sd = {**linear("nodeEnc", node_cols, hidden), **linear("edgeEnc", 9, hidden),
          **linear("edgeDec.1", hidden, hidden), **linear("edgeDec.3", hidden, 9),
          **linear("nodeDec.1", hidden, hidden), **linear("nodeDec.3", hidden, node_cols)}
    for i in range(num_layers):
        for lin in ("lin1", "lin2", "lin3", "lin4"):
            sd.update(linear(f"convs.{i}.{lin}.0", hidden, hidden))
        sd.update(linear(f"convs.{i}.downlin", 4 * hidden, hidden))
        sd.update(linear(f"mlps.{i}.0", hidden, hidden))  # unused by the paper's forward
    sd["edgeInverter"] = torch.cat([torch.ones(hidden // 2), -torch.ones((hidden + 1) // 2)]).double()
    return sd


def _paper_function(sd: dict, x: torch.Tensor, src, dst, e9: torch.Tensor, ratio: float):
    """The paper's MyGNN on its own encoding (node columns ``x``, 9-wide edge features)."""
    def lin(name, t):
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def decoder(name, t):
        return lin(f"{name}.3", F.silu(lin(f"{name}.1", F.layer_norm(t, t.shape[1:]))))

    layers = [(*(lambda t, n=f"convs.{i}.{k}.0": F.silu(lin(n, t))
                 for k in ("lin1", "lin2", "lin3", "lin4")),
               lambda t, n=f"convs.{i}.downlin": lin(n, t))
              for i in range(len({k.split(".")[1] for k in sd if k.startswith("convs.")}))]
    h, e, _ = _paper_layers(lin("nodeEnc", x), lin("edgeEnc", e9), src, dst, layers)
    return x + ratio * decoder("nodeDec", h), e9 + ratio * decoder("edgeDec", e)


def _vgg() -> nn.Module:
    return networks.build("vgg19_bn_cifar", 10, width=0.125)


@pytest.mark.parametrize("build,identity_edges,paper_cols", [
    (_resnet20, "dense", 8), (_vgg, "diagonal", 5)], ids=["resnet20", "vgg19"])
def test_converted_paper_weights_compute_the_papers_function(build, identity_edges, paper_cols):
    model = randomize(build()).double()
    graph = NetworkGraph.from_module(model, X32, identity_edges=identity_edges)
    sd = _paper_state_dict(paper_cols, hidden=12, num_layers=2)
    meta = Metanetwork.from_paper_state_dict(sd, graph, node_res_ratio=0.5,
                                             edge_res_ratio=0.5).double()
    data = graph.encode(model)
    # the paper's encoding of the same network: biases in column 1 (ResNet), 1x1 and Linear
    # weights in the centre tap of a 3x3 feature
    x = data.x[:, :paper_cols].clone()
    if paper_cols < graph.node_dim:
        x[:, 1] += data.x[:, -1]
    e9 = torch.zeros(data.edge_index.shape[1], 9, dtype=torch.double)
    for a in graph.edge_types:
        e9[data.edge_type == a, 4 if a == 1 else slice(None)] = data[edge_attr_key(a)].squeeze(1)
    node_pred, edge_pred = _paper_function(sd, x, *data.edge_index, e9, ratio=0.5)
    expected = data.clone()
    expected.x = torch.cat([node_pred, node_pred[:, 1:2]], 1)[:, :graph.node_dim]
    stats = list(graph.running_stat_columns)  # the paper's decode drops their updates
    expected.x[:, stats] = data.x[:, stats]
    for a in graph.edge_types:
        rows = edge_pred[data.edge_type == a]
        expected[edge_attr_key(a)] = rows[:, 4:5] if a == 1 else rows
    with torch.no_grad():
        ours = graph.decode(meta(data))
    for key, value in graph.decode(expected).items():
        torch.testing.assert_close(ours[key], value, rtol=1e-9, atol=1e-9, msg=key)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("convs.1.lin3.0.bias"),
     r"missing key 'convs.1.lin3.0.bias' \(expected shape \[12\]\)"),
    (lambda sd: sd.update({"convs.0.downlin.weight": torch.zeros(12, 12)}),
     r"'convs.0.downlin.weight' has shape \[12, 12\], expected \[12, 48\]"),
    (lambda sd: sd.update({"edgeEnc_49.weight": torch.zeros(12, 49)}),
     r"unexpected keys \['edgeEnc_49.weight'\]"),
    (lambda sd: sd.update({"nodeEnc.weight": torch.zeros(12, 6)}), "reads 6 node columns; this graph has 9"),
    (lambda sd: sd["edgeInverter"].neg_(), "edgeInverter"),
])
def test_paper_state_dicts_that_do_not_fit_are_refused_naming_the_key(edit, message):
    graph = NetworkGraph.from_module(_resnet20(), X32.float(), identity_edges="dense")
    sd = _paper_state_dict(8, hidden=12, num_layers=2)
    edit(sd)
    with pytest.raises(PaperWeightsError, match=message):
        Metanetwork.from_paper_state_dict(sd, graph, 0.01, 0.01)


def test_import_paper_command_writes_a_checkpoint_that_run_and_select_load(tmp_path, capsys):
    from lightning_modules import load_metanetwork
    from pipeline.cli import cli

    sd = {k: v.float() for k, v in _paper_state_dict(8, hidden=12, num_layers=2).items()}
    torch.save(sd, tmp_path / "paper.pth")
    argv = ["import_paper", "--state_dict", str(tmp_path / "paper.pth"), "--arch",
            "resnet20_cifar", "--num_classes", "10", "--identity_edges", "dense",
            "--node_res_ratio", "0.01", "--edge_res_ratio", "0.02",
            "--out", str(tmp_path / "paper.ckpt")]
    assert cli(argv) == 0
    loaded = load_metanetwork(tmp_path / "paper.ckpt")
    model = randomize(networks.build("resnet20_cifar", 10))
    graph = NetworkGraph.from_module(model, X32.float(), identity_edges="dense")
    direct = Metanetwork.from_paper_state_dict(sd, graph, 0.01, 0.02)
    assert loaded.message_passing == "paper" and loaded.graph_options.identity_edges == "dense"
    data = graph.encode(model)
    with torch.no_grad():
        expected, got = direct(data), loaded(data)
    assert torch.equal(got.x, expected.x) and torch.equal(got.edge_attr_9, expected.edge_attr_9)
    # a state_dict for another architecture's node layout is refused in one line, nothing written
    sd["nodeEnc.weight"] = torch.zeros(12, 5)
    torch.save(sd, tmp_path / "vgg.pth")
    argv[2], argv[-1] = str(tmp_path / "vgg.pth"), str(tmp_path / "vgg.ckpt")
    assert cli(argv) == 2
    assert "vgg.pth' does not fit 'resnet20_cifar'" in capsys.readouterr().err
    assert not (tmp_path / "vgg.ckpt").exists()


def test_feedforward_builds_the_graph_with_the_metanetworks_identity_layout():
    from graph import feedforward

    model = randomize(networks.build("resnet20_cifar", 10, width=0.25))
    dense = NetworkGraph.from_module(model, X32.float(), identity_edges="dense")
    torch.manual_seed(0)
    meta = Metanetwork.for_graph(dense, num_layers=2, hidden=8, zero_init_decoders=False,
                                 node_res_ratio=0.5, edge_res_ratio=0.5).eval()
    with torch.no_grad():
        expected = dense.decode(meta(dense.encode(model)))
    feedforward(meta, model, X32.float())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_checkpoints_from_before_the_option_load_as_the_joint_layer(tmp_path):
    from lightning_modules import MetaPruningModule, load_metanetwork

    graph = NetworkGraph.from_module(networks.build("resnet20_cifar", 10), X32.float())
    module = MetaPruningModule(num_layers=1, hidden=8, layout=graph.layout)
    hparams = {k: v for k, v in module.hparams.items()
               if k not in ("message_passing", "identity_edges")}
    hparams["layout"] = {k: v for k, v in graph.layout.items() if k != "identity_edges"}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.0"}, tmp_path / "old.ckpt")
    meta = load_metanetwork(tmp_path / "old.ckpt")
    assert meta.message_passing == "joint" and meta.graph_options.identity_edges == "diagonal"
    meta.check_layout(graph)
