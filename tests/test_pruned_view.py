"""The pruned view of meta-training (issue 13): the channels it removes, the network it computes,
the gradient it adds."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import randomize
from torch import nn

import networks
from lightning_modules import MetaPruningModule
from metaprune.errors import UserError
from objective import PrunedView, weight_gradients
from objective.pruned_view import batch_statistics, lowest_channel_masks, masked

X32 = torch.randn(2, 3, 32, 32)


def _network() -> nn.Module:
    return randomize(networks.build("resnet8_cifar", 3, width=0.5)).double().eval()


def _removed(pruner, masks) -> list[torch.Tensor]:
    """Per group of ``pruner``, a boolean per channel: removed by ``masks`` (read at the root)."""
    return [masks[g[0].dep.target.module] == 0 if g[0].dep.target.module in masks
            else torch.zeros(len(pruner.estimate_importance(g)), dtype=torch.bool)
            for g in pruner._groups]


def test_the_view_removes_the_lowest_ranked_share_of_channels():
    model = _network()
    pruner = networks.criterion_pruner(model, X32.double())
    masks = lowest_channel_masks(pruner, 0.3)
    scores = [pruner.estimate_importance(g) for g in pruner._groups]
    removed = _removed(pruner, masks)
    flat_scores, flat_removed = torch.cat(scores), torch.cat(removed)
    assert int(flat_removed.sum()) == int(0.3 * len(flat_scores))  # random weights: no ties
    assert flat_scores[flat_removed].max() < flat_scores[~flat_removed].min()
    assert all((~r).any() for r in removed)  # no layer emptied
    assert lowest_channel_masks(pruner, 0.001) == {}  # under one channel: nothing


def test_a_group_keeps_its_best_channel_when_all_rank_below_the_cut():
    model = _network()
    pruner = networks.criterion_pruner(model, X32.double())
    masks = lowest_channel_masks(pruner, 0.99)
    for removed, group in zip(_removed(pruner, masks), pruner._groups):
        kept = (~removed).nonzero().flatten().tolist()
        assert kept == [int(pruner.estimate_importance(group).argmax())]


def test_the_masked_network_computes_what_torch_pruning_leaves():
    model = _network()
    pruner = networks.criterion_pruner(model, X32.double())
    masks = lowest_channel_masks(pruner, 0.4)
    with masked(masks), torch.no_grad():
        ours = model(X32.double())
    # the oracle: a copy pruned for real, the same root channels of every group
    pruned = copy.deepcopy(model)
    other = networks.criterion_pruner(pruned, X32.double())
    for twin, removed in zip(other._groups, _removed(pruner, masks)):
        if removed.any():
            root = twin[0].dep
            other.DG.get_pruning_group(root.target.module, root.handler,
                                       removed.nonzero().flatten().tolist()).prune()
    assert networks.count_params(pruned) < networks.count_params(model)
    with torch.no_grad():
        torch.testing.assert_close(ours, pruned(X32.double()))
        assert not torch.allclose(ours, model(X32.double()))  # the hooks are gone after


def test_batch_statistics_normalize_per_batch_and_keep_the_running_ones():
    norm = nn.BatchNorm2d(4).double().eval()
    randomize(norm)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(5, 4, 3, 3, dtype=torch.double)
    with batch_statistics(norm):
        out = norm(x)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = ((x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1)
                + norm.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(out, expected)
    assert not norm.training
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_view_adds_the_gradient_of_the_loss_with_pruned_weights_zeroed():
    torch.manual_seed(0)
    model = _network()
    weights = {k: v.detach().clone().requires_grad_("running" not in k)
               for k, v in model.state_dict().items() if v.is_floating_point()}
    images, labels = torch.randn(2, 6, 3, 32, 32, dtype=torch.double), torch.randint(0, 3, (2, 6))
    work = copy.deepcopy(model)
    pruner = networks.criterion_pruner(work, X32.double(), reg=0.0)
    view = PrunedView(weight=0.5, fraction=(0.3, 0.3))
    _, _, grads = weight_gradients(work, {k: v.detach() for k, v in weights.items()}, images,
                                   labels, pruner, 16.0, view=view)

    # the oracle: every weight of a removed channel multiplied by 0 (no hooks), batch statistics
    masks = {name: mask for name, layer in work.named_modules()
             for mask in [lowest_channel_masks(pruner, 0.3).get(layer)] if mask is not None}
    trained = copy.deepcopy(model).train()
    total = 0.0
    for x, y in zip(images, labels):
        total = total + F.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)
        zeroed = {k: w for k, w in weights.items() if w.requires_grad}  # train mode: own buffers
        for name, mask in masks.items():
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in zeroed:
                    zeroed[key] = zeroed[key] * mask.view(-1, *[1] * (zeroed[key].dim() - 1))
        out = torch.func.functional_call(trained, zeroed, (x,))
        total = total + 0.5 * F.cross_entropy(out, y)
    total.backward()
    assert masks
    for name, w in weights.items():
        if w.requires_grad:
            torch.testing.assert_close(grads[name], w.grad, msg=name)


@pytest.mark.parametrize("kwargs", [{"pruned_view": -1.0}, {"pruned_fraction": [0.5, 0.2]},
                                    {"pruned_fraction": [0.0, 0.3]},
                                    {"pruned_fraction": [0.1, 0.2, 0.3]}])
def test_bad_pruned_view_settings_are_refused_with_the_key(kwargs):
    with pytest.raises(UserError, match="pruned_view / pruned_fraction"):
        MetaPruningModule(**kwargs)
