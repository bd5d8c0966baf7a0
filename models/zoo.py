"""The registered names: every skip rule on each depth of the two families."""

from __future__ import annotations

from functools import partial

from .preact_resnet import PreActResNet
from .registry import register_model
from .resnext import ResNeXt
from .skip import DEFAULT_LAMBDA_INIT, init_for_coefficients

# Registry prefix, human name and table label of each skip rule (paper Eq. 13, 15, Sec. 4.4).
RULE_NAMES = {
    "residual": ("resnet", "ResNet", "ResNet"),
    "in": ("in-resnet", "In-ResNet (Eq. 13)", "In-ResNet"),
    "lambda-in": ("lambda-in-resnet", "lambda-In-ResNet (Eq. 15)", "λ-In-ResNet"),
    "in-sig": ("in-resnet-sig", "In-ResNet-sig", "In-ResNet-sig"),
    "in-gating": ("in-resnet-gating", "In-ResNet-gating", "In-ResNet-gating"),
    "in-gating-sig": ("in-resnet-gating-sig", "In-ResNet-gating-sig", "In-ResNet-gating-sig"),
    "plain": ("plain", "plain CNN (no skip)", "Plain"),
}
MAIN_RULES = ("residual", "in", "lambda-in")
VARIANT_RULES = ("in-sig", "in-gating", "in-gating-sig")
# Models the plan refuses to train, and why (measured: docs/PROTOCOL.md, "Table 4").
REFUSED = {
    ("in-gating", 110): "its ReLU gate diverges under the paper's recipe (lr 0.1, no warm-up): at every seed "
    "and initialisation tried, a live gate's weights blow up within a few steps and the loss turns NaN or stays at chance"
}
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


def _tables(rule: str, depth: int, family: str) -> tuple[int, ...]:
    """The paper's tables with a row for this model: the main rules at the paper's depths
    in Tables 1-3 and 6 (ResNeXt-29 in Tables 1-2 only); Table 4 the In-ResNet-110 variants
    beside ResNet-110 and In-ResNet-110; Table 5 the λ sweep at depth 110 (ResNet-110 as
    the baseline)."""
    if family == "resnext":
        return (1, 2) if depth == 29 and rule in MAIN_RULES else ()
    tables = {1, 2, 3, 6} if depth in (110, 164) and rule in MAIN_RULES else set()
    if depth == 110 and rule in ("residual", "in", *VARIANT_RULES):
        tables.add(4)
    if depth == 110 and rule in MAIN_RULES:
        tables.add(5)
    return tuple(sorted(tables))


def _register_preact(rule: str, depth: int, block: str, coefficients: tuple[float, float]) -> None:
    prefix, title, label = RULE_NAMES[rule]
    init = init_for_coefficients(rule, coefficients)
    register_model(
        f"{prefix}{depth}",
        groups=_groups(rule, depth, paper_depth=depth in (110, 164)),
        arch=f"preact-resnet{depth}-{block}",
        family="preact-resnet",
        rule=rule,
        depth=depth,
        lambda_init=init,
        label=f"{label}-{depth}",
        tables=_tables(rule, depth, "preact-resnet"),
        networks=("paper", "release"),
        refused=REFUSED.get((rule, depth), ""),
        description=f"{title}: pre-activation ResNet-{depth}, {block} blocks, "
        f"lambda ~ U[{init[0]:.4g}, {init[1]:.4g}]",
    )(partial(PreActResNet, depth=depth, rule=rule, block=block, lambda_init=init))


def _register_resnext(rule: str, depth: int, card: int, width: int, widths: tuple[int, ...]) -> None:
    prefix, title, label = RULE_NAMES[rule]
    arch = f"resnext{depth}-{card}x{width}d"
    label = label.replace("ResNet", "ResNeXt")
    register_model(
        f"{prefix.replace('resnet', 'resnext')}{depth}-{card}x{width}d",
        groups=_groups(rule, depth, paper_depth=depth == 29),
        arch=arch,
        family="resnext",
        rule=rule,
        depth=depth,
        label=label if depth == 29 else f"{label} ({arch})",  # the paper's ResNeXt is 29-8x64d
        tables=_tables(rule, depth, "resnext"),
        description=f"{title}: ResNeXt-{depth} {card}x{width}d, stage widths "
        f"{'/'.join(map(str, widths))}, lambda ~ U[{', '.join(map(str, DEFAULT_LAMBDA_INIT))}]",
    )(partial(ResNeXt, depth=depth, cardinality=card, base_width=width, widths=widths, rule=rule))


# Depth-major order, so that groups list the paper's models in its table order.
_register_preact("residual", 8, "basic", DEFAULT_LAMBDA_INIT)
for _depth in BASIC_DEPTHS:
    for _rule in RULE_NAMES:
        _register_preact(_rule, _depth, "basic", DEFAULT_LAMBDA_INIT)
for _rule in RULE_NAMES:
    _register_preact(_rule, 164, "bottleneck", (0.1, 0.2))
for _rule in MAIN_RULES:
    _register_resnext(_rule, 29, 8, 64, (256, 512, 1024))
    _register_resnext(_rule, 20, 2, 4, (64, 128, 256))
