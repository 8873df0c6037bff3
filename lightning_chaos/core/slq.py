"""Stochastic Lanczos quadrature (SLQ): eigenvalue counts and densities of a matrix-free operator.

For a probe ``u = z/‖z‖`` (z Rademacher or Gaussian), m Lanczos steps from u give the m-point Gauss
quadrature ``(θ_j, τ_j)`` of the measure ``Σ_i (v_iᵀ u)² δ(x − h_i)`` (Golub and Welsch, 1969); averaging
over P probes estimates the spectral measure ``(1/N) Σ_i δ(x − h_i)`` (Hutchinson's trace estimator), so
``tr f(A) ≈ N · (1/P) Σ_p Σ_j τ_pj f(θ_pj)`` (Ubaru, Chen and Saad, "Fast estimation of tr(f(A)) via
stochastic Lanczos quadrature", SIAM J. Matrix Anal. Appl., 2017). With ``f`` an indicator this counts
eigenvalues in an interval (:func:`slq_count`), with brackets from the Chebyshev–Markov–Stieltjes
inequalities (:func:`slq_count_bounds`); with a Gaussian kernel it gives a smoothed density
(:func:`slq_density`). The chaos counts of SGD built on it are in :mod:`lightning_chaos.core.counts`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_chaos.core.lanczos import lanczos, random_block
from lightning_chaos.core.operators import LinearOperator, as_matmat

__all__ = [
    "SLQ_REORTHOGONALIZE_BYTES",
    "cdf_bracket",
    "slq",
    "slq_count",
    "slq_count_bounds",
    "slq_density",
]

SLQ_REORTHOGONALIZE_BYTES = 2**28
"""Largest Lanczos basis (bytes per block of probes) that :func:`slq` reorthogonalises by default."""


def slq(
    op: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    dim: int | None = None,
    num_probes: int = 10,
    num_steps: int = 80,
    generator: torch.Generator | None = None,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    probes_per_block: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reorthogonalize: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature of the spectral measure ``(1/N) Σ_i δ(x − h_i)`` (module docstring).

    Probes that break down early (invariant Krylov space, where quadrature is exact) are padded with
    zero-weight nodes at 0. The probes of a block are advanced together, one block product
    ``A [u_1 … u_P]`` per Lanczos step (batched Hessian-vector products for a ``HessianOperator``).

    Full reorthogonalisation makes each probe's rule the exact Gauss rule (and the brackets of
    :func:`slq_count_bounds` rigorous), but it keeps ``P·m`` vectors of length N and reads them four
    times per step: O(P m N) memory and O(P m² N) memory traffic. Without it the three-term recurrence
    loses orthogonality once Ritz values converge, which duplicates converged nodes ("ghosts") and splits
    their weight but leaves the quadrature of the spectral distribution accurate (Chen, Trogdon and
    Ubaru, "Analysis of stochastic Lanczos quadrature for spectrum approximation", ICML 2021); memory is
    then O(P N) and the brackets are approximate. By default (``None``) runs are reorthogonalised while
    their basis (``probes_per_block · m · N`` entries) fits in :data:`SLQ_REORTHOGONALIZE_BYTES` (256 MiB:
    N up to about 80k at 10 probes × 80 steps in float32) and run without it beyond. The measured effect
    on the counts is in ``benchmarks/README.md``.

    Args:
        op: dense symmetric ``(N, N)`` tensor, a :class:`~lightning_chaos.core.operators.LinearOperator`,
            or a bare matvec.
        dim: N (required for a bare matvec).
        num_probes: P.
        num_steps: m (Lanczos steps per probe, capped at N).
        generator: random generator for the probes.
        distribution: ``"rademacher"`` or ``"gaussian"`` probes.
        probes_per_block: probes advanced together (memory ``≈ probes_per_block · m · N``); default all.
        dtype: working dtype for a bare matvec (default ``torch.get_default_dtype()``).
        device: working device for a bare matvec.
        reorthogonalize: full reorthogonalisation of each run; ``None`` decides by the basis size (above).

    Returns:
        ``nodes`` and ``weights``, each ``(P, m)``, float64 on the CPU.

    Example:
        >>> h = torch.arange(1.0, 101.0, dtype=torch.float64)
        >>> nodes, weights = slq(lambda v: h * v, 100, 20, 30, torch.Generator().manual_seed(0),
        ...                      dtype=torch.float64)
        >>> round(slq_count(nodes, weights, 100, upper=50.5))
        50
    """
    _, dim, dtype, device = as_matmat(op, dim, dtype, device)
    if num_probes < 1:
        raise ValueError(f"num_probes must be positive, got {num_probes}")
    block = num_probes if probes_per_block is None else max(1, probes_per_block)
    m = min(num_steps, dim)
    if reorthogonalize is None:
        basis_bytes = min(block, num_probes) * m * dim * torch.finfo(dtype).bits // 8
        reorthogonalize = basis_bytes <= SLQ_REORTHOGONALIZE_BYTES
    rules = []
    for first in range(0, num_probes, block):
        z = random_block(dim, min(block, num_probes - first), generator, dtype, device, distribution)
        rules.append(lanczos(op, m, start=z, dim=dim, reorthogonalize=reorthogonalize, keep_basis=False))
    nodes, weights = zip(*(rule.quadrature() for rule in rules), strict=True)
    return torch.cat(nodes), torch.cat(weights)


