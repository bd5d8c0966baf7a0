"""The skip-rule component shared by every family: paper Eq. 21.

    x_{n+1} = (1 - act(d(x_n))) * x_n + s * f_n(x_n)

A block computes its branch f_n(x_n) once and hands both tensors to its `SkipRule`; the
rule is the only place where residual, interpolated and plain networks differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
    kind: str  # _SCALAR: one λ_n per block; _GATE: d = W_d GAP(x) + b_d; _FIXED: no parameter
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
    # gate is an nn.Linear), so decay pulls d toward 0: coefficient 0.5 (sig), 0 (gating).
    "in-sig": Rule(torch.sigmoid, _SCALAR, False),
    "in-gating": Rule(F.relu, _GATE, False),
    "in-gating-sig": Rule(torch.sigmoid, _GATE, False),
}


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

    Gating rules (paper Sec. 4.4, d(x) = W_d x + b_d): the paper leaves the shape of W_d
    open. We global-average-pool x to C numbers and map them linearly to one scalar per
    example (C + 1 parameters), so the gate costs nothing next to the convolutions. W_d
    starts at zero, so at initialisation every example gets act(b_d): the same starting
    coefficients as the scalar rule with the same `init`.
    """

    def __init__(
        self,
        rule: str,
        channels: int,
        init: tuple[float, float] = DEFAULT_LAMBDA_INIT,
        damped: bool = True,
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
            self.gate = nn.Linear(channels, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.uniform_(self.gate.bias, low, high)

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
        """act(d(x)): a 0-d tensor, or shape (N, 1, 1, 1) for the gating rules (needs `x`)."""
        if self.rule == "residual":
            return torch.zeros(())
        if self.rule == "plain":
            return torch.ones(())
        if self.is_input_dependent:
            if x is None:
                raise ValueError(f"the {self.rule} coefficient depends on the input; pass x")
            return self.act(self.gate(x.mean(dim=(2, 3))))[:, :, None, None]
        return self.act(self.scalar_lambda())

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


class _DampedSum(torch.autograd.Function):
    """a * x + b * fx for 0-d tensors a and b (b None means 1), written into fx's memory.

    Why not plain autograd: it would take the gradients of a and b as sum(g * x) through an
    activation-sized temporary, and could not reuse fx when b scales it. Here the forward
    allocates nothing unless fx must be kept for b's gradient, and those gradients are dot
    products over the storage: the damped skip stays within a few percent of x + fx.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fx: Tensor, a: Tensor, b: Tensor | None) -> Tensor:
        _, _, need_a, need_b = ctx.needs_input_grad
        # Keep activations alive only for the gradients that need them (frozen attacks don't).
        ctx.save_for_backward(x if need_a else None, fx if need_b else None, a, b)
        if need_b:
            return (fx * b).addcmul_(x, a)  # fx itself is kept for b's gradient
        ctx.mark_dirty(fx)
        return (fx if b is None else fx.mul_(b)).addcmul_(x, a)

    @staticmethod
    def backward(ctx, g: Tensor):
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
