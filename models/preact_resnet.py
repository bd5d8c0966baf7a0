"""Pre-activation ResNets for CIFAR (He et al. 2016, "Identity Mappings"), as in the
authors' release: 3x3 stem conv with no BN/ReLU after it, BN-ReLU-conv blocks, projection
shortcut BN-ReLU-1x1 conv, head BN-ReLU-pool-FC.

Two networks (`network`): "paper" is He et al.'s, whose projection shares the block's
BN-ReLU; "release" is the authors' code (InResNet.py), whose projection is a module of
its own, BN-ReLU-1x1 conv with a BN of its own, and whose λ-In-ResNet line evaluates the
branch twice per training step (once only for its shape), so the branch's BN running
statistics move twice per step.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import CIFAR10_MEAN, CIFAR10_STD, InterpolatedNet
from .layers import conv1x1, conv3x3
from .skip import DEFAULT_LAMBDA_INIT, SkipRule


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int, skip: SkipRule, own_projection: bool = False
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = projection(in_planes, planes, stride, own_projection)
        self.own_projection = own_projection
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(x if self.own_projection else out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return self.skip(identity, out)


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int, skip: SkipRule, own_projection: bool = False
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv1x1(in_planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = projection(in_planes, planes * self.expansion, stride, own_projection)
        self.own_projection = own_projection
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(x if self.own_projection else out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return self.skip(identity, out)


def projection(in_planes: int, out_planes: int, stride: int, own: bool) -> nn.Module | None:
    """None where the shortcut is the identity; else the 1x1 conv applied to the block's
    pre-activation (`own` False, He et al.), or BN-ReLU-1x1 conv applied to the block's input
    (`own` True, the release's Downsample)."""
    if stride == 1 and in_planes == out_planes:
        return None
    conv = conv1x1(in_planes, out_planes, stride)
    return nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), conv) if own else conv


Block = type[PreActBasicBlock] | type[PreActBottleneck]
BLOCKS: dict[str, tuple[Block, int]] = {"basic": (PreActBasicBlock, 6), "bottleneck": (PreActBottleneck, 9)}


class PreActResNet(InterpolatedNet):
    """Pre-activation ResNet of `depth` layers with every block's skip given by `rule`.

    Depth is 6n+2 for basic blocks (ResNet-110: n=18) and 9n+2 for bottlenecks
    (ResNet-164: n=18); n blocks in each of 3 stages of width 16, 32, 64 (x4 for
    bottlenecks). `network`: "paper" (He et al.) or "release" (the authors' code; see the
    module's docstring). Inputs: N x 3 x H x W in [0, 1]; outputs: N x num_classes logits.
    """

    def __init__(
        self,
        depth: int = 110,
        rule: str = "residual",
        block: str = "basic",
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        lambda_init: tuple[float, float] = DEFAULT_LAMBDA_INIT,
        damp_scope: str = "release",
        network: str = "paper",
    ):
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
        block_cls, layers_per_unit = BLOCKS[block]
        if depth < 2 + layers_per_unit or (depth - 2) % layers_per_unit:
            raise ValueError(
                f"a {block}-block pre-activation ResNet needs depth = {layers_per_unit}n+2 "
                f"(n >= 1), got {depth}"
            )
        super().__init__(
            arch=f"preact-resnet{depth}-{block}",
            family="preact-resnet",
            rule=rule,
            num_classes=num_classes,
            mean=mean,
            std=std,
            lambda_init=lambda_init,
            damp_scope=damp_scope,
            network=network,
        )
        n = (depth - 2) // layers_per_unit
        self.in_planes = 16
        self.conv1 = conv3x3(3, 16)
        self.layer1 = self._make_layer(block_cls, 16, n, stride=1, first=True)
        self.layer2 = self._make_layer(block_cls, 32, n, stride=2)
        self.layer3 = self._make_layer(block_cls, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(self.in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.check_damping()

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int, first: bool = False
    ) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            out_planes = planes * block.expansion
            identity = s == 1 and self.in_planes == out_planes
            skip = self.make_skip(out_planes, identity=identity, first=first and i == 0)
            unit = block(self.in_planes, planes, s, skip, own_projection=self.info.network == "release")
            if self.info.network == "release" and skip.damped and skip.scale_branch:
                _branch_statistics_twice(unit)
            layers.append(unit)
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(x.flatten(1))


def _branch_statistics_twice(block: nn.Module) -> None:
    """The release's λ-In-ResNet line, (1 + ReLU(k)).expand_as(b(x)) * b(x) + ..., runs the
    branch b twice per training step: the first output serves only for its shape, so the
    loss and gradients are those of one pass, but each BN of the branch updates its running
    statistics twice with the same batch statistics, r <- (1 - m)^2 r + (1 - (1 - m)^2) μ.
    That is one update with momentum 1 - (1 - m)^2 (0.19 for PyTorch's 0.1)."""
    for name, norm in block.named_modules():
        if isinstance(norm, nn.BatchNorm2d) and norm.momentum is not None and not name.startswith("shortcut"):
            norm.momentum = 1 - (1 - norm.momentum) ** 2
