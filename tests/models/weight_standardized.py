"""Weight-standardized convolutions with no normalization layer anywhere.

Known answers: the weight is normalized before use, so it is invariant even though GELU
follows: per output row when each filter is standardized on its own (`StdConv2d`, and the
`F.batch_norm`-on-the-weight form of `StdConvBN2d`), as a whole tensor when the whole tensor is
standardized together (`WholeStdConv2d`). The head is scale-sensitive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    """Each filter standardized on its own (BiT / timm StdConv2d, written out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdConvBN2d(nn.Conv2d):
    """The same through F.batch_norm on the reshaped weight (timm's StdConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            training=True, momentum=0.0, eps=1e-6,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WholeStdConv2d(nn.Conv2d):
    """The whole tensor standardized together: invariant only as a whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean()) / (w.std() + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WSNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = StdConv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = WholeStdConv2d(6, 6, 3, padding=1, bias=False)
        self.conv3 = StdConvBN2d(6, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = F.gelu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def build_model() -> nn.Module:
    return WSNet()


def example_input() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
