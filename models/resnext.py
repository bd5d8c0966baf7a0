"""ResNeXt for CIFAR (Xie et al. 2017): post-activation bottlenecks with grouped 3x3 convs,
projection shortcut 1x1 conv + BN. The damped skip replaces the sum before the final ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import CIFAR10_MEAN, CIFAR10_STD, InterpolatedNet
from .layers import conv1x1, conv3x3
from .skip import DEFAULT_LAMBDA_INIT, SkipRule


class ResNeXtBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, cardinality: int, width: int, skip: SkipRule):
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups=cardinality)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.skip(identity, out))


class ResNeXt(InterpolatedNet):
    """ResNeXt-`depth` (9n+2; 29 -> 3 blocks a stage), `cardinality` x `base_width`d.

    Stage outputs `widths` (paper: 256, 512, 1024; stem width widths[0] / 4); the grouped
    width of stage k is cardinality * base_width * widths[k] / widths[0] (8x64d: 512, 1024,
    2048). Inputs: N x 3 x H x W in [0, 1]; outputs: N x num_classes logits.
    """

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 8,
        base_width: int = 64,
        widths: Sequence[int] = (256, 512, 1024),
        rule: str = "residual",
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        lambda_init: tuple[float, float] = DEFAULT_LAMBDA_INIT,
        damp_scope: str = "release",
        network: str = "paper",
    ):
        if network != "paper":  # the authors' release has pre-activation ResNets only
            raise ValueError(
                f"ResNeXt has one network, 'paper' (Xie et al.); the authors' release has no ResNeXt, got {network!r}"
            )
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"ResNeXt needs depth = 9n+2 (n >= 1), got {depth}")
        if len(widths) != 3 or any(w % widths[0] for w in widths) or widths[0] % 4:
            raise ValueError(f"widths must be 3 multiples of widths[0] (itself a multiple of 4): {widths}")
        super().__init__(
            arch=f"resnext{depth}-{cardinality}x{base_width}d",
            family="resnext",
            rule=rule,
            num_classes=num_classes,
            mean=mean,
            std=std,
            lambda_init=lambda_init,
            damp_scope=damp_scope,
        )
        n = (depth - 2) // 9
        self.in_ch = widths[0] // 4
        self.conv1 = conv3x3(3, self.in_ch)
        self.bn1 = nn.BatchNorm2d(self.in_ch)
        self.relu = nn.ReLU(inplace=True)
        group_width = [cardinality * base_width * w // widths[0] for w in widths]
        self.layer1 = self._make_layer(widths[0], n, 1, cardinality, group_width[0], first=True)
        self.layer2 = self._make_layer(widths[1], n, 2, cardinality, group_width[1])
        self.layer3 = self._make_layer(widths[2], n, 2, cardinality, group_width[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.check_damping()

    def _make_layer(
        self, out_ch: int, blocks: int, stride: int, cardinality: int, width: int, first: bool = False
    ) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            identity = s == 1 and self.in_ch == out_ch
            skip = self.make_skip(out_ch, identity=identity, first=first and i == 0)
            layers.append(ResNeXtBlock(self.in_ch, out_ch, s, cardinality, width, skip))
            self.in_ch = out_ch
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
