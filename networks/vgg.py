"""VGG-19 with BatchNorm for 32x32 inputs (the DepGraph / meta-pruning CIFAR-100 layout)."""
from __future__ import annotations

import torch
from torch import nn

VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512)


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 images (``cfg``: widths and "M" max-pools), widths scaled
    by ``width``."""

    def __init__(self, num_classes: int = 100, width: float = 1.0, cfg: tuple = VGG19_CFG) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out_ch = max(1, round(v * width))
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
