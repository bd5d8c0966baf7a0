"""The skip-rule component shared by every family: paper Eq. 21.

    x_{n+1} = (1 - act(d(x_n))) * x_n + s * f_n(x_n)

A block computes its branch f_n(x_n) once and hands both tensors to its `SkipRule`; the
rule is the only place where residual, interpolated and plain networks differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_SCALAR, _GATE, _FIXED = "scalar", "gate", "fixed"


# λ_n ~ U[a, b] at initialisation: the paper's for the basic-block models (its bottleneck
# ResNet-164 uses U[0.1, 0.2], models.zoo); every default below reads this one.
DEFAULT_LAMBDA_INIT = (0.2, 0.25)


@dataclass(frozen=True)
class Rule:
    """How a rule makes its coefficient act(d(x_n)) and which parameter holds d.

    `stores_k`: the trainable scalar is k = 1 - λ, not λ. Why it matters: SGD's weight
    decay pulls the stored parameter toward 0, so storing k pulls λ toward 1 (more damping,
    toward the plain network) and storing λ pulls it toward 0 (toward the ResNet). The
    authors' release stores k for In-ResNet and λ for λ-In-ResNet; its SGD decays both
    (train.py). Storing what the release stores lets any optimiser over
    `model.parameters()` move every parameter exactly as the release's does.
    """

    act: Callable[[Tensor], Tensor] | None
    kind: str  # _SCALAR: one λ_n per block; _GATE: d(x) = W_d x + b_d per element (`SkipGate`); _FIXED: none
    scales_branch: bool  # s = 1 + act(d) (Eq. 15) instead of 1
    stores_k: bool = False

    @property
    def stored(self) -> str:
        """What the trainable parameters are, in words (recorded in checkpoints' meta)."""
        if self.kind == _FIXED:
            return "-"
        return "k = 1 - λ" if self.stores_k else ("λ" if self.kind == _SCALAR else "W_d, b_d")


RULES: dict[str, Rule] = {
    "residual": Rule(None, _FIXED, False),  # c = 0: x + f(x)
    "plain": Rule(None, _FIXED, False),  # c = 1: f(x), no skip at all
    "in": Rule(F.relu, _SCALAR, False, stores_k=True),  # Eq. 13, k as the release: decay pulls λ to 1
    "lambda-in": Rule(F.relu, _SCALAR, True),  # Eq. 15: s = 1 + ReLU(λ); λ as the release: decay to 0
    # The release has no code for the variants: d is stored as the equations write it (a
    # gate's W_d and b_d), so decay pulls d toward 0: coefficient 0.5 (sig), 0 (gating).
    "in-sig": Rule(torch.sigmoid, _SCALAR, False),
    "in-gating": Rule(F.relu, _GATE, False),
    "in-gating-sig": Rule(torch.sigmoid, _GATE, False),
}


# The sigmoid never reaches a coefficient of 0: an interval starting at 0 starts its d at He
# et al.'s gate bias of -6 ("Identity Mappings", Table 1: coefficient sigmoid(-6) = 0.0025).
SIGMOID_FLOOR = -6.0


def init_for_coefficients(rule: str, coefficients: tuple[float, float]) -> tuple[float, float]:
    """The interval of d (λ_n, or a gate's b_d) that starts `rule` at coefficients act(d) in
    U[a, b]: the interval itself for the ReLU rules, where act(d) = d on it, its logit for
    the sigmoid rules (which would otherwise start at sigmoid(0.2) = 0.55, a skip weight of
    0.45 against In-ResNet's 0.75-0.8), floored at SIGMOID_FLOOR."""
    if RULES[rule].act is not torch.sigmoid:
        return coefficients
    low, high = (math.log(c / (1 - c)) if c > 0 else SIGMOID_FLOOR for c in coefficients)
    return max(low, SIGMOID_FLOOR), max(high, SIGMOID_FLOOR)


def uses_lambda(rule: str) -> bool:
    """Whether the rule damps its skip by a trained λ (the residual and plain ones do not)."""
    return rule in RULES and RULES[rule].kind != _FIXED


def lambda_storage(rule: str) -> str:
    """What the rule trains in place of λ: "k = 1 - λ", "λ", "W_d, b_d" or "-"."""
    return RULES[rule].stored


class SkipRule(nn.Module):
    """Combines a block's skip tensor `x` and branch output `fx` (same shape, N x C x H x W).

    Args:
        rule: one of `RULES`.
        channels: C of `x`; sizes the gate of the gating rules.
        init: U[a, b] for λ_n, or for the gate's bias b_d. The paper initialises λ_n (the
            argument of act, not act(λ_n)); where the rule stores k = 1 - λ, k is drawn
            from U[1 - b, 1 - a] (the release's U[0.75, 0.8] for λ ~ U[0.2, 0.25]).
        damped: False turns the block into a plain residual one whatever `rule` says; the
            authors' release keeps the first block and the projection blocks so.

    Gating rules (paper Sec. 4.4): d(x) = W_d x + b_d is a `SkipGate`, He et al.'s shortcut-only
    gate: one coefficient per position and channel.
    """

    def __init__(
        self, rule: str, channels: int, init: tuple[float, float] = DEFAULT_LAMBDA_INIT, damped: bool = True
    ):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown skip rule {rule!r}; choose one of {sorted(RULES)}")
        low, high = init
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(f"lambda init U[{low}, {high}] needs finite bounds with low <= high")
        if RULES[rule].act is F.relu and high > 2:  # the paper: stable up to 2 (forward Euler)
            raise ValueError(
                f"lambda init U[{low}, {high}] leaves the stable range: rule {rule!r} needs high <= 2 "
                "(1 removes the skip, (1, 2] makes it negative, beyond 2 the forward-Euler step diverges)"
            )
        self.damped = damped
        # False: the damped sum out of place, as plain autograd ops. torch.func's transforms
        # (jvp, vjp: bench.eval.stability) cannot trace _DampedSum's in-place write.
        self.fused = True
        self.rule = rule if damped else "residual"
        facts = RULES[self.rule]
        self.act, self.scale_branch, self.stores_k = facts.act, facts.scales_branch, facts.stores_k
        if facts.kind == _SCALAR and facts.stores_k:
            self.k = nn.Parameter(torch.empty(()).uniform_(1 - high, 1 - low))
        elif facts.kind == _SCALAR:
            self.lam = nn.Parameter(torch.empty(()).uniform_(low, high))
        elif facts.kind == _GATE:
            self.gate = SkipGate(channels, init)

    @property
    def is_input_dependent(self) -> bool:
        return hasattr(self, "gate")

    @property
    def has_scalar(self) -> bool:
        """Whether one trained scalar λ_n sets the coefficient (In-, λ-In-, sig rules)."""
        return hasattr(self, "k") or hasattr(self, "lam")

    def scalar_lambda(self) -> Tensor:
        """λ_n, the argument of act in Eq. 13 / 15, whichever of λ or k = 1 - λ is stored."""
        if hasattr(self, "k"):
            return 1 - self.k
        if hasattr(self, "lam"):
            return self.lam
        raise ValueError(f"the {self.rule} rule has no scalar λ")

    @torch.no_grad()
    def set_lambda(self, value: float) -> None:
        """Set λ_n (stored as k = 1 - value where the rule stores k)."""
        if hasattr(self, "k"):
            self.k.fill_(1 - value)
        else:
            self.scalar_lambda().fill_(value)  # the parameter itself, or one error line

    def coefficient(self, x: Tensor | None = None) -> Tensor:
        """act(d(x)): a 0-d tensor, or for the gating rules one per element of `x` (needs `x`)."""
        act = self.act
        if act is None:  # the fixed rules: c = 0 (residual) or 1 (plain)
            return torch.zeros(()) if self.rule == "residual" else torch.ones(())
        if self.is_input_dependent:
            if x is None:
                raise ValueError(f"the {self.rule} coefficient depends on the input; pass x")
            return act(self.gate(x))
        return act(self.scalar_lambda())

    def forward(self, x: Tensor, fx: Tensor) -> Tensor:
        """`fx` must be the block's fresh branch output: like torchvision's `out += identity`,
        its memory is reused for the result, which saves an activation-sized allocation."""
        if self.rule == "residual":
            return fx.add_(x)
        if self.rule == "plain":
            return fx
        c = self.coefficient(x)
        if not self.fused:
            return (1 - c) * x + (fx * (1 + c) if self.scale_branch else fx)
        if self.is_input_dependent:
            return (fx * (1 + c) if self.scale_branch else fx).addcmul_(x, 1 - c)
        return _DampedSum.apply(x, fx, 1 - c, 1 + c if self.scale_branch else None)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, damped={self.damped}"


class SkipGate(nn.Module):
    """d(x) = W_d x̂ + b_d: a 1x1 convolution, C -> C, of the block's input x standardised per
    channel (x̂ = BN(x), no affine part). Input and output N x C x H x W.

    Why a 1x1 convolution: the paper calls In-ResNet-gating-sig He et al.'s shortcut-only
    gating ("Identity Mappings", Sec. 3.1), whose gate is a 1x1 convolution of the unit's
    input, one value per position and channel.
    Why standardised: at evaluation BN is a fixed per-channel affine map, so d is exactly
    an affine function W'x + b' of x_n, Eq. 21's form. In training it keeps the gate's
    gradient from growing with the scale of the residual stream (|x| reaches 50-90 in
    ResNet-110 at initialisation): reading x itself, the sigmoid gate's weights grow to
    27-140 in 30 steps at lr 0.1 and its loss barely moves (docs/PROTOCOL.md).
    Why W_d = 0 and b_d ~ U[a, b]: every position starts at the coefficients act(U[a, b])
    of the scalar rule with the same interval, so one grid of intervals means the same
    starting point for every rule; He et al. found the gate's bias decisive, and the
    paper's selection over intervals (Table 4) chooses it.
    """

    def __init__(self, channels: int, init: tuple[float, float]):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        # Parameters, not an nn.Conv2d: a network's Kaiming loop over its convolutions
        # must not overwrite the zero start.
        self.weight = nn.Parameter(torch.zeros(channels, channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(*init))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.norm(x), self.weight, self.bias)


class _DampedSum(torch.autograd.Function):
    """a * x + b * fx for 0-d tensors a and b (b None means 1), written into fx's memory.

    Why not plain autograd: it would take the gradients of a and b as sum(g * x) through an
    activation-sized temporary, and could not reuse fx when b scales it. Here the forward
    allocates nothing unless fx must be kept for b's gradient, and those gradients are dot
    products over the storage: the damped skip stays within a few percent of x + fx.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, fx: Tensor, a: Tensor, b: Tensor | None) -> Tensor:
        _, _, need_a, need_b = ctx.needs_input_grad
        # Keep activations alive only for the gradients that need them (frozen attacks don't).
        ctx.save_for_backward(x if need_a else None, fx if need_b else None, a, b)
        if need_b and b is not None:
            return (fx * b).addcmul_(x, a)  # fx itself is kept for b's gradient
        ctx.mark_dirty(fx)
        return (fx if b is None else fx.mul_(b)).addcmul_(x, a)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, fx, a, b = ctx.saved_tensors
        need_x, need_fx, need_a, need_b = ctx.needs_input_grad
        grad_x = g * a if need_x else None
        grad_fx = (g if b is None else g * b) if need_fx else None
        grad_a = _dot(g, x).to(a.dtype) if need_a else None
        grad_b = _dot(g, fx).to(b.dtype) if need_b else None
        return grad_x, grad_fx, grad_a, grad_b


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """sum(u * v) without a temporary when both share one dense layout (NCHW or NHWC)."""
    if u.stride() == v.stride() and any(
        u.is_contiguous(memory_format=f) for f in (torch.contiguous_format, torch.channels_last)
    ):
        flat = (u.numel(),), (1,)
        return torch.dot(u.as_strided(*flat), v.as_strided(*flat))
    return (u * v).sum()
