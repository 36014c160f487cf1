"""graph.Metanetwork on encoded networks: every parameter reached by the loss, the block message
passing against a per-edge oracle, channel gates against torch_pruning's groups, batching,
permutation equivariance, the untrained identity, the layout check."""
import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import output_gradients, random_prune, randomize
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

import networks
from graph import Metanetwork, NetworkGraph, edge_attr_key

X32 = torch.randn(1, 3, 32, 32)


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
