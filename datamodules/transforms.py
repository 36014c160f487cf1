"""Augmentation and normalization per data set.

CIFAR images live in memory as uint8 tensors, so their transforms work on a whole batch at
once: per-sample torchvision transforms cost ~0.45 ms per 32x32 image on a 2-core machine,
about a quarter of a narrow ResNet-20's training step; the batched version costs ~1% of it.
Larger images (ImageNet, any ImageFolder) are decoded per sample and use torchvision's v2
transforms on tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

MEAN_STD = {
    # The values used by DepGraph and the meta-pruning reference.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
MEAN_STD["imagefolder"] = MEAN_STD["imagenet"]


class BatchNormalize:
    """uint8 (B, 3, H, W) -> normalized float32."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class BatchCropFlip(BatchNormalize):
    """RandomCrop(size, padding) + RandomHorizontalFlip per sample, vectorized over the batch."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4) -> None:
        super().__init__(mean, std)
        self.padding = padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        rows = torch.randint(0, 2 * p + 1, (b, 1)) + torch.arange(h)
        cols = torch.randint(0, 2 * p + 1, (b, 1)) + torch.arange(w)
        flip = torch.rand(b, 1) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)  # a flip is a reversed column index
        out = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                     rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
        return super().__call__(out)


def large_image_transforms(dataset: str, size: int = 224) -> tuple[v2.Transform, v2.Transform]:
    """(train, eval) per-sample transforms for ImageNet-style data."""
    mean, std = MEAN_STD[dataset]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *tail])
    evaluation = v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True),
                             v2.CenterCrop(size), *tail])
    return train, evaluation
