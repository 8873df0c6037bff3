"""Which Hessian eigendirections chaos-aware gradient descent (CGD) removes from an update.

CGD (Herrmann, Granz and Landgraf, "Chaotic Dynamics are Intrinsic to Neural Network Training with SGD",
NeurIPS 2022) replaces an update Δθ by ``(I − V Vᵀ) Δθ``, the columns of V being eigenvectors of the
batch Hessian selected by a strategy (:func:`select_directions`). :func:`removal_basis` computes V from a
step's curvature, exactly (dense ``eigh``) or from extreme Lanczos pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_chaos.core.lanczos import lanczos
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.stability import EXACT_EDGE_TOLERANCE, classify_eigenvalues
from lightning_chaos.core.step_curvature import StepCurvature

__all__ = ["METHODS", "STRATEGIES", "removal_basis", "select_directions"]

Strategy = Literal["chaotic", "negative", "positive", "positive_curvature"]

STRATEGIES: tuple[Strategy, ...] = ("chaotic", "negative", "positive", "positive_curvature")
"""What CGD can remove (see :func:`select_directions`)."""

Method = Literal["exact", "lanczos"]

METHODS: tuple[Method, ...] = ("exact", "lanczos")
"""The ways of finding the eigendirections (dense ``eigh`` of the batch Hessian, or extreme Lanczos pairs)."""

_LANCZOS_ENDS: dict[str, Literal["largest", "smallest", "both"]] = {
    "chaotic": "both",
    "positive": "largest",
    "negative": "smallest",
    "positive_curvature": "largest",
}


def select_directions(
    eigenvalues: Tensor,
    sgd: SGDHyperparameters,
    strategy: Strategy = "chaotic",
    tolerance: float = EXACT_EDGE_TOLERANCE,
    *,
    scale: float | None = None,
) -> Tensor:
    """Mask of the eigendirections CGD removes from the update.

    With the stability interval ``(0, u)`` of the effective curvature ``h̃ = h + wd``
    (:func:`~lightning_chaos.core.stability.stability_interval`) and ``ε = tolerance · scale``:

    * ``"chaotic"``: ``h̃ < −ε`` or ``h̃ > u + ε`` (positive local Lyapunov exponent);
    * ``"negative"``: ``h̃ < −ε`` (negative curvature);
    * ``"positive"``: ``h̃ > u + ε`` (curvature beyond the stability edge);
    * ``"positive_curvature"``: ``h̃ > ε``, every direction of positive curvature (not a chaos criterion:
      ``0 < h̃ < u`` is stable; the reading of the paper's "pruning of the full positive spectrum" under
      which its claims can hold).

    *Edge* directions (within ε of 0 or u, e.g. the exact zeros of ReLU networks) are never removed by the
    chaos criteria: their LLE is 0 to working precision and removing them would only shrink the update.

    Args:
        eigenvalues: Hessian eigenvalues h, shape ``(r,)``.
        sgd: the update.
        strategy: one of :data:`STRATEGIES`.
        tolerance: edge half-width relative to ``scale``.
        scale: reference magnitude; default ``max |h_i|`` of ``eigenvalues``. Pass the spectral radius when
            ``eigenvalues`` is a subset (e.g. Lanczos extremes without the largest magnitude).

    Returns:
        Boolean tensor ``(r,)``, True for the directions to remove.

    Example:
        >>> h = torch.tensor([-1.0, 0.0, 5.0, 30.0])
        >>> select_directions(h, SGDHyperparameters(lr=0.1), "chaotic").tolist()
        [True, False, False, True]
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    masks = classify_eigenvalues(eigenvalues, sgd, tolerance, scale=scale)
    if strategy == "positive":
        return masks["chaotic"] & masks["positive"]
    if strategy == "positive_curvature":
        return masks["positive"]
    return masks[strategy]


def removal_basis(
    curvature: StepCurvature,
    sgd: SGDHyperparameters,
    strategy: Strategy = "chaotic",
    method: Method = "exact",
    k: int | None = None,
    tolerance: float = EXACT_EDGE_TOLERANCE,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Orthonormal basis ``V`` ``(N, r)`` of the directions to remove, and their eigenvalues ``(r,)``.

    ``"exact"``: all eigenpairs of the dense batch Hessian (``O(N²)`` memory, ``O(N³)`` time), of which the
    selected ones are kept — with ``k`` set, at most the ``k`` largest and the ``k`` most negative of them.
    ``"lanczos"``: ``k`` extreme Ritz pairs from one Lanczos run of ``3·k_total + 30`` exact Hessian-vector
    products (``"chaotic"``: top-k and bottom-k; ``"positive"``, ``"positive_curvature"``: top-k;
    ``"negative"``: bottom-k), of which only those meeting the criterion are kept (re-orthonormalised:
    Ritz vectors are orthonormal only to Lanczos accuracy).

    Args:
        curvature: the step's curvature (its dense eigendecomposition is shared with other consumers).
        sgd: the update whose stability the criterion refers to.
        strategy: one of :data:`STRATEGIES`.
        method: ``"exact"`` or ``"lanczos"``.
        k: directions per end of the spectrum (required for ``"lanczos"``).
        tolerance: edge half-width relative to the spectral radius.
        generator: generator of the Lanczos start vector.

    Returns:
        ``(V, eigenvalues)``, detached.

    Raises:
        FloatingPointError: the batch Hessian is not finite (typically a diverged loss).
    """
    try:
        if method == "exact":
            values, vectors = curvature.eigh()
        else:
            if k is None:
                raise ValueError("method='lanczos' needs k (the number of extreme eigenpairs per end)")
            which = _LANCZOS_ENDS[strategy]
            dim = curvature.loss.dim
            k = max(1, min(k, dim // 2 if which == "both" else dim))
            steps = min(dim, 3 * (2 * k if which == "both" else k) + 30)
            values, vectors = lanczos(curvature.hessian(), steps, generator=generator).ritz_pairs(k, which)
    except torch.linalg.LinAlgError as err:
        raise FloatingPointError(f"the batch Hessian is not finite ({err})") from err
    if not torch.isfinite(values).all():
        raise FloatingPointError("the batch Hessian is not finite (loss diverged?)")
    index = select_directions(values, sgd, strategy, tolerance).nonzero().flatten()
    if k is not None and index.numel():
        shifted = values[index] + sgd.weight_decay
        below, above = index[shifted < 0], index[shifted >= 0]
        below = below[torch.argsort(values[below])[:k]]
        above = above[torch.argsort(values[above], descending=True)[:k]]
        index = torch.cat([below, above])
    basis = vectors[:, index]
    if method == "lanczos" and basis.shape[1] > 1:
        basis = torch.linalg.qr(basis).Q
    return basis.detach(), values[index].detach()
