"""The Krylov methods of the stability stage, on Jacobian-vector products of one block
(torch.func): Lanczos for the spectral norm, Arnoldi for the rightmost eigenvalue of the
shifted Jacobian."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vjp

pass


def jacobian_products(block: Callable[[Tensor], Tensor], h: Tensor) -> tuple[Callable, Callable]:
    """(v -> J v, u -> Jᵀ u) of `block` at `h`. J v is the vjp of the vjp (the transpose of
    the linear map u -> Jᵀ u): it equals torch.func.jvp's exactly and runs ten times faster
    on a CPU, where forward-mode convolutions take a slow path."""
    out, pullback = vjp(block, h)[:2]  # no auxiliary output
    push = vjp(pullback, torch.zeros_like(out))[1]
    return (lambda v: push((v,))[0]), (lambda u: pullback(u)[0])


def spectral_norm(
    block: Callable[[Tensor], Tensor], h: Tensor, start: Tensor, iterations: int, tolerance: float
) -> tuple[Tensor, int]:
    """σ_max(∂block/∂x at h) per image, and the most iterations an image took. Power
    iteration on JᵀJ from `start` (h's shape), its estimate refined by Rayleigh-Ritz over
    every iterate so far (Lanczos: the same products, never below the last iterate's ‖Jv‖,
    never above σ_max, and far fewer iterations on near-degenerate spectra); an image stops
    once its estimate moved by at most `tolerance` of itself twice running, after at least
    half the iterations."""

    def products(rows: Tensor) -> Callable[[Tensor], Tensor]:
        forward, transpose = jacobian_products(block, h[rows])
        return lambda v: transpose(forward(v))

    squared, done = rightmost_ritz(products, start, iterations, tolerance)
    return squared.clamp_min(0).sqrt(), done


def rightmost_eigenvalue(
    block: Callable[[Tensor], Tensor], h: Tensor, start: Tensor, steps: int, tolerance: float = 0.0
) -> tuple[Tensor, int]:
    """max Re λ(∂block/∂x - I) at h per image, by Arnoldi from `start`: the rightmost Ritz
    value after `steps` steps (an image stops earlier as `spectral_norm`'s do)."""

    def products(rows: Tensor) -> Callable[[Tensor], Tensor]:
        forward, _ = jacobian_products(block, h[rows])
        return lambda v: forward(v) - v

    return rightmost_ritz(products, start, steps, tolerance)


def rightmost_ritz(
    products: Callable[[Tensor], Callable[[Tensor], Tensor]], start: Tensor, steps: int, tolerance: float
) -> tuple[Tensor, int]:
    """The largest real part of the Ritz values of a linear map per image after up to
    `steps` Arnoldi steps from `start` (Gram-Schmidt done twice), and the most steps an image
    took. `products(rows)` gives the map on the images `rows` of the batch (each image's
    map acts on its own slice). An image stops when its value moved by at most `tolerance`
    of itself at two steps running after at least half the steps (Lanczos can sit on the
    second singular value for a while before it finds the first), or when its Krylov space closes (an invariant subspace:
    its Ritz values are exact eigenvalues); the map is then rebuilt on the images left, so
    the cost follows each image's own steps."""
    n, dims = len(start), start[0].numel()
    steps = min(steps, dims)
    hessenberg = torch.zeros(n, steps + 1, steps, dtype=torch.float64)
    value = torch.full((n,), math.nan, dtype=torch.float64)
    calm = torch.zeros(n, dtype=torch.long)  # steps running at which the value moved by at most tolerance
    rows = torch.arange(n)
    # the basis flat and in float64, steps x images x dims: Gram-Schmidt as two batched products
    basis = torch.zeros(steps, n, dims, dtype=torch.float64, device=start.device)
    q = _unit(start.reshape(n, -1).double())
    matvec, j = products(rows.to(start.device)), 0
    for j in range(steps):
        basis[j] = q
        w = matvec(q.to(start.dtype).view(len(q), *start.shape[1:])).reshape(len(q), -1).double()
        before = row_norms(w).cpu()
        for _ in range(2):  # classical Gram-Schmidt, twice: orthogonal to working precision
            coefficients = torch.einsum("kbd,bd->bk", basis[: j + 1], w)
            hessenberg[rows, : j + 1, j] += coefficients.cpu()
            w = w - torch.einsum("bk,kbd->bd", coefficients, basis[: j + 1])
        after = row_norms(w).cpu()
        hessenberg[rows, j + 1, j] = after
        ritz = torch.linalg.eigvals(hessenberg[rows, : j + 1, : j + 1]).real.amax(1)
        calm[rows] = torch.where((ritz - value[rows]).abs() <= tolerance * ritz.abs(), calm[rows] + 1, 0)
        value[rows] = ritz
        # closed: what is left is rounding of the products (in the activations' precision)
        going = ((calm[rows] < 2) | (j + 1 < steps // 2)) & (
            after > 100 * torch.finfo(start.dtype).eps * before.clamp_min(1e-300)
        )
        if not bool(going.any()):
            break
        if not bool(going.all()):  # the rest stop here: the map and basis on the images left only
            keep = going.nonzero().squeeze(1)
            rows, w, basis = rows[keep], w[keep.to(w.device)], basis[:, keep.to(basis.device)]
            matvec = products(rows.to(start.device))
        q = _unit(w)
    return value, j + 1


def _unit(v: Tensor) -> Tensor:
    """Each image's vector scaled to unit norm (a zero vector stays zero)."""
    norm = row_norms(v).clamp_min(1e-300).to(v.dtype)
    return v / norm.view(-1, *([1] * (v.dim() - 1)))


def row_norms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.flatten(1).double(), dim=1)
