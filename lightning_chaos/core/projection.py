"""Orthogonal projections onto eigenspace complements, and overlaps between subspaces and gradients.

Vectors are flat ``(N,)``; bases are ``(N, r)`` with orthonormal columns (e.g. Hessian eigenvectors).
CGD removes directions with :func:`project_out`; the subspace overlap of Herrmann, Granz and Landgraf
("Chaotic Dynamics are Intrinsic to Neural Network Training with SGD", NeurIPS 2022) compares chaotic
subspaces over training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gradient_overlaps",
    "gradient_subspace_overlap",
    "project_out",
    "projector",
    "random_subspace_overlap",
    "subspace_overlap",
]


def project_out(vector: Tensor, basis: Tensor) -> Tensor:
    """Remove the components along an orthonormal basis: ``P x = x − V (Vᵀ x)``, ``P = I − V Vᵀ``.

    Args:
        vector: ``(N,)`` or a block ``(N, k)``.
        basis: ``(N, r)`` with orthonormal columns (``r = 0`` allowed).

    Returns:
        The projected vector or block, same shape as ``vector``.
    """
    _check_basis(basis, vector.shape[0])
    basis = basis.to(vector.dtype)
    return vector - basis @ (basis.T @ vector)


def projector(basis: Tensor) -> Tensor:
    """Dense orthogonal projector ``I − V Vᵀ`` onto the complement of ``span(V)``, shape ``(N, N)``."""
    _check_basis(basis, basis.shape[0])
    eye = torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device)
    return eye - basis @ basis.T


def subspace_overlap(first: Tensor, second: Tensor) -> float:
    """Subspace similarity ``overlap(V, W) = ‖Vᵀ W‖_F² / min(d_V, d_W) ∈ [0, 1]``.

    Equals ``tr(P_V P_W) / d_min``: 1 when one subspace contains the other, 0 for orthogonal subspaces,
    invariant under a change of orthonormal basis of either.

    Args:
        first: ``(N, d_V)`` orthonormal basis of V.
        second: ``(N, d_W)`` orthonormal basis of W.

    Returns:
        The overlap; ``nan`` when either subspace is empty (no overlap is defined).
    """
    _check_basis(first, first.shape[0])
    _check_basis(second, first.shape[0])
    d_min = min(first.shape[1], second.shape[1])
    if d_min == 0:
        return math.nan
    cross = first.T @ second.to(first.dtype)
    return float(cross.pow(2).sum() / d_min)


def random_subspace_overlap(d1: int, d2: int, dim: int) -> float:
    """Return the mean :func:`subspace_overlap` of independent uniformly random subspaces, ``max(d1, d2)/N``.

    ``E ‖Vᵀ W‖_F² = tr(E[P_V] E[P_W]) = tr((d1/N) I (d2/N) I) = d1 d2 / N``, divided by ``min(d1, d2)``.

    Args:
        d1: dimension of the first subspace.
        d2: dimension of the second subspace.
        dim: ambient dimension N.

    Returns:
        The baseline overlap; ``nan`` if a dimension is 0.
    """
    if not (0 <= d1 <= dim and 0 <= d2 <= dim and dim > 0):
        raise ValueError(f"need 0 <= d1, d2 <= dim and dim > 0, got d1={d1}, d2={d2}, dim={dim}")
    if min(d1, d2) == 0:
        return math.nan
    return max(d1, d2) / dim


def gradient_overlaps(gradient: Tensor, basis: Tensor) -> Tensor:
    """Absolute cosine similarities ``|cos(g, v_i)| = |v_iᵀ g| / (‖g‖ ‖v_i‖)`` per column.

    Args:
        gradient: ``(N,)``.
        basis: ``(N, r)`` directions (need not be normalised).

    Returns:
        ``(r,)`` values in ``[0, 1]``; ``nan`` for a zero gradient or a zero column.
    """
    _check_basis(basis, gradient.shape[0])
    basis = basis.to(gradient.dtype)
    norms = torch.linalg.vector_norm(basis, dim=0) * torch.linalg.vector_norm(gradient)
    return (basis.T @ gradient).abs() / norms


def gradient_subspace_overlap(gradient: Tensor, basis: Tensor) -> float:
    """Fraction of the gradient's squared norm in ``span(V)``: ``‖Vᵀ g‖² / ‖g‖²`` for orthonormal V.

    Args:
        gradient: ``(N,)``.
        basis: ``(N, r)`` orthonormal columns.

    Returns:
        A value in ``[0, 1]``; ``nan`` for a zero gradient.
    """
    _check_basis(basis, gradient.shape[0])
    coefficients = basis.to(gradient.dtype).T @ gradient
    return float(coefficients.pow(2).sum() / gradient.pow(2).sum())


def _check_basis(basis: Tensor, dim: int) -> None:
    if basis.ndim != 2 or basis.shape[0] != dim:
        raise ValueError(f"basis must have shape ({dim}, r), got {tuple(basis.shape)}")
