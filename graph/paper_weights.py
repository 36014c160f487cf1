"""Import the paper's own metanetwork weights (arXiv:2506.12041, its code's ``MyGNN``).

The paper's code saves its GNN as a module with parameters

    nodeEnc                       Linear(node columns, H)
    edgeEnc | edgeEnc_<k>         Linear(9, H) for the CIFAR nets (1x1 convs and Linear weights
                                  sit in the centre tap, index 4, of a 3x3 feature), or one
                                  Linear(k, H) per kernel area k (ResNet-50: 49, 9, 1)
    convs.<l>.lin1 .. lin4        Sequential(Linear(H, H), SiLU): phi1 .. phi4
    convs.<l>.downlin             Linear(4H, H): A
    edgeDec | edgeDec_<k>, nodeDec  Sequential(LayerNorm, Linear, SiLU, Linear)
    edgeInverter                  buffer: sigma
    mlps.<l>                      created but never used in its forward (ignored here)

Its node columns are ours except for the CIFAR ResNets (and ResNet-50), where the classifier's
bias shares column 1 with the BN bias (8 columns: [BN weight, bias, mean, var, shortcut-BN
weight, bias, mean, var]) while our layout gives biases a column of their own. Columns that a
node does not use hold the same defaults in both encodings (BN (1, 0, 0, 1), bias 0), so folding
our bias column onto column 1 is a linear map of the encoder's input and the decoder's output,
exact wherever no node has both a BN and a bias.
"""
from __future__ import annotations

import re
from typing import Mapping, cast

import torch

from metaprune.errors import UserError

from .metanetwork import Metanetwork
from .network_graph import NetworkGraph

_UNUSED = re.compile(r"mlps\.\d+\.0\.(weight|bias)")
_LAYER_KEY = re.compile(r"convs\.(\d+)\.")


class PaperWeightsError(UserError):
    """A paper-format state_dict that cannot be mapped onto our metanetwork for this graph."""


def _encoder_key(state: Mapping[str, torch.Tensor], prefix: str, area: int) -> tuple[str, int]:
    """(key prefix, feature width) of the paper's encoder/decoder serving kernel area ``area``."""
    if f"{prefix}_{area}.weight" in state or f"{prefix}_{area}.3.weight" in state:
        return f"{prefix}_{area}", area
    if f"{prefix}.weight" in state or f"{prefix}.3.weight" in state:
        return prefix, 9  # the CIFAR nets' single 3x3-wide encoder and decoder
    raise PaperWeightsError(f"no {prefix!r} for kernel area {area}: expected {prefix}.* (3x3-wide) "
                            f"or {prefix}_{area}.*")


