"""Weight-space augmentation of zoo members (issue 13): same function, other norms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import networks
from graph import Metanetwork
from lightning_modules import MetaPruningModule
from metaprune.errors import UserError
from objective import MemberState, meta_loss
from objective.augment import NormalizedChannels, normalized_channels, rescale_channels


class _Mixed(nn.Module):
    """conv1 feeds only bn1 (rescalable); conv2 feeds bn2 and a residual sum (not); the linear
    feeds only a BatchNorm1d (rescalable); the head has no BatchNorm (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn3 = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = torch.relu(self.bn2(y) + y)
        x = torch.relu(self.bn3(self.fc(x.mean((2, 3)))))
        return self.head(x)


def _randomized(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.double().eval()


def test_only_channels_read_by_one_batchnorm_alone_are_rescalable():
    assert normalized_channels(_Mixed()) == [NormalizedChannels("conv1", "bn1"),
                                             NormalizedChannels("fc", "bn3")]


def test_rescaling_keeps_the_function_and_changes_the_weights():
    torch.manual_seed(0)
    model = _randomized(_Mixed())
    for m in model.modules():  # eps = 0: the compensation is then exact, not approximate
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 0.0
    state = model.state_dict()
    scaled = rescale_channels(state, normalized_channels(model), 2.0,
                              torch.Generator().manual_seed(1))
    factors = scaled["conv1.weight"].flatten(1)[:, 0] / state["conv1.weight"].flatten(1)[:, 0]
    assert ((factors >= 0.5) & (factors <= 2.0)).all() and factors.std() > 0.05
    torch.testing.assert_close(scaled["bn1.running_var"], state["bn1.running_var"] * factors ** 2)
    assert torch.equal(scaled["conv2.weight"], state["conv2.weight"])
    x = torch.randn(5, 3, 8, 8, dtype=torch.double)
    expected = model(x)
    model.load_state_dict(scaled)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_augmented_meta_loss_has_the_same_ce_and_another_regularizer():
    torch.manual_seed(0)
    model = _randomized(networks.build("resnet8_cifar", 3, width=0.5)).float()
    example = torch.randn(1, 3, 32, 32)
    member = MemberState.build(model, example, reg=1e-3, alpha=16.0)
    meta = Metanetwork.for_graph(member.graph, num_layers=1, hidden=4)  # the identity at start
    images, labels = torch.randn(1, 4, 3, 32, 32), torch.randint(0, 3, (1, 4))
    torch.manual_seed(1)
    ce, sparsity, _ = meta_loss(meta, member, images, labels, alpha=16.0)
    ce_aug, sparsity_aug, _ = meta_loss(meta, member, images, labels, alpha=16.0, augment=3.0)
    assert float(ce_aug) == pytest.approx(float(ce), rel=1e-4)
    assert abs(float(sparsity_aug) / float(sparsity) - 1) > 0.05


def test_augment_below_one_is_refused():
    with pytest.raises(UserError, match="augment=0.5"):
        MetaPruningModule(augment=0.5)
