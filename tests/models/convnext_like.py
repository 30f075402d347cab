"""A small ConvNeXt: 7x7 depthwise conv -> channels-last LayerNorm -> MLP with GELU -> layer
scale, residual stream with stochastic depth; LayerNorm2d (channels-last) in stem and
downsampling.

Known answers (shared/THEORY.md section 1):
- stem conv: weight and bias jointly invariant (a bias before LayerNorm is not removed);
- each block's depthwise conv: weight and bias jointly invariant (same reason);
- pwconv1 (into GELU): scale-sensitive;
- stage 1 pwconv2 and gamma: scale-sensitive -- the residual stream starts at the stem's
  LayerNorm output, which no parameter can rescale;
- stage 2 (after the downsampling conv): the stream is rescaled by the downsampling conv, and
  every block then needs its depthwise bias and its layer-scale gamma rescaled along: one joint
  group {downsample weight+bias, all depthwise biases, all gammas} of the stage;
- LayerNorm weights/biases: norm affines; the head: scale-sensitive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, computed channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth as timm writes it."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x.div(keep) * mask


class Block(nn.Module):
    def __init__(self, dim: int, drop: float = 0.2, layer_scale: float = 0.5) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + drop_path(x, self.drop, self.training)


class ConvNeXtLike(nn.Module):
    def __init__(self, dims: tuple[int, int] = (8, 16), classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        self.stage1 = nn.Sequential(Block(dims[0]), Block(dims[0]))
        self.downsample = nn.Sequential(
            LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2)
        )
        self.stage2 = nn.Sequential(Block(dims[1]), Block(dims[1]))
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean(dim=(2, 3))))


def build_model() -> nn.Module:
    return ConvNeXtLike()


def example_input() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