def _columns(width: int, area: int, where: str) -> slice:
    """Feature columns of a kernel of ``area`` taps in a paper feature ``width`` taps wide."""
    if area == width:
        return slice(0, width)
    if area == 1:  # 1x1 convs and Linear weights: the centre tap
        return slice(width // 2, width // 2 + 1)
    raise PaperWeightsError(f"{where}: a {width}-wide paper feature cannot hold kernels of area "
                            f"{area}; this graph needs {where}_{area}")


def _node_map(graph: NetworkGraph, paper_dim: int) -> torch.Tensor:
    """Paper column of each of our node columns."""
    ours = graph.node_dim
    if paper_dim == ours:
        return torch.arange(ours)
    columns = graph.columns
    # our columns: the BN slots, then the bias slot last (registration order of the kinds)
    if not (paper_dim == ours - 1 and [k for k, _ in columns.counts] == ["bn", "bias"]
            and columns.slots("bias") == 1):
        raise PaperWeightsError(
            f"nodeEnc.weight reads {paper_dim} node columns; this graph has {ours} "
            f"({columns.layout()}). Only the same layout or the paper's ResNet layout (BN slots "
            "and one bias slot, biases in column 1, one column fewer) can be mapped")
    bias_col, bn_bias_col = columns.column("bias", 0, "bias"), columns.column("bn", 0, "bias")
    filled = graph.filled_node_columns()
    if (filled[:, bn_bias_col] & filled[:, bias_col]).any():
        raise PaperWeightsError("a node has both a BN and a bias: the paper's layout keeps both in "
                                "column 1, so its features cannot be mapped onto this graph")
    return torch.cat([torch.arange(paper_dim), torch.tensor([bn_bias_col])])


def _expect(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state:
        raise PaperWeightsError(f"missing key {key!r} (expected shape {list(shape)})")
    value = state[key]
    if tuple(value.shape) != tuple(shape):
        raise PaperWeightsError(f"{key!r} has shape {list(value.shape)}, expected {list(shape)}")
    return value


def from_paper_state_dict(state_dict: Mapping[str, torch.Tensor], graph: NetworkGraph,
                          node_res_ratio: float, edge_res_ratio: float) -> Metanetwork:
    """A ``Metanetwork`` (paper message passing) computing the paper's metanetwork on ``graph``.

    ``graph`` must use the identity-edge layout the paper used for this architecture ("dense"
    for the CIFAR ResNets, "diagonal" for ResNet-50). BN running statistics stay as they are
    (the paper's decode drops their updates too). Refuses missing, extra or misshapen keys and
    node layouts it cannot map, naming the key and the expected shape."""
    state = dict(state_dict)
    encoder = state.get("nodeEnc.weight")
    if not isinstance(encoder, torch.Tensor) or encoder.dim() != 2:
        raise PaperWeightsError("missing key 'nodeEnc.weight' (expected shape [hidden, node "
                                "columns]): is this the state_dict of the paper's MyGNN?")
    hidden, paper_dim = encoder.shape
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))})
    if layers != list(range(len(layers))) or not layers:
        raise PaperWeightsError(f"convs.<l> layers {layers}: expected convs.0 .. convs.L-1")
    columns = _node_map(graph, paper_dim)
    meta = Metanetwork.for_graph(graph, num_layers=len(layers), hidden=hidden,
                                 node_res_ratio=node_res_ratio, edge_res_ratio=edge_res_ratio,
                                 zero_init_decoders=False, message_passing="paper"
                                 ).to(encoder.dtype)
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        used.add(key)
        return _expect(state, key, shape).detach()

    ours: dict[str, torch.Tensor] = {
        "node_encoder.weight": take("nodeEnc.weight", (hidden, paper_dim))[:, columns],
        "node_encoder.bias": take("nodeEnc.bias", (hidden,)),
        "node_decoder.1.weight": take("nodeDec.1.weight", (hidden, hidden)),
        "node_decoder.1.bias": take("nodeDec.1.bias", (hidden,)),
        "node_decoder.3.weight": take("nodeDec.3.weight", (paper_dim, hidden))[columns],
        "node_decoder.3.bias": take("nodeDec.3.bias", (paper_dim,))[columns],
    }
    for area in graph.edge_types:
        enc, width = _encoder_key(state, "edgeEnc", area)
        dec, _ = _encoder_key(state, "edgeDec", area)
        cols = _columns(width, area, enc)
        ours[f"edge_encoders.{area}.weight"] = take(f"{enc}.weight", (hidden, width))[:, cols]
        ours[f"edge_encoders.{area}.bias"] = take(f"{enc}.bias", (hidden,))
        ours[f"edge_decoders.{area}.1.weight"] = take(f"{dec}.1.weight", (hidden, hidden))
        ours[f"edge_decoders.{area}.1.bias"] = take(f"{dec}.1.bias", (hidden,))
        ours[f"edge_decoders.{area}.3.weight"] = take(f"{dec}.3.weight", (width, hidden))[cols]
        ours[f"edge_decoders.{area}.3.bias"] = take(f"{dec}.3.bias", (width,))[cols]
    for layer in layers:
        p = f"convs.{layer}"
        for mine, (first, second) in (("phi_msg", ("lin1", "lin2")), ("phi_edge", ("lin3", "lin4"))):
            for kind, shape in (("weight", (hidden, hidden)), ("bias", (hidden,))):
                ours[f"layers.{layer}.{mine}.0.{kind}"] = torch.cat(
                    [take(f"{p}.{first}.0.{kind}", shape), take(f"{p}.{second}.0.{kind}", shape)])
        ours[f"layers.{layer}.aggregate.weight"] = take(f"{p}.downlin.weight", (hidden, 4 * hidden))
        ours[f"layers.{layer}.aggregate.bias"] = take(f"{p}.downlin.bias", (hidden,))
    sign = take("edgeInverter", (hidden,))
    if not torch.equal(sign, cast(torch.Tensor, meta.layers[0].sign).to(sign.dtype)):
        raise PaperWeightsError("edgeInverter is not +1 on the first H//2 features and -1 on the "
                                "rest, the sign vector of the paper's layer")
    extra = sorted(k for k in state if k not in used and not _UNUSED.fullmatch(k))
    if extra:
        raise PaperWeightsError(f"unexpected keys {extra[:5]} ({len(extra)} in all): not part of "
                                "the paper's metanetwork for this graph's kernel areas "
                                f"{list(graph.edge_types)}")
    meta.load_state_dict(ours)
    return meta
