"""Normalization modules users write themselves, and functional normalization.

- `BatchNormAct2d`: a BatchNorm2d subclass that fuses its activation (timm style);
- `SuperBatchNormAct2d`: the same through `super().forward` (BatchNorm's input check defeats
  torch.fx, so this one needs the execution trace);
- `LayerNorm2d`: channels-last LayerNorm of an NCHW tensor;
- `FunctionalNorms`: F.batch_norm, F.group_norm, F.layer_norm and F.rms_norm on parameters the
  model holds itself.

Known answers: conv feeding a BatchNorm (module or functional): per row; conv feeding a
GroupNorm of 3 groups: per group (3 groups of 2 rows); conv feeding a LayerNorm (channels-last), and a
linear layer feeding an RMSNorm: whole tensor; every gamma/beta: norm affine; heads: sensitive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps,
        )  # fmt: skip
        return self.act(x)


class SuperBatchNormAct2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SubclassNet(nn.Module):
    def __init__(self, bn: type[nn.BatchNorm2d] = BatchNormAct2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = bn(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.ln2 = LayerNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = F.relu(self.ln2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class FunctionalNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_bn = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_weight = nn.Parameter(torch.ones(6))
        self.bn_bias = nn.Parameter(torch.zeros(6))
        self.conv_gn = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.gn_weight = nn.Parameter(torch.ones(6))
        self.gn_bias = nn.Parameter(torch.zeros(6))
        self.conv_ln = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.ln_weight = nn.Parameter(torch.ones(6))
        self.ln_bias = nn.Parameter(torch.zeros(6))
        self.proj = nn.Linear(6, 8, bias=False)
        self.rms_weight = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(self.conv_bn(x), None, None, self.bn_weight, self.bn_bias, True)
        x = F.relu(x)
        x = F.relu(F.group_norm(self.conv_gn(x), 3, self.gn_weight, self.gn_bias))
        x = self.conv_ln(x).permute(0, 2, 3, 1)
        x = F.relu(F.layer_norm(x, (6,), self.ln_weight, self.ln_bias)).permute(0, 3, 1, 2)
        x = F.rms_norm(self.proj(x.mean(dim=(2, 3))), (8,), self.rms_weight, eps=1e-6)
        return self.fc(x)


def build_model() -> nn.Module:
    return SubclassNet(BatchNormAct2d)


def build_super_model() -> nn.Module:
    return SubclassNet(SuperBatchNormAct2d)


def build_functional() -> nn.Module:
    return FunctionalNorms()


def example_input() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(8))
