"""The model behind the bundled sample runs: a small BatchNorm CNN for the 8x8 digits.

Usable with `--model`:

    bnwd inspect sample_checkpoints/sgd_wd_all --model sample_checkpoints/model.py

`build_model()` returns the architecture (parameter names match the checkpoints' state dicts) and
`example_input()` a (8, 1, 8, 8) batch to trace it with. `scripts/make_sample_checkpoints.py`
imports this file, so the runs and the analysis share one definition.

Layout (forward order = registration order):

    conv1 (1->16, 3x3, no bias)  -> bn1 -> ReLU
    conv2 (16->32, 3x3, WITH bias) -> bn2 -> ReLU -> maxpool 2x2
    conv3 (32->32, 3x3, no bias) -> bn3 -> ReLU -> global average pool
    fc    (Linear 32->10)

Every conv weight feeds a BatchNorm through nothing but itself, so each of its output rows is
scale-invariant in train mode. `conv2.bias` is added right before bn2, whose mean subtraction
removes it: its gradient is exactly zero (a dead bias, kept on purpose as a test case).
`fc` sits after the last norm and is scale-sensitive (ordinary L2 applies there).
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsBNNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=True)  # dead bias
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


def build_model() -> nn.Module:
    """The sample runs' architecture, freshly initialised (PyTorch default init)."""
    return DigitsBNNet()


def example_input() -> torch.Tensor:
    """A deterministic (8, 1, 8, 8) batch: eight standardized 8x8 single-channel images."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 8, 8, generator=generator)
