"""Stability of the SGD update per Hessian eigenvalue: local Lyapunov exponents and the chaos classes.

Per eigen-direction of the Hessian with eigenvalue h, the one-step tangent map of the update
``torch.optim.SGD`` performs (:mod:`lightning_chaos.core.tangent_map`) acts on the effective curvature
``h̃ = h + wd``. Without momentum it is the number ``1 − γh̃``; with momentum μ, dampening τ or Nesterov
a 2 × 2 block with characteristic polynomial ``z² − T z + D``::

    heavy ball: T = 1 + μ − (1 − τ)γh̃,   D = μ
    Nesterov:   T = (1 + μ)(1 − γh̃),      D = μ(1 − γh̃)

Its local Lyapunov exponent (LLE) is ``log max|z|`` (``log|1 − γh̃|`` without momentum; Herrmann, Granz
and Landgraf, "Chaotic Dynamics are Intrinsic to Neural Network Training with SGD", NeurIPS 2022). The
LLE is negative exactly on the stability interval ``0 < h̃ < u`` (:func:`stability_interval`)::

    u = 2/γ                          (μ = 0)
    u = 2(1 + μ) / ((1 − τ) γ)       (heavy ball)
    u = 2(1 + μ) / ((1 + 2μ) γ)      (Nesterov)

and positive for ``h̃ < 0`` or ``h̃ > u``: those directions are *chaotic*, the others *stable*. An
eigenvalue is *edge* when ``|h̃ − b| ≤ tolerance · scale`` for a boundary ``b ∈ {0, u}``, with ``scale``
the spectral radius ``max_i |h_i|`` unless given: an edge direction has ``|LLE| ≤ γ · tolerance · scale``,
indistinguishable from 0 at that resolution (ReLU networks have many exact zeros).

Two bands are provided. :data:`EDGE_TOLERANCE` (``2e-2``) is the default of every count: stochastic
Lanczos quadrature resolves the spectrum near 0 only to about ``‖H‖/m`` after m steps (the Hessians of
networks have a dense bulk of tiny eigenvalues of both signs there), so counts split at a finer band
are not reproducible by it, and one default keeps counts comparable when a model outgrows the exact
spectrum. :data:`EXACT_EDGE_TOLERANCE` (``1e-5``) is the finest band that an exact float32 spectrum
resolves (the exact zeros of ReLU networks come out of ``eigvalsh`` below ``1e-7 ρ``); CGD uses it to
decide which directions to remove.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_chaos.core.sgd import SGDHyperparameters

__all__ = [
    "EDGE_TOLERANCE",
    "EXACT_EDGE_TOLERANCE",
    "classify_eigenvalues",
    "local_lyapunov_exponents",
    "log_tangent_map_norm",
    "spectral_radius",
    "stability_interval",
]

EDGE_TOLERANCE = 2e-2
"""Default half-width of the edge bands, relative to the spectral radius (module docstring)."""

EXACT_EDGE_TOLERANCE = 1e-5
"""The finest edge band an exact float32 spectrum resolves, relative to the spectral radius."""


def stability_interval(sgd: SGDHyperparameters) -> tuple[float, float]:
    """Effective curvatures ``h̃ = h + wd`` with negative steady-state LLE: the open interval ``(0, u)``.

    Per eigen-direction the steady-state map has characteristic polynomial ``z² − T z + D`` (μ > 0) and is
    contracting iff ``|D| < 1``, ``1 − T + D > 0`` and ``1 + T + D > 0`` (Jury). Heavy ball gives
    ``h̃ > 0`` and ``h̃ < 2(1 + μ)/((1 − τ)γ)``; Nesterov ``h̃ > 0`` and ``h̃ < 2(1 + μ)/((1 + 2μ)γ)`` (the
    ``|D| < 1`` condition is then implied); μ = 0: ``|1 − γh̃| < 1``, i.e. ``0 < h̃ < 2/γ``. Outside the
    closed interval the LLE is positive (a real root leaves the unit disc through 1 or −1).

    Args:
        sgd: the update.

    Returns:
        ``(0.0, u)``.

    Raises:
        ValueError: heavy ball with ``dampening == 1`` (the gradient never enters the update after the
            first step; every direction has ``|z| = 1``).

    Example:
        >>> stability_interval(SGDHyperparameters(lr=0.1))
        (0.0, 20.0)
    """
    lr, mu = sgd.lr, sgd.momentum
    if mu == 0:
        return 0.0, 2.0 / lr
    if sgd.nesterov:
        return 0.0, 2.0 * (1 + mu) / ((1 + 2 * mu) * lr)
    if sgd.dampening == 1:
        raise ValueError(
            "dampening=1 with momentum removes the gradient from the update: no stability interval"
        )
    return 0.0, 2.0 * (1 + mu) / ((1 - sgd.dampening) * lr)


def local_lyapunov_exponents(eigenvalues: Tensor, sgd: SGDHyperparameters) -> Tensor:
    """Steady-state local Lyapunov exponents of the SGD update per Hessian eigenvalue.

    ``LLE = log max|z|`` over the roots of the per-direction block (module docstring): for real roots
    ``(|T| + √(T² − 4D))/2``, for a complex pair ``√D``. Exponents are ``-inf`` where the block is nilpotent
    (μ = 0 and h̃ = 1/γ exactly: the direction is annihilated). For torch's first momentum step pass
    ``sgd.at_first_step()``.

    Args:
        eigenvalues: Hessian eigenvalues h (without weight decay), any shape.
        sgd: the update.

    Returns:
        LLEs, same shape as ``eigenvalues`` (floating dtype of the input, computed in float64).

    Example:
        >>> local_lyapunov_exponents(torch.tensor([-1.0, 5.0, 30.0]), SGDHyperparameters(lr=0.1)).exp()
        tensor([1.1000, 0.5000, 2.0000])
    """
    lr, mu = sgd.lr, sgd.momentum
    h = eigenvalues.to(torch.float64) + sgd.weight_decay
    if mu == 0:
        radius = (1 - lr * h).abs()
    else:
        if sgd.nesterov:
            trace = (1 + mu) * (1 - lr * h)
            det = mu * (1 - lr * h)
        else:
            trace = 1 + mu - (1 - sgd.dampening) * lr * h
            det = torch.full_like(h, mu)
        disc = trace**2 - 4 * det
        real = (trace.abs() + disc.clamp_min(0).sqrt()) / 2
        radius = torch.where(disc >= 0, real, det.clamp_min(0).sqrt())
    out_dtype = eigenvalues.dtype if eigenvalues.is_floating_point() else torch.get_default_dtype()
    return torch.log(radius).to(out_dtype)


def log_tangent_map_norm(eigenvalues: Tensor, sgd: SGDHyperparameters) -> float:
    """Log spectral norm ``log ‖J‖₂`` of the one-step SGD tangent map, from the Hessian eigenvalues.

    Every block of ``J`` (:func:`lightning_chaos.core.tangent_map.sgd_tangent_map`) is a polynomial in
    ``H̃ = H + wd·I``, so in the eigenbasis of H (applied to δθ and δv alike, an orthogonal change of
    basis) ``J`` splits into one block ``B(h̃)`` per eigenvalue and ``‖J‖₂ = max_i ‖B(h̃_i)‖₂``::

        μ = 0:      B = 1 − γh̃                                   (‖B‖ = |1 − γh̃| = exp(LLE))
        heavy ball: B = [[1 − γ(1 − τ)h̃, −γμ], [(1 − τ)h̃, μ]]
        Nesterov:   B = [[1 − γ(1 + μ)h̃, −γμ²], [h̃, μ]]

    with ``‖[[a, b], [c, d]]‖₂ = (√((a + d)² + (c − b)²) + √((a − d)² + (b + c)²)) / 2``. The block norm is
    convex in h̃ (B is affine in it), so the maximum sits at the smallest or the largest eigenvalue:
    passing only the two extremes gives the same value.

    By submultiplicativity ``log ‖J_T ⋯ J_1‖ ≤ Σ_t log ‖J_t‖``: the time average of this quantity bounds
    the finite-time maximal Lyapunov exponent at every T. For μ = 0 it is the largest LLE of
    :func:`local_lyapunov_exponents`; with momentum ``J`` is not normal and its norm exceeds the spectral
    radius (the largest LLE), which is then no bound.

    Args:
        eigenvalues: Hessian eigenvalues h (without weight decay), any shape, at least one.
        sgd: the update (``sgd.at_first_step()`` for torch's first momentum step).

    Returns:
        ``max_i log ‖B(h̃_i)‖₂`` (``-inf`` if J = 0).
    """
    if eigenvalues.numel() == 0:
        raise ValueError("eigenvalues must contain at least one value")
    lr, mu = sgd.lr, sgd.momentum
    h = eigenvalues.to(torch.float64).reshape(-1) + sgd.weight_decay
    if mu == 0:
        return float(torch.log((1 - lr * h).abs().max()))
    if sgd.nesterov:
        a, b, c = 1 - lr * (1 + mu) * h, -lr * mu**2, h
    else:
        keep = 1.0 - sgd.dampening
        a, b, c = 1 - lr * keep * h, -lr * mu, keep * h
    norm = (torch.sqrt((a + mu) ** 2 + (c - b) ** 2) + torch.sqrt((a - mu) ** 2 + (b + c) ** 2)) / 2
    return float(torch.log(norm.max()))


def spectral_radius(eigenvalues: Tensor) -> float:
    """``max_i |h_i|`` (0 for no eigenvalues): the default scale of the edge bands."""
    return float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0


def classify_eigenvalues(
    eigenvalues: Tensor,
    sgd: SGDHyperparameters,
    tolerance: float = EDGE_TOLERANCE,
    *,
    scale: float | None = None,
) -> dict[str, Tensor]:
    """Boolean masks classifying each eigenvalue (module docstring for the rules).

    With ``h̃ = h + wd``, ``(0, u) = stability_interval(sgd)`` and ``ε = tolerance · scale``:
    ``edge = |h̃| ≤ ε or |h̃ − u| ≤ ε``; ``chaotic = not edge and (h̃ < 0 or h̃ > u)``;
    ``stable = not edge and 0 < h̃ < u``; ``negative = h̃ < −ε``; ``positive = h̃ > ε``; ``zero = |h̃| ≤ ε``.
    ``chaotic | edge | stable`` and ``negative | zero | positive`` each partition the eigenvalues.

    Args:
        eigenvalues: Hessian eigenvalues h (without weight decay), shape ``(n,)``.
        sgd: the update.
        tolerance: edge half-width relative to ``scale``, ``≥ 0``.
        scale: reference magnitude; default :func:`spectral_radius` of ``eigenvalues`` (pass the spectral
            radius when ``eigenvalues`` is a subset of the spectrum).

    Returns:
        Boolean tensors ``chaotic, edge, stable, negative, positive, zero``, each of the input's shape.

    Example:
        >>> masks = classify_eigenvalues(torch.tensor([-2.0, 0.0, 5.0, 30.0]), SGDHyperparameters(lr=0.1))
        >>> masks["chaotic"].tolist(), masks["edge"].tolist()
        ([True, False, False, True], [False, True, False, False])
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    _, upper = stability_interval(sgd)
    h = eigenvalues.to(torch.float64)
    eps = tolerance * (spectral_radius(h) if scale is None else scale)
    h = h + sgd.weight_decay
    zero = h.abs() <= eps
    edge = zero | ((h - upper).abs() <= eps)
    return {
        "chaotic": ~edge & ((h < 0) | (h > upper)),
        "edge": edge,
        "stable": ~edge & (h > 0) & (h < upper),
        "negative": h < -eps,
        "positive": h > eps,
        "zero": zero,
    }
