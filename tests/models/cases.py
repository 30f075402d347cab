"""Small hand-built models, one structural case each, with answers known from their structure.

Each factory is a `--factory` target; `example_input()` fits every one of them except
`linear_layernorm` (which has its own `linear_input()`). The comment on each factory states the
expected verdicts and why (shared/THEORY.md section 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def example_input() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def linear_input() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(2))


class _Head(nn.Module):
    """Global average pool and a linear classifier: scale-sensitive by construction."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ConvGeluBN(nn.Module):
    """conv -> GELU -> BN: GELU is not positively homogeneous, so conv.weight is NOT invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(6)
        self.head = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.act(self.conv(x))))


def conv_gelu_bn() -> nn.Module:
    return ConvGeluBN()


class ConvReluPoolBN(nn.Module):
    """conv -> ReLU -> max-pool -> BN: every op on the way is positively homogeneous and acts
    per channel, so each output row of conv.weight is invariant on its own (per row)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.head(self.bn(x))


def conv_relu_maxpool_bn() -> nn.Module:
    return ConvReluPoolBN()


class ResidualSumBN(nn.Module):
    """BN(conv_a(x) + conv_b(x)): the two weights are invariant only when scaled together
    (a joint group); neither is invariant alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv_a(x) + self.conv_b(x))))


def residual_sum_bn() -> nn.Module:
    return ResidualSumBN()


class LinearLayerNorm(nn.Module):
    """Linear -> LayerNorm over the features: fc1.weight is invariant as a whole tensor, but
    not per row (LayerNorm normalizes all features together)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7, bias=False)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.norm(self.fc1(x))))


def linear_layernorm() -> nn.Module:
    return LinearLayerNorm()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, computed channels-last (ConvNeXt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvBiasNorms(nn.Module):
    """A conv with a bias before each kind of norm:
    - before BN: the bias is dead (mean subtraction removes it), the weight is per-row invariant;
    - before LayerNorm2d and before GroupNorm: the bias is not removed, so weight and bias are
      invariant only jointly, {W, b}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_bn = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv_ln = nn.Conv2d(6, 6, 3, padding=1)
        self.ln = LayerNorm2d(6)
        self.conv_gn = nn.Conv2d(6, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.head = _Head(6)
        with torch.no_grad():  # trained biases are not zero; make sure these are not either
            for conv in (self.conv_bn, self.conv_ln, self.conv_gn):
                conv.bias.copy_(torch.linspace(-0.5, 0.5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv_bn(x)))
        x = F.relu(self.ln(self.conv_ln(x)))
        x = F.relu(self.gn(self.conv_gn(x)))
        return self.head(x)


def conv_bias_norms() -> nn.Module:
    return ConvBiasNorms()


class GroupNormPerGroup(nn.Module):
    """conv (no bias) -> GroupNorm(4 groups of 2 channels): rows are invariant in groups of 2
    (per group), not one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(4, 8)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.gn(self.conv(x))))


def groupnorm_per_group() -> nn.Module:
    return GroupNormPerGroup()


class FanOut(nn.Module):
    """conv's output goes to a BN *and*, directly, to a second head: the un-normalized use
    breaks invariance, so conv.weight is NOT invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = _Head(6)
        self.side = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(F.relu(self.bn(y))) + self.side(y)


def fan_out() -> nn.Module:
    return FanOut()


class ConcatBN(nn.Module):
    """BN(cat([conv_a(x), conv_b(x)])) (DenseNet-style): BN normalizes each channel on its own,
    so each conv is per-row invariant by itself -- concatenation does not make a joint group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], dim=1))))


def concat_bn() -> nn.Module:
    return ConcatBN()


class ReluBiasBN(nn.Module):
    """conv (with bias) -> ReLU -> BN: the bias is not dead (the ReLU sits between), and the
    weight alone is not invariant (relu(cWx + b) != c relu(Wx + b)); W and b jointly are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = _Head(6)
        with torch.no_grad():
            self.conv.bias.copy_(torch.linspace(-0.3, 0.3, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(F.relu(self.conv(x))))


def relu_bias_bn() -> nn.Module:
    return ReluBiasBN()


class ZeroGammaBranch(nn.Module):
    """Two residual branches whose last BN has gamma = beta = 0 (zero-init residual): both
    branches are dead at this point, so nothing numeric can be learned about what is inside.
    - branch a: conv_a1 -> bn_a1 -> relu -> conv_a2 -> bn_a2: structurally per-row invariant;
    - branch g: conv_g1 -> GELU -> conv_g2 -> bn_g: conv_g1 is structurally NOT invariant.
    A numeric check must report both as no evidence, not as invariance."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(6)
        self.conv_a1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_a1 = nn.BatchNorm2d(6)
        self.conv_a2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_a2 = nn.BatchNorm2d(6)
        self.conv_g1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv_g2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_g = nn.BatchNorm2d(6)
        for bn in (self.bn_a2, self.bn_g):
            nn.init.zeros_(bn.weight)
        self.head = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        a = self.bn_a2(self.conv_a2(F.relu(self.bn_a1(self.conv_a1(x)))))
        g = self.bn_g(self.conv_g2(F.gelu(self.conv_g1(x))))
        return self.head(F.relu(x + a + g))


def zero_gamma_branch() -> nn.Module:
    return ZeroGammaBranch()


class EpsLimited(nn.Module):
    """conv -> BN where one output row of conv.weight is tiny (1e-4 of the others): that
    channel's variance is far below BN's eps, so rescaling the row changes the output through
    eps. Structurally invariant; numerically invariant only up to eps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6, eps=1e-3)
        self.head = _Head(6)
        with torch.no_grad():
            self.conv.weight[2].mul_(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))))


def eps_limited() -> nn.Module:
    return EpsLimited()


def build_model() -> nn.Module:
    return ConvReluPoolBN()
