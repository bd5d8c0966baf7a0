"""What every zoo network shares: [0, 1] inputs, metadata, and its interpolation coefficients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .layers import Normalize
from .skip import SkipRule, lambda_storage, uses_lambda

# The zoo's default normalisation: the CIFAR-10 training set's statistics (torchvision's).
# Each data set's own live in its entry of bench.data.datasets, which the harness passes in.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Which blocks get the model's skip rule. "release": as the authors' code, every block
# whose shortcut is the identity except the very first one (51 of 54 in ResNet-110); the
# rest stay plain residual. "all": every block, projection shortcuts included.
DAMP_SCOPES = ("release", "all")
# Which network of a family. "paper": the architecture the paper cites (He et al.'s
# pre-activation ResNet, Xie et al.'s ResNeXt). "release": the authors' public code, where
# it differs (pre-activation ResNets only; see PreActResNet).
NETWORKS = ("paper", "release")


@dataclass(frozen=True)
class ModelInfo:
    """Metadata that travels with a model (timm's pretrained_cfg, RobustBench's conventions)."""

    arch: str  # e.g. "preact-resnet110-basic", "resnext29-8x64d"
    family: str  # "preact-resnet" or "resnext"
    rule: str  # key of models.skip.RULES
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    lambda_init: tuple[float, float]
    damp_scope: str
    network: str = "paper"  # one of NETWORKS
    name: str = ""  # registry name, set by create_model
    input_range: tuple[float, float] = (0.0, 1.0)

    @property
    def damped_lambda_init(self) -> tuple[float, float] | None:
        """The λ initialisation records and tables carry: None where no skip is damped by λ
        (the residual and plain rules ignore it)."""
        low, high = self.lambda_init
        return (low, high) if uses_lambda(self.rule) else None

    @property
    def lambda_storage(self) -> str:
        """What the skip rule trains in place of λ ("k = 1 - λ", "λ", ...): it decides
        which way weight decay pulls λ, so checkpoints record it."""
        return lambda_storage(self.rule)


class InterpolatedNet(nn.Module):
    """Base of the zoo families: subclasses build `self.normalize` first and use
    `make_skip` for every block."""

    info: ModelInfo

    def __init__(
        self,
        *,
        arch: str,
        family: str,
        rule: str,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        lambda_init: tuple[float, float],
        damp_scope: str,
        network: str = "paper",
    ):
        super().__init__()
        if damp_scope not in DAMP_SCOPES:
            raise ValueError(f"damp_scope must be one of {DAMP_SCOPES}, got {damp_scope!r}")
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
        self.info = ModelInfo(
            arch,
            family,
            rule,
            num_classes,
            tuple(mean),
            tuple(std),
            (lambda_init[0], lambda_init[1]),
            damp_scope,
            network,
        )
        self.normalize = Normalize(mean, std)

    def make_skip(self, channels: int, *, identity: bool, first: bool) -> SkipRule:
        damped = self.info.damp_scope == "all" or (identity and not first)
        return SkipRule(self.info.rule, channels, self.info.lambda_init, damped)

    def check_damping(self) -> None:
        """Refuse an interpolated model in which no block is damped: it would silently be
        the ResNet (e.g. depth 8, where every block is the first or a projection)."""
        if self.info.rule != "residual" and not self.damped_skips():
            raise ValueError(
                f"no block of {self.info.arch} takes the {self.info.rule!r} skip under "
                f"damp_scope={self.info.damp_scope!r}: use a deeper model or damp_scope='all'"
            )

    def damped_skips(self) -> list[SkipRule]:
        return [m for m in self.modules() if isinstance(m, SkipRule) and m.damped]

    @torch.no_grad()
    def interpolation_coefficients(self, x: Tensor | None = None) -> Tensor:
        """act(d_n) of every damped block, in depth order: 0 for ResNet, 1 for plain.

        Scalar rules give shape (n_damped,). Gating rules depend on the input: pass a batch
        `x` in [0, 1] (N x 3 x H x W) and get shape (n_damped, N), one row per block, each
        example's mean over its channels and positions.
        """
        skips = self.damped_skips()
        if not any(s.is_input_dependent for s in skips):
            return torch.tensor([s.coefficient().item() for s in skips])
        if x is None:
            raise ValueError(f"{self.info.rule} coefficients depend on the input; pass a batch x")
        rows: list[Tensor] = []
        hooks = [
            s.register_forward_hook(lambda m, args, out: rows.append(m.coefficient(args[0]))) for s in skips
        ]
        was_training = self.training
        self.eval()
        try:
            self(x)
        finally:
            self.train(was_training)
            for h in hooks:
                h.remove()
        # a gate's coefficients are one per element: each example's mean over channels and positions
        return torch.stack([r.reshape(len(x), -1).mean(1).float().cpu() for r in rows])

    def named(self, name: str) -> InterpolatedNet:
        self.info = replace(self.info, name=name)
        return self
