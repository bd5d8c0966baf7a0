"""The registered names: every skip rule on each depth of the two families."""

from __future__ import annotations

from functools import partial

from .preact_resnet import PreActResNet
from .registry import register_model
from .resnext import ResNeXt

# Registry prefix and human name of each skip rule (paper Eq. 13, 15, Sec. 4.4).
RULE_NAMES = {
    "residual": ("resnet", "ResNet"),
    "in": ("in-resnet", "In-ResNet (Eq. 13)"),
    "lambda-in": ("lambda-in-resnet", "lambda-In-ResNet (Eq. 15)"),
    "in-sig": ("in-resnet-sig", "In-ResNet-sig"),
    "in-gating": ("in-resnet-gating", "In-ResNet-gating"),
    "in-gating-sig": ("in-resnet-gating-sig", "In-ResNet-gating-sig"),
    "plain": ("plain", "plain CNN (no skip)"),
}
MAIN_RULES = ("residual", "in", "lambda-in")
VARIANT_RULES = ("in-sig", "in-gating", "in-gating-sig")
# Depth 14 is the shallowest with damped blocks (at depth 8 every block is the first or a
# projection one); resnet8 alone is kept as the quickest sanity model.
BASIC_DEPTHS = (14, 20, 32, 44, 56, 110)
SMALL_DEPTHS = (8, 14, 20)


def _groups(rule: str, depth: int, paper_depth: bool) -> tuple[str, ...]:
    if paper_depth and rule in MAIN_RULES:
        return ("main", "all")
    if paper_depth and rule in VARIANT_RULES and depth == 110:
        return ("variants", "all")
    return ("small",) if depth in SMALL_DEPTHS else ()


def _register_preact(rule: str, depth: int, block: str, init: tuple[float, float]) -> None:
    prefix, title = RULE_NAMES[rule]
    register_model(
        f"{prefix}{depth}",
        groups=_groups(rule, depth, paper_depth=depth in (110, 164)),
        arch=f"preact-resnet{depth}-{block}",
        rule=rule,
        description=f"{title}: pre-activation ResNet-{depth}, {block} blocks, "
        f"lambda ~ U[{init[0]}, {init[1]}]",
    )(partial(PreActResNet, depth=depth, rule=rule, block=block, lambda_init=init))


def _register_resnext(rule: str, depth: int, card: int, width: int, widths: tuple[int, ...]) -> None:
    prefix, title = RULE_NAMES[rule]
    register_model(
        f"{prefix.replace('resnet', 'resnext')}{depth}-{card}x{width}d",
        groups=_groups(rule, depth, paper_depth=depth == 29),
        arch=f"resnext{depth}-{card}x{width}d",
        rule=rule,
        description=f"{title}: ResNeXt-{depth} {card}x{width}d, stage widths "
        f"{'/'.join(map(str, widths))}, lambda ~ U[0.2, 0.25]",
    )(partial(ResNeXt, depth=depth, cardinality=card, base_width=width, widths=widths, rule=rule))


# Depth-major order, so that groups list the paper's models in its table order.
_register_preact("residual", 8, "basic", (0.2, 0.25))
for _depth in BASIC_DEPTHS:
    for _rule in RULE_NAMES:
        _register_preact(_rule, _depth, "basic", (0.2, 0.25))
for _rule in RULE_NAMES:
    _register_preact(_rule, 164, "bottleneck", (0.1, 0.2))
for _rule in MAIN_RULES:
    _register_resnext(_rule, 29, 8, 64, (256, 512, 1024))
    _register_resnext(_rule, 20, 2, 4, (64, 128, 256))
