"""Fast progressive pruning (issue 5): the empty-batch MAC counter equals torch_pruning's at
every step, and prune_to_speed_up removes exactly the channels of the plain loop."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import networks
from datamodules.zoo_manifest import widths
from networks.pruning import _checked_counter

X32 = torch.zeros(1, 3, 32, 32)


@pytest.mark.parametrize("name", ["resnet56", "mobilenet_v2"])
def test_fast_mac_count_equals_torch_pruning_at_every_step(name):
    torch.manual_seed(0)
    model = (networks.build("resnet56_cifar", 10) if name == "resnet56"
             else torchvision.models.mobilenet_v2(num_classes=10)).eval()
    pruner = networks.criterion_pruner(model, X32, iterative_steps=12)
    seen = set()
    for _ in range(10):  # up to 83% of the channels: many different shapes
        macs = networks.count_macs(model, X32)
        assert networks.count_macs_fast(model, X32) == macs
        seen.add(macs)
        pruner.step()
    assert len(seen) == 10
    # a batch of several images counts per image, as torch_pruning does
    x4 = torch.zeros(4, 3, 32, 32)
    assert networks.count_macs_fast(model, x4) == networks.count_macs(model, x4)


def plain_loop(model, example, target, base, steps):
    """The specification: a pruner step, then torch_pruning's counter, until the target."""
    pruner = networks.criterion_pruner(model, example, steps)
    history = []
    for _ in range(steps):
        pruner.step()
        history.append(base / networks.count_macs(model, example))
        if history[-1] >= target:
            return history
    raise AssertionError("unreachable")


@pytest.mark.parametrize("target", [1.7, 2.5])
def test_same_channels_as_the_plain_loop(target):
    torch.manual_seed(1)
    model = networks.build("resnet20_cifar", 10, width=0.5).eval()
    base = networks.count_macs(model, X32)
    ref = copy.deepcopy(model)
    history = plain_loop(ref, X32, target, base, 50)
    reached = networks.prune_to_speed_up(model, X32, target, base, iterative_steps=50)
    assert widths(model) == widths(ref)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    assert reached == history[-1] >= target  # reached ...
    assert len(history) > 1 and history[-2] < target  # ... by the first step that reaches it
    assert reached == base / networks.count_macs(model, X32)
    torch.manual_seed(1)  # the reference path of the same function agrees as well
    plain = networks.build("resnet20_cifar", 10, width=0.5).eval()
    assert networks.prune_to_speed_up(plain, X32, target, base, 50,
                                      mac_counter=networks.count_macs) == reached
    assert widths(plain) == widths(ref)


class _ConcatNet(nn.Module):
    """Concatenated branches and a flatten over 4x4 positions: torch_pruning's concat and
    reshape index mappings change with every pruning step."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(20, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = self.c(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("target", [1.5, 3.0])
def test_same_channels_as_the_plain_loop_through_concat_and_flatten(target):
    torch.manual_seed(2)
    model = _ConcatNet().eval()
    base = networks.count_macs(model, X32)
    ref = copy.deepcopy(model)
    history = plain_loop(ref, X32, target, base, 40)
    assert networks.prune_to_speed_up(model, X32, target, base, iterative_steps=40) == history[-1]
    assert widths(model) == widths(ref)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    assert model(X32).shape == (1, 10)


def test_errors_are_unchanged():
    model = networks.build("resnet20_cifar", 10, width=0.25).eval()
    base = networks.count_macs(model, X32)
    with pytest.raises(ValueError, match="not above the network's current speed-up"):
        networks.prune_to_speed_up(model, X32, 1.0, base)
    with pytest.raises(ValueError, match="unreachable: 2 pruning steps"):
        networks.prune_to_speed_up(model, X32, 50.0, base, iterative_steps=2)


class _ViewNet(nn.Module):
    """Flattens with x.view(x.size(0), -1): cannot run on an empty batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc = nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Linear(16 * 64, 3)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(x.view(x.size(0), -1))


