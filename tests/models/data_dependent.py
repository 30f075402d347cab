"""Data-dependent control flow: `torch.fx` symbolic tracing cannot follow `if x.mean() > 0`, so
the analysis must fall back to tracing an actual execution.

Known answers: conv1 and the branch that runs (conv_pos) are per-row invariant (each feeds a
BN); conv_neg does not run on the example input, so no claim can be made about it; the head is
scale-sensitive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv_pos = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv_neg = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        # data-dependent: always true after ReLU on a random input
        x = self.conv_pos(x) if x.mean() > 0 else self.conv_neg(x)
        x = F.relu(self.bn2(x))
        for _ in range(int(x.shape[-1] > 4) + 1):
            x = F.max_pool2d(x, 2)
        return self.fc(x.mean(dim=(2, 3)))


def build_model() -> nn.Module:
    return Branchy()


def example_input() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
