"""The gradient attacks written here (FGSM at every radius from one gradient, PGD around
its start as the release runs it), seeded runs, and the audit that every adversarial
batch must pass before it counts. IFGSM and PGD through torchattacks are the `IFGSM` and
`PGD` perturbations (bench.attacks.perturbations).

Units and shapes everywhere: `x` float32 N x 3 x H x W in [0, 1] (pixel space: the
model normalises inside), `y` int64 N, `eps` and `alpha` in pixel units (2/255 = 0.0078),
the model in eval mode with frozen parameters, so gradients are taken w.r.t. the input
only. Library defaults differ from the paper's (torchattacks: eps 8/255, 10 steps), so
every argument is always passed explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

AUDIT_TOLERANCE = 1e-6  # float32 rounding of x + eps at pixel values near 1


class AttackAuditError(RuntimeError):
    """An adversarial batch left the eps-ball or the image range: the cell is void."""


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float]) -> list[Tensor]:
    """FGSM (paper Eq. 19) at every radius in `eps` from one input gradient: the sign of the
    gradient does not depend on the radius, so k radii cost one backward pass, not k.
    Equals torchattacks.FGSM(model, eps=e)(x, y) for each e exactly (same loss, same ops)."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    sign = torch.autograd.grad(loss, x)[0].sign()
    x = x.detach()
    return [torch.clamp(x + e * sign, min=0, max=1) for e in eps]


def pgd_around_start(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """PGD as the authors' release runs it (test_pgd.py): start at x + U[-eps, eps], not
    clipped to [0, 1]; `steps` signed-gradient steps of size `alpha`, each projected onto the
    eps-ball around that *start* (not around x), then clipped to [0, 1]. Final images can
    lie up to 2 eps from x. The release attacks normalised inputs with a per-channel radius
    eps / std and step alpha / std: the same ball, steps and clipping as these in pixels."""
    if steps < 1:
        raise ValueError(f"pgd needs at least one step, got {steps}")
    start = x.detach() + torch.empty_like(x).uniform_(-eps, eps)  # the global RNG, as torchattacks
    low, high = start - eps, start + eps
    x_adv = start.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)[0]
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + alpha * grad.sign(), low), high).clamp_(0, 1)
    return x_adv


def run_seeded(attack, x: Tensor, y: Tensor, seed: int):
    """Run `attack(x, y)` with the global RNGs (where torchattacks draws PGD's start) seeded
    by `seed` and restored afterwards: the same seed gives the same starts and adversarials."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return attack(x, y)


def audit(x_adv: Tensor, x: Tensor, reach: float, what: str) -> None:
    """Raise AttackAuditError unless every value of x_adv is finite, in [0, 1] and within
    `reach` (+ AUDIT_TOLERANCE) of x in L-infinity: the radius, or twice it for PGD
    projected around its random start."""
    distance = (x_adv - x).abs().amax().item()
    low, high = x_adv.amin().item(), x_adv.amax().item()
    if not distance <= reach + AUDIT_TOLERANCE or not (0.0 <= low and high <= 1.0):
        raise AttackAuditError(
            f"{what}: adversarial batch fails the audit (max |x_adv - x| = {distance * 255:.6f}/255 "
            f"for a reach of {reach * 255:g}/255, range [{low:.6f}, {high:.6f}])"
        )