def test_falls_back_to_torch_pruning_when_the_forward_needs_a_real_batch():
    torch.manual_seed(0)
    model = _ViewNet().eval()
    x = torch.randn(1, 3, 16, 16)
    assert _checked_counter(model, x, networks.count_macs(model, x)) is networks.count_macs
    ref = copy.deepcopy(model)
    base = networks.count_macs(model, x)
    plain_loop(ref, x, 1.5, base, 20)
    networks.prune_to_speed_up(model, x, 1.5, base, iterative_steps=20)
    assert widths(model) == widths(ref)


def test_regularize_leaves_out_a_one_channel_group_and_matches_torch_pruning_elsewhere():
    """DepGraph's strength alpha ** ((max - imp) / (max - min)) is 0/0 for a layer pruned to one
    channel; torch_pruning then writes NaN into the gradients. Ours leaves that group out and
    adds exactly the library's gradient everywhere else."""
    import torch_pruning as tp
    from pruning_helpers import prune_out_channels, randomize

    torch.manual_seed(0)
    model = networks.build("resnet20_cifar", 10, width=0.5)
    prune_out_channels(model, X32, model.layer1[0].conv1, keep=1)
    model = randomize(model)
    grads = {}
    for name, make in (("ours", networks.criterion_pruner),
                       ("library", lambda m, x, **kw: tp.pruner.GroupNormPruner(
                           m, x, importance=tp.importance.GroupMagnitudeImportance(
                               p=2, group_reduction="mean", normalizer="max"),
                           global_pruning=True, pruning_ratio=1.0, iterative_steps=200,
                           ignored_layers=[networks.classifier_layer(m, x)], **kw))):
        work = copy.deepcopy(model)
        pruner = make(work, X32, reg=1e-3, alpha=16.0)
        for p in work.parameters():
            p.grad = torch.zeros_like(p)
        pruner.regularize(work, alpha=16.0, bias=False)
        grads[name] = {k: p.grad for k, p in work.named_parameters()}
    broken = {k for k, g in grads["library"].items() if not torch.isfinite(g).all()}
    assert broken == {"layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight"}
    for key, g in grads["ours"].items():
        if key in broken:
            assert torch.isfinite(g).all(), key
        else:
            assert torch.equal(g, grads["library"][key]), key



def test_a_per_layer_cap_stops_pruning_a_layer_once_it_is_below_its_floor():
    """``max_pruning_ratio`` r: a layer narrower than (1 - r) of its width when the pruner was
    built never loses another channel (torch_pruning's rule: its group leaves the ranking), while
    the uncapped criterion keeps narrowing such layers on the same weights."""
    torch.manual_seed(0)
    model = networks.build("resnet20_cifar", 10, width=0.5).eval()
    with torch.no_grad():  # uneven channel norms: global ranking empties whole layers
        for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
            conv.weight.mul_(torch.rand(conv.weight.shape[0], 1, 1, 1) ** 3)

    def widths(net: nn.Module) -> list[int]:
        return [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]

    floor = [0.5 * w for w in widths(model)]

    def narrowed_below_floor(cap: float) -> tuple[int, int]:
        """Steps (of 120) that removed channels of a layer already below its floor, and the
        channels left."""
        work = copy.deepcopy(model)
        pruner = networks.criterion_pruner(work, X32, iterative_steps=200, max_pruning_ratio=cap)
        count = 0
        for _ in range(120):  # to 60% of the channels
            before = widths(work)
            pruner.step()
            count += any(b < f and a < b for a, b, f in zip(widths(work), before, floor))
        return count, sum(widths(work))

    assert narrowed_below_floor(1.0)[0] > 0
    steps, left = narrowed_below_floor(0.5)
    assert steps == 0 and left < 0.8 * sum(widths(model))  # the capped pruner still prunes
    with pytest.raises(ValueError, match=r"max_pruning_ratio=0 must be in \(0, 1\]"):
        networks.criterion_pruner(model, X32, max_pruning_ratio=0)
