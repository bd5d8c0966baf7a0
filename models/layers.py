"""Tiny helpers shared by the families (as in torchvision's resnet.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


class Normalize(nn.Module):
    """Maps [0, 1] pixels to (x - mean) / std per channel, so that every model takes [0, 1]
    inputs and an attack radius is always in pixel units (RobustBench convention)."""

    mean: Tensor  # buffers, 1 x C x 1 x 1
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"need one positive std per mean channel, got {mean=} {std=}")
        if min(std) < torch.finfo(torch.float32).tiny:  # subnormal in float32: x / std overflows to inf
            raise ValueError(
                f"std must be at least {torch.finfo(torch.float32).tiny:.3g} (float32's smallest normal), got {min(std):g}"
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
