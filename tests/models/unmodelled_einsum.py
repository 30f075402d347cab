"""A 1x1 convolution written as `torch.einsum`, followed by BatchNorm.

The structural analysis does not model `einsum`, so it calls the weight scale-sensitive (the
conservative answer); it is in fact invariant per row, and the numeric check shows it. This is
the file the CLI tests use for "graph and numbers disagree" (exit code 1).
"""

from __future__ import annotations

import torch
from torch import nn


class EinsumConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(9)))
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.einsum("oc,nchw->nohw", self.weight, x))
        return self.fc(y.relu().mean(dim=(2, 3)))


def build_model() -> nn.Module:
    return EinsumConvBN()


def example_input() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(10))