def slq_count(
    nodes: Tensor, weights: Tensor, dim: int, lower: float = -math.inf, upper: float = math.inf
) -> float:
    """Estimate the eigenvalue count in ``[lower, upper]``: ``N (1/P) Σ_pj τ_pj 1[lower ≤ θ_pj ≤ upper]``.

    Two error sources. (i) Probe noise: for a true count c the standard deviation is about
    ``√(2 c (1 − c/N) / P)`` for Gaussian probes (Rademacher is no worse). (ii) Quadrature: by the
    Chebyshev–Markov–Stieltjes inequalities each probe's quadrature CDF is off by at most the weights of
    the two nodes adjacent to an endpoint (:func:`slq_count_bounds` returns that bracket). This is small for
    an endpoint in a gap or in the sparse tail (outliers above 2/γ), but an endpoint inside a dense bulk
    or next to an atom is resolved only to about ``‖A‖ / m``. In particular the exact zeros of ReLU
    networks form an atom at 0 that the nodes near 0 carry together with the surrounding bulk, so counts
    split at 0 (negative / zero / positive, and the negative-curvature part of chaotic) can be off by a
    sizeable fraction of N at m ≈ 100 (measured in ``benchmarks/README.md``). Use the bracket, not the
    point estimate, there, or move the boundary out of the bulk (the edge band of
    :data:`~lightning_chaos.core.stability.EDGE_TOLERANCE`).

    Args:
        nodes: ``(P, m)`` quadrature nodes from :func:`slq`.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        lower: lower end of the (closed) interval.
        upper: upper end of the (closed) interval.

    Returns:
        The estimated count (a float in ``[0, N]``).
    """
    inside = (nodes >= lower) & (nodes <= upper)
    return float(dim * (weights * inside).sum(dim=1).mean())


def cdf_bracket(nodes: Tensor, weights: Tensor, t: float, strict: bool) -> tuple[Tensor, Tensor]:
    """Per-probe bracket ``[low, high]`` of ``F(t)`` (``F(t−)`` if ``strict``) from the CMS inequalities.

    ``Σ_{θ_j ≤ t} τ_j − τ_k ≤ F(t) ≤ Σ_{θ_j ≤ t} τ_j + τ_{k+1}`` for the nodes ``θ_k ≤ t < θ_{k+1}``.
    """
    if math.isinf(t):
        exact = torch.full(nodes.shape[:1], 0.0 if (t < 0) else 1.0, dtype=torch.float64)
        return exact, exact
    valid = weights > 0  # padding of early-stopped probes carries no mass and is never adjacent
    below = valid & ((nodes < t) if strict else (nodes <= t))
    above = valid & ~below
    mass = (weights * below).sum(dim=1)
    last = torch.where(below, nodes, -math.inf).argmax(dim=1, keepdim=True)
    following = torch.where(above, nodes, math.inf).argmin(dim=1, keepdim=True)
    w_last = weights.gather(1, last).squeeze(1) * below.any(dim=1)
    w_next = weights.gather(1, following).squeeze(1) * above.any(dim=1)
    return (mass - w_last).clamp_min(0), (mass + w_next).clamp_max(1)


def slq_count_bounds(
    nodes: Tensor, weights: Tensor, dim: int, lower: float = -math.inf, upper: float = math.inf
) -> tuple[float, float]:
    """Bracket of the quadrature error of :func:`slq_count` (Chebyshev–Markov–Stieltjes inequalities).

    For each probe the Gauss rule brackets the probe's spectral distribution function at any t by the
    weights of the two nodes adjacent to t; applied at both endpoints this brackets the probe's mass
    ``Σ_{h_i ∈ [lower, upper]} (v_iᵀ u_p)²``, and N times the mean over probes brackets the Hutchinson
    estimate with exact quadrature. The bracket is rigorous for that estimate (up to rounding); the
    probe noise of :func:`slq_count` comes on top.

    Args:
        nodes: ``(P, m)`` quadrature nodes from :func:`slq`.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        lower: lower end of the (closed) interval.
        upper: upper end of the (closed) interval.

    Returns:
        ``(low, high)`` with ``0 ≤ low ≤ slq_count(...) ≤ high ≤ N``.
    """
    hi_low, hi_high = cdf_bracket(nodes, weights, upper, strict=False)
    lo_low, lo_high = cdf_bracket(nodes, weights, lower, strict=True)
    low = (hi_low - lo_high).clamp_min(0)
    high = (hi_high - lo_low).clamp_max(1)
    return float(dim * low.mean()), float(dim * high.mean())


def slq_density(nodes: Tensor, weights: Tensor, grid: Tensor, bandwidth: float) -> Tensor:
    """Gaussian-smoothed spectral density ``φ(x) = (1/P) Σ_p Σ_j τ_pj 𝒩(x; θ_pj, σ²)`` on a grid.

    Args:
        nodes: ``(P, m)`` quadrature nodes.
        weights: ``(P, m)`` quadrature weights.
        grid: ``(G,)`` points x.
        bandwidth: σ > 0.

    Returns:
        ``(G,)`` density (integrates to 1; multiply by N for eigenvalues per unit curvature).
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    x = grid.to(torch.float64).reshape(-1, 1, 1)
    kernel = torch.exp(-0.5 * ((x - nodes) / bandwidth) ** 2) / (bandwidth * math.sqrt(2 * math.pi))
    return (kernel * weights).sum(dim=2).mean(dim=1)
