"""How many Hessian directions are chaotic, edge or stable under SGD: exact counts and SLQ estimates.

The classes are those of :mod:`lightning_chaos.core.stability` (chaotic: positive local Lyapunov
exponent; stable: negative; edge: within the band of 0 or the stability edge u; and the curvature signs
negative / zero / positive). Counted exactly from all N eigenvalues (:func:`spectral_counts`) or estimated
from the Gauss quadrature rules of stochastic Lanczos quadrature (:func:`slq_spectral_counts`, with
quadrature brackets from :func:`slq_spectral_count_bounds`). :func:`exact_summary` and :func:`slq_summary`
add the largest and smallest local Lyapunov exponents: what ``LyapunovSpectrumMonitor`` logs.

Every count takes the same default band, :data:`~lightning_chaos.core.stability.EDGE_TOLERANCE`, so that
exact and SLQ counts of one Hessian mean the same thing; the measured agreement at that band is in
``benchmarks/README.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.slq import cdf_bracket
from lightning_chaos.core.stability import (
    EDGE_TOLERANCE,
    classify_eigenvalues,
    local_lyapunov_exponents,
    spectral_radius,
    stability_interval,
)

__all__ = [
    "COUNT_KEYS",
    "exact_summary",
    "slq_spectral_count_bounds",
    "slq_spectral_counts",
    "slq_summary",
    "spectral_counts",
]

COUNT_KEYS = ("n_chaotic", "n_edge", "n_stable", "n_negative", "n_positive", "n_zero")
"""The six counts in logging order; ``n_chaotic + n_edge + n_stable = n_negative + n_zero + n_positive``."""


def _support_radius(nodes: Tensor, weights: Tensor) -> float:
    """Largest ``|θ_pj|`` over nodes of positive weight (extreme Ritz values approach ``‖H‖`` from inside)."""
    return spectral_radius(nodes[weights > 0])


def spectral_counts(
    eigenvalues: Tensor,
    sgd: SGDHyperparameters,
    tolerance: float = EDGE_TOLERANCE,
    *,
    scale: float | None = None,
) -> dict[str, int]:
    """Count chaotic / edge / stable and negative / zero / positive eigenvalues of an exact spectrum.

    Args:
        eigenvalues: all N Hessian eigenvalues (e.g. ``eigvalsh`` of the dense Hessian).
        sgd: the update.
        tolerance: edge half-width relative to ``scale``.
        scale: reference magnitude for the tolerance; default the spectral radius.

    Returns:
        :data:`COUNT_KEYS` → int; each partition sums to N.

    Example:
        >>> spectral_counts(torch.tensor([-1.0, 0.0, 1.0, 5.0, 25.0]), SGDHyperparameters(lr=0.1))
        {'n_chaotic': 2, 'n_edge': 1, 'n_stable': 2, 'n_negative': 1, 'n_positive': 3, 'n_zero': 1}
    """
    masks = classify_eigenvalues(eigenvalues, sgd, tolerance, scale=scale)
    return {f"n_{name}": int(mask.sum()) for name, mask in masks.items()}


def slq_spectral_counts(
    nodes: Tensor,
    weights: Tensor,
    dim: int,
    sgd: SGDHyperparameters,
    tolerance: float = EDGE_TOLERANCE,
    *,
    scale: float | None = None,
) -> dict[str, float]:
    """SLQ estimates of :func:`spectral_counts`: ``N · (1/P) Σ_p Σ_j τ_pj 1[class(θ_pj)]``.

    The nodes are classified like eigenvalues. The quadrature error sits at the class boundaries: a
    band narrower than the quadrature's resolution near 0 (about ``‖H‖ / m``) is not resolved, which is
    why the default band is :data:`~lightning_chaos.core.stability.EDGE_TOLERANCE`.

    Args:
        nodes: ``(P, m)`` quadrature nodes from :func:`~lightning_chaos.core.slq.slq`.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        sgd: the update.
        tolerance: edge half-width relative to ``scale``.
        scale: reference magnitude; default the largest ``|θ_pj|`` among nodes with positive weight.

    Returns:
        :data:`COUNT_KEYS` → float; each partition sums to N.
    """
    scale = _support_radius(nodes, weights) if scale is None else scale
    masks = classify_eigenvalues(nodes, sgd, tolerance, scale=scale)
    return {f"n_{name}": float(dim * (weights * mask).sum(dim=1).mean()) for name, mask in masks.items()}


def slq_spectral_count_bounds(
    nodes: Tensor,
    weights: Tensor,
    dim: int,
    sgd: SGDHyperparameters,
    tolerance: float = EDGE_TOLERANCE,
    *,
    scale: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Quadrature brackets ``(low, high)`` of the counts of :func:`slq_spectral_counts`.

    Each class is a union of intervals of h bounded by ``b₀ = −wd`` (curvature 0) and ``b_u = u − wd``
    (the stability edge), widened by ``ε = tolerance · scale``::

        negative: h < b₀ − ε            positive: h > b₀ + ε          zero: |h − b₀| ≤ ε
        chaotic:  h < b₀ − ε  or  h > b_u + ε                         stable: b₀ + ε < h < b_u − ε
        edge:     the rest (N minus chaotic minus stable)

    When ``2ε ≥ u`` (a large spectral radius at a large learning rate) the two edge bands meet: stable
    is empty and edge is the single interval ``[b₀ − ε, b_u + ε]``, as in the exact classification. Per
    probe, the Chebyshev–Markov–Stieltjes inequalities bracket the spectral distribution function at
    each endpoint by the weights of the adjacent nodes (:func:`~lightning_chaos.core.slq.cdf_bracket`);
    the bracket of a union or complement follows by interval arithmetic, is clipped to ``[0, 1]`` per
    probe and averaged. It brackets the Hutchinson estimate with exact quadrature, not the probe noise.

    Args:
        nodes: ``(P, m)`` quadrature nodes.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        sgd: the update.
        tolerance: edge half-width relative to ``scale``.
        scale: reference magnitude; default as :func:`slq_spectral_counts`.

    Returns:
        :data:`COUNT_KEYS` → ``(low, high)`` with ``0 ≤ low ≤ high ≤ N``.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    _, upper = stability_interval(sgd)
    eps = tolerance * (_support_radius(nodes, weights) if scale is None else scale)
    zero, edge = -sgd.weight_decay, upper - sgd.weight_decay

    def below(t: float, strict: bool) -> tuple[Tensor, Tensor]:  # bracket of F(t−) or F(t) per probe
        return cdf_bracket(nodes, weights, t, strict)

    def complement(bracket: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return 1 - bracket[1], 1 - bracket[0]

    neg = below(zero - eps, strict=True)
    not_pos = below(zero + eps, strict=False)
    above = complement(below(edge + eps, strict=False))
    if 2 * eps < upper:
        stable_top = below(edge - eps, strict=True)
        stable = (stable_top[0] - not_pos[1], stable_top[1] - not_pos[0])
    else:  # the edge bands meet: no stable interval
        stable = (torch.zeros_like(neg[0]), torch.zeros_like(neg[0]))
    brackets = {
        "chaotic": (neg[0] + above[0], neg[1] + above[1]),
        "stable": stable,
        "negative": neg,
        "positive": complement(not_pos),
        "zero": (not_pos[0] - neg[1], not_pos[1] - neg[0]),
    }
    brackets = {k: (lo.clamp(0, 1), hi.clamp(0, 1)) for k, (lo, hi) in brackets.items()}
    chaotic, stable = brackets["chaotic"], brackets["stable"]
    brackets["edge"] = ((1 - chaotic[1] - stable[1]).clamp(0, 1), (1 - chaotic[0] - stable[0]).clamp(0, 1))
    return {
        key: (float(dim * brackets[key[2:]][0].mean()), float(dim * brackets[key[2:]][1].mean()))
        for key in COUNT_KEYS
    }


def exact_summary(
    eigenvalues: Tensor, sgd: SGDHyperparameters, tolerance: float = EDGE_TOLERANCE
) -> dict[str, float]:
    """Counts and extreme local Lyapunov exponents of an exact spectrum.

    Args:
        eigenvalues: all N Hessian eigenvalues.
        sgd: the update.
        tolerance: edge half-width relative to the spectral radius.

    Returns:
        :data:`COUNT_KEYS`, ``lle_max``, ``lle_min`` and ``edge_tolerance`` (the band used).
    """
    lles = local_lyapunov_exponents(eigenvalues, sgd)
    values: dict[str, float] = {"edge_tolerance": tolerance}
    values.update(spectral_counts(eigenvalues, sgd, tolerance))
    values.update(lle_max=float(lles.max()), lle_min=float(lles.min()))
    return values


def slq_summary(
    nodes: Tensor,
    weights: Tensor,
    dim: int,
    extremes: Tensor,
    sgd: SGDHyperparameters,
    tolerance: float = EDGE_TOLERANCE,
) -> dict[str, float]:
    """SLQ counts with their brackets and the local Lyapunov exponents from extreme Ritz values.

    The LLE is quasi-convex in h, so the largest one is decided by the extreme eigenvalues: ``lle_max`` is
    taken over ``extremes`` (Ritz values of a Lanczos run, reliable once converged). The smallest one is
    attained inside the spectrum (near ``h̃ = 1/γ`` without momentum): ``lle_min`` is the minimum over the
    extremes and the quadrature nodes, an estimate, not a bound.

    Args:
        nodes: ``(P, m)`` quadrature nodes.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        extremes: extreme Ritz values of H, any number.
        sgd: the update.
        tolerance: edge half-width relative to the spectral radius (estimated from ``extremes`` and the
            nodes).

    Returns:
        :data:`COUNT_KEYS`, ``<count>_low``/``<count>_high``, ``lle_max``, ``lle_min``, ``edge_tolerance``.
    """
    extremes = extremes.detach().double().cpu().reshape(-1)
    scale = max(spectral_radius(extremes), _support_radius(nodes, weights))
    values: dict[str, float] = {"edge_tolerance": tolerance}
    values.update(slq_spectral_counts(nodes, weights, dim, sgd, tolerance, scale=scale))
    for key, (low, high) in slq_spectral_count_bounds(
        nodes, weights, dim, sgd, tolerance, scale=scale
    ).items():
        values.update({f"{key}_low": low, f"{key}_high": high})
    candidates = torch.cat([extremes, nodes[weights > 0]])
    values.update(
        lle_max=float(local_lyapunov_exponents(extremes, sgd).max()),
        lle_min=float(local_lyapunov_exponents(candidates, sgd).min()),
    )
    return values
