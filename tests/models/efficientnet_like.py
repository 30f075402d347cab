"""A small EfficientNet: MBConv blocks (1x1 expand -> BN -> SiLU -> depthwise -> BN -> SiLU ->
squeeze-excite -> 1x1 project -> BN), stochastic depth on the residual.

Known answers: every conv feeding a BatchNorm directly (stem, expand, depthwise, project, head
conv) is invariant per row -- SiLU and the SE gate come *after* the BN; the SE convolutions
feed SiLU and a sigmoid gate, so they are scale-sensitive; so is the classifier.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        return x * s.sigmoid()


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4, drop: float = 0.2):
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act = nn.SiLU()
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act(self.bn1(self.conv_pw(x)))
        x = self.act(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(self.se(x)))
        if self.residual:
            if self.training and self.drop > 0:
                keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) >= self.drop
                x = x * keep / (1 - self.drop)
            x = x + shortcut
        return x


class EfficientNetLike(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.blocks = nn.Sequential(MBConv(8, 8, 1), MBConv(8, 12, 2))
        self.conv_head = nn.Conv2d(12, 24, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act(self.bn2(self.conv_head(x)))
        return self.classifier(self.dropout(x.mean((2, 3))))


def build_model() -> nn.Module:
    return EfficientNetLike()


def example_input() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
