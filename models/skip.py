"""The skip-rule component shared by every family: paper Eq. 21.

    x_{n+1} = (1 - act(d(x_n))) * x_n + s * f_n(x_n)

A block computes its branch f_n(x_n) once and hands both tensors to its `SkipRule`; the
rule is the only place where residual, interpolated and plain networks differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# name -> (activation applied to d, how d is parametrised, residual-branch scale uses c)
_SCALAR, _GATE, _FIXED = "scalar", "gate", "fixed"
RULES: dict[str, tuple[Callable[[Tensor], Tensor] | None, str, bool]] = {
    "residual": (None, _FIXED, False),  # c = 0: x + f(x)
    "plain": (None, _FIXED, False),  # c = 1: f(x), no skip at all
    "in": (F.relu, _SCALAR, False),  # Eq. 13
    "lambda-in": (F.relu, _SCALAR, True),  # Eq. 15: s = 1 + ReLU(lambda)
    "in-sig": (torch.sigmoid, _SCALAR, False),
    "in-gating": (F.relu, _GATE, False),
    "in-gating-sig": (torch.sigmoid, _GATE, False),
}


def uses_lambda(rule: str) -> bool:
    """Whether the rule damps its skip by a trained λ (the residual and plain ones do not)."""
    return rule in RULES and RULES[rule][1] != _FIXED


class SkipRule(nn.Module):
    """Combines a block's skip tensor `x` and branch output `fx` (same shape, N x C x H x W).

    Args:
        rule: one of `RULES`.
        channels: C of `x`; sizes the gate of the gating rules.
        init: U[a, b] for the trainable parameter d: the scalar lambda_n, or the gate's
            bias b_d. The paper initialises lambda_n (the parameter, not act(lambda_n)).
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
        init: tuple[float, float] = (0.2, 0.25),
        damped: bool = True,
    ):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown skip rule {rule!r}; choose one of {sorted(RULES)}")
        low, high = init
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(f"lambda init U[{low}, {high}] needs finite bounds with low <= high")
        if RULES[rule][0] is F.relu and high > 2:  # the paper: stable up to 2 (forward Euler)
            raise ValueError(
                f"lambda init U[{low}, {high}] leaves the stable range: rule {rule!r} needs high <= 2 "
                "(1 removes the skip, (1, 2] makes it negative, beyond 2 the forward-Euler step diverges)"
            )
        self.damped = damped
        self.rule = rule if damped else "residual"
        self.act, kind, self.scale_branch = RULES[self.rule]
        if kind == _SCALAR:
            self.lam = nn.Parameter(torch.empty(()).uniform_(low, high))
        elif kind == _GATE:
            self.gate = nn.Linear(channels, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.uniform_(self.gate.bias, low, high)

    @property
    def is_input_dependent(self) -> bool:
        return hasattr(self, "gate")

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
        return self.act(self.lam)

    def forward(self, x: Tensor, fx: Tensor) -> Tensor:
        """`fx` must be the block's fresh branch output: like torchvision's `out += identity`,
        its memory is reused for the result, which saves an activation-sized allocation."""
        if self.rule == "residual":
            return fx.add_(x)
        if self.rule == "plain":
            return fx
        c = self.coefficient(x)
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
