"""Adaptive BN: curves evaluated after re-estimating BatchNorm statistics (issue 13)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import networks


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = self.drop(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.relu(self.bn2(self.conv2(y))).mean((2, 3)))


def _batch_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, unbiased and biased variance of a [N, C, H, W] batch."""
    flat = h.transpose(0, 1).reshape(h.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True), flat.var(1, unbiased=False)


def test_recalibration_changes_only_bn_statistics_to_the_averaged_batch_statistics():
    torch.manual_seed(0)
    model = _Net().double().eval()
    for bn in (model.bn1, model.bn2):  # stale statistics and non-trivial affine parameters
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(2, 5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    batches = [torch.randn(6, 3, 9, 9, dtype=torch.double) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # By hand: BN layers normalize with each batch's own (biased) statistics, dropout is off,
    # and the running statistics are the plain mean of the batch mean / unbiased variance.
    expected = {"bn1": [[], []], "bn2": [[], []]}
    for x in batches:
        h1 = F.conv2d(x, model.conv1.weight, model.conv1.bias)
        mean, var, biased = _batch_stats(h1)
        expected["bn1"][0].append(mean)
        expected["bn1"][1].append(var)
        y = (h1 - mean[:, None, None]) / (biased[:, None, None] + model.bn1.eps).sqrt()
        y = F.relu(y * model.bn1.weight[:, None, None] + model.bn1.bias[:, None, None])
        mean, var, _ = _batch_stats(F.conv2d(y, model.conv2.weight, model.conv2.bias))
        expected["bn2"][0].append(mean)
        expected["bn2"][1].append(var)

    assert networks.recalibrate_batchnorm(model, batches) is model
    assert not model.training and not model.bn1.training and model.bn1.momentum == 0.1
    after = model.state_dict()
    for name in ("bn1", "bn2"):
        means, variances = expected[name]
        torch.testing.assert_close(after[f"{name}.running_mean"], torch.stack(means).mean(0))
        torch.testing.assert_close(after[f"{name}.running_var"], torch.stack(variances).mean(0))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"bn{i}.{s}" for i in (1, 2)
                       for s in ("running_mean", "running_var", "num_batches_tracked")}


def test_calibration_batches_are_a_fixed_seeded_sample():
    images = torch.arange(50.0).view(50, 1, 1, 1)
    data = TensorDataset(images, torch.zeros(50))
    first = networks.calibration_batches(data, count=3, batch_size=4, seed=1)
    assert [b.shape[0] for b in first] == [4, 4, 4]
    drawn = torch.cat(first).flatten()
    assert len(drawn.unique()) == 12  # without replacement
    assert all(torch.equal(a, b) for a, b in
               zip(first, networks.calibration_batches(data, count=3, batch_size=4, seed=1)))
    other = torch.cat(networks.calibration_batches(data, count=3, batch_size=4, seed=2)).flatten()
    assert not torch.equal(drawn, other)


def test_recalibrated_curve_recovers_accuracy_that_stale_statistics_lose():
    """A network whose BN statistics are wrong evaluates badly raw and like its clean self
    after recalibration: the curve's first point with and without calibration."""
    torch.manual_seed(0)
    model = networks.build("resnet8_cifar", 3, width=0.5).eval()
    x = torch.randn(64, 3, 32, 32)
    networks.recalibrate_batchnorm(model, [x])
    labels = model(x).argmax(1)  # its own predictions with statistics of x: accuracy 1
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.add_(5.0)
    stale = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate = lambda net: networks.accuracy(net, [(x, labels)])  # noqa: E731
    example, base = x[:1], networks.count_macs(model, x[:1])
    raw = networks.accuracy_curve(model, example, base, evaluate, 1.01, iterative_steps=5)
    fixed = networks.accuracy_curve(model, example, base, evaluate, 1.01, iterative_steps=5,
                                    calibration=[x])
    assert fixed[0][2] == 1.0 and raw[0][2] < 0.9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stale.items())  # on a copy
