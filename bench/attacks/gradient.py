"""The gradient attacks written here (FGSM at every radius from one gradient, IFGSM and PGD
as the release writes them, in pixel or normalised units), seeded runs, and the audit that every adversarial
batch must pass before it counts. IFGSM and PGD through torchattacks are the `IFGSM` and
`PGD` perturbations (bench.attacks.perturbations).

Units and shapes everywhere: `x` float32 N x 3 x H x W in [0, 1] (pixel space: the
model normalises inside), `y` int64 N, `eps` and `alpha` in pixel units (2/255 = 0.0078),
the model in eval mode with frozen parameters, so gradients are taken w.r.t. the input
only. Library defaults differ from the paper's (torchattacks: eps 8/255, 10 steps), so
every argument is always passed explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models import UserError
from models.layers import Normalize

T = TypeVar("T")
AUDIT_TOLERANCE = 1e-6  # float32 rounding of x + eps at pixel values near 1
LINF, L2 = "Linf", "L2"  # the norms a radius is measured in


class AttackAuditError(RuntimeError):
    """An adversarial batch left the eps-ball or the image range: the cell is void."""


@dataclass(frozen=True)
class Space:
    """Where a signed-gradient attack steps: radii, steps and random starts are multiplied
    by `scale` and the images clipped to [low, high] (floats, or tensors broadcast to x,
    per channel). `PIXELS`: the paper's, radii in pixel units and [0, 1]."""

    scale: Tensor | float = 1.0
    low: Tensor | float = 0.0
    high: Tensor | float = 1.0

    def clip(self, x: Tensor) -> Tensor:
        # torch.clamp takes numbers or tensors for both bounds; its stubs take one kind
        # at a time, so the union of the two is not an overload they list
        return torch.clamp(x, min=self.low, max=self.high)  # type: ignore[arg-type]


PIXELS = Space()


def normalised_space(model: nn.Module) -> Space:
    """The release's June 2020 scripts (preset release-2020-06): radii and steps in units of
    the model's normalised input (eps/255 added to (x - mean) / std, so eps x std in
    pixels) and that normalised input clipped to [0, 1], i.e. pixels to [mean, mean + std],
    per channel. Read from the model's Normalize layer(s), which must agree."""
    layers = [m for m in model.modules() if isinstance(m, Normalize)]
    if not layers or any(
        not (torch.equal(m.mean, layers[0].mean) and torch.equal(m.std, layers[0].std)) for m in layers
    ):
        raise UserError(
            "attacks in normalised units (preset release-2020-06) need a model with one input "
            "normalisation (a Normalize layer): this defense has "
            + ("none" if not layers else "several that differ")
        )
    mean, std = layers[0].mean, layers[0].std
    return Space(std, mean, mean + std)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], space: Space = PIXELS) -> list[Tensor]:
    """FGSM (paper Eq. 19) at every radius in `eps` from one input gradient: the sign of the
    gradient does not depend on the radius, so k radii cost one backward pass, not k.
    Equals torchattacks.FGSM(model, eps=e)(x, y) for each e exactly (same loss, same ops) in
    `PIXELS`. The sign of the gradient is the same in pixel and normalised units (std > 0)."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    sign = torch.autograd.grad(loss, x)[0].sign()
    x = x.detach()
    return [space.clip(x + e * space.scale * sign) for e in eps]


def signed_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    random_start: bool,
    ball: str,
    space: Space = PIXELS,
) -> Tensor:
    """IFGSM / PGD as the authors' release writes them (test_ifgsm.py, test_pgd.py): with
    `random_start`, start at x + U[-eps, eps] (not clipped); `steps` signed-gradient steps of
    size `alpha`, each projected onto the eps-ball around x (`ball` "image") or around the
    start ("start"; final images then lie up to 2 eps from x), then clipped to the space's
    range. The August 2020 scripts attack normalised inputs with radius eps / std and step
    alpha / std, clipped to the normalised image range: these in `PIXELS`."""
    if steps < 1:
        raise ValueError(f"the attack needs at least one step, got {steps}")
    x_adv = x.detach()
    if random_start:  # the global RNG, as torchattacks
        x_adv = x_adv + torch.empty_like(x).uniform_(-eps, eps) * space.scale
    centre = x_adv if ball == "start" else x.detach()
    low, high = centre - eps * space.scale, centre + eps * space.scale
    for _ in range(steps):
        x_adv = x_adv.clone().requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)[0]
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + alpha * space.scale * grad.sign(), low), high)
        x_adv = space.clip(x_adv)
    return x_adv


def pgd_around_start(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """PGD as the release's August 2020 test_pgd.py runs it (preset authors-code), in pixels:
    `signed_steps` from a random start, projected around that start."""
    return signed_steps(model, x, y, eps, alpha, steps, random_start=True, ball="start")


def run_seeded(attack: Callable[[Tensor, Tensor], T], x: Tensor, y: Tensor, seed: int) -> T:
    """Run `attack(x, y)` with the global RNGs (where torchattacks draws PGD's start) seeded
    by `seed` and restored afterwards: the same seed gives the same starts and adversarials."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return attack(x, y)


def audit(x_adv: Tensor, x: Tensor, reach: float, what: str, norm: str = LINF) -> None:
    """Raise AttackAuditError unless every value of x_adv is finite, in [0, 1] and within
    `reach` (+ AUDIT_TOLERANCE, relative for L2) of x in `norm` (L2: per image, over all its
    values): the radius, or twice it for PGD projected around its random start."""
    delta = (x_adv - x).flatten(1)
    if norm == L2:
        distance = delta.norm(dim=1).amax().item()
        allowed = reach * (1 + AUDIT_TOLERANCE) + AUDIT_TOLERANCE
        found = f"max ||x_adv - x||_2 = {distance:.6f} for a reach of {reach:g}"
    else:
        distance = delta.abs().amax().item()
        allowed = reach + AUDIT_TOLERANCE
        found = f"max |x_adv - x| = {distance * 255:.6f}/255 for a reach of {reach * 255:g}/255"
    low, high = x_adv.amin().item(), x_adv.amax().item()
    if not distance <= allowed or not (0.0 <= low and high <= 1.0):
        raise AttackAuditError(
            f"{what}: adversarial batch fails the audit ({found}, range [{low:.6f}, {high:.6f}])"
        )
