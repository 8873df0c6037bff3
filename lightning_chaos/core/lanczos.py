"""The Lanczos process: one kernel for extreme eigenpairs, Ritz values and Gauss quadrature.

Lanczos (1950) tridiagonalises a symmetric operator A from a start vector: with ``v_1 = v / ‖v‖``,

    β_j v_{j+1} = A v_j − α_j v_j − β_{j−1} v_{j−1},    α_j = v_jᵀ A v_j,

so that ``A V = V T + β_m v_{m+1} e_mᵀ`` with T tridiagonal (diagonal α, off-diagonal β). The eigenvalues
of T (Ritz values) approximate the extreme eigenvalues of A first, from inside the spectrum; the Ritz
vectors ``V s_i`` the eigenvectors; and ``(θ_i, s_{i,1}²)`` is the m-point Gauss quadrature of the
spectral measure of A seen from ``v_1`` (Golub and Welsch, 1969), the basis of stochastic Lanczos
quadrature (:mod:`lightning_chaos.core.slq`).

:func:`lanczos` is the one entry point: it runs P independent processes at once (one block product
``A [v_1 … v_P]`` per step) and returns a :class:`LanczosRuns` whose methods give Ritz values, Ritz
pairs and quadrature rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_chaos.core.operators import LinearOperator, as_matmat

__all__ = ["LanczosRuns", "lanczos", "random_block"]

Which = Literal["largest", "smallest", "both"]


def random_block(
    dim: int,
    k: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    distribution: Literal["gaussian", "rademacher"] = "gaussian",
) -> Tensor:
    """``(dim, k)`` random start vectors, drawn on the generator's device and then moved.

    Drawing on the generator's device means a CPU generator gives the same vectors on every device.

    Args:
        dim: N.
        k: number of vectors.
        generator: the random generator (``None``: the global one).
        dtype: dtype of the result.
        device: device of the result.
        distribution: ``"gaussian"`` or ``"rademacher"`` (±1) entries.

    Returns:
        The block ``(dim, k)``.
    """
    gen_device = generator.device if generator is not None else device
    if distribution == "rademacher":
        z = torch.randint(0, 2, (dim, k), generator=generator, device=gen_device).to(dtype) * 2 - 1
    elif distribution == "gaussian":
        z = torch.randn(dim, k, generator=generator, dtype=dtype, device=gen_device)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    return z.to(device)


def _tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the symmetric tridiagonal ``T`` (float64): ascending values, vectors."""
    t = torch.diag(alpha.to(torch.float64))
    if beta.numel():
        off = beta.to(torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


@dataclass
class LanczosRuns:
    """The tridiagonal matrices (and optionally the bases) of P independent Lanczos runs.

    Attributes:
        alpha: ``(P, m)`` diagonals of the ``T_p`` (entries beyond a run's length are zero).
        beta: ``(P, m)``; ``beta[p, j]`` couples steps j and j+1, ``beta[p, length − 1]`` is the residual
            norm ``β_m`` of the last step.
        lengths: steps each run took (fewer than m after a breakdown: an invariant Krylov space, whose
            Ritz values are exact eigenvalues).
        basis: ``(P, m, N)`` Lanczos vectors, or ``None`` when not kept.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> runs = lanczos(a, 5, start=torch.ones(2, dtype=torch.float64))
        >>> runs.lengths, [round(float(v), 8) for v in runs.ritz_values()]  # invariant after 2 steps
        ([2], [3.0, 1.0])
    """

    alpha: Tensor
    beta: Tensor
    lengths: list[int]
    basis: Tensor | None

    def tridiagonal(self, run: int = 0) -> tuple[Tensor, Tensor]:
        """Diagonal ``(m,)`` and off-diagonal ``(m − 1,)`` of ``T`` of one run."""
        m = self.lengths[run]
        return self.alpha[run, :m], self.beta[run, : m - 1]

    def ritz_values(self, run: int = 0) -> Tensor:
        """Eigenvalues of ``T`` of one run, descending, float64 ``(m,)``.

        Without reorthogonalisation converged values reappear as copies ("ghosts"), which duplicates but
        does not move them: the extreme ones stay accurate.
        """
        return _tridiagonal_eigh(*self.tridiagonal(run))[0].flip(0)

    def ritz_pairs(self, k: int, which: Which = "largest", run: int = 0) -> tuple[Tensor, Tensor]:
        """Extreme Ritz pairs of one run (needs the basis, i.e. ``keep_basis=True``).

        Ritz vectors are ``y_i = V s_i``; the residual of a pair is ``‖A y_i − θ_i y_i‖ = β_m |s_{m,i}|``.
        Lanczos finds each distinct eigenvalue once: a multiple eigenvalue comes with multiplicity one.

        Args:
            k: pairs from each requested end.
            which: ``"largest"`` (descending), ``"smallest"`` (ascending, most negative first) or
                ``"both"`` (the k largest and the k smallest, descending).
            run: which run.

        Returns:
            ``values`` ``(r,)`` in the basis dtype and unit ``vectors`` ``(N, r)``; ``r`` is fewer than asked
            only when the run is shorter.
        """
        if which not in ("largest", "smallest", "both"):
            raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
        if self.basis is None:
            raise ValueError("ritz_pairs needs the Lanczos basis: run lanczos(..., keep_basis=True)")
        m = self.lengths[run]
        values, vectors = _tridiagonal_eigh(*self.tridiagonal(run))  # ascending
        if which == "largest":
            index = torch.arange(m - 1, max(m - k, 0) - 1, -1)
        elif which == "smallest":
            index = torch.arange(0, min(k, m))
        else:
            ends = torch.cat([torch.arange(0, min(k, m)), torch.arange(max(m - k, 0), m)])
            index = torch.unique(ends).flip(0)
        basis = self.basis[run, :m].T
        ritz_vectors = basis @ vectors[:, index].to(dtype=basis.dtype, device=basis.device)
        ritz_vectors = ritz_vectors / torch.linalg.vector_norm(ritz_vectors, dim=0)
        return values[index].to(dtype=basis.dtype, device=basis.device), ritz_vectors

    def quadrature(self) -> tuple[Tensor, Tensor]:
        """Gauss quadrature rule of every run: nodes ``θ_pj`` and weights ``τ_pj = s_{pj,1}²``.

        Returns:
            ``nodes`` and ``weights``, each ``(P, m)`` float64 on the CPU; runs shorter than m are padded
            with zero-weight nodes at 0 (each run's weights sum to 1).
        """
        runs, m = self.alpha.shape
        nodes = torch.zeros(runs, m, dtype=torch.float64)
        weights = torch.zeros(runs, m, dtype=torch.float64)
        for p, length in enumerate(self.lengths):
            values, vectors = _tridiagonal_eigh(*self.tridiagonal(p))
            nodes[p, :length] = values.cpu()
            weights[p, :length] = vectors[0].cpu() ** 2
        return nodes, weights


def lanczos(
    op: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    num_steps: int,
    *,
    start: Tensor | None = None,
    num_runs: int = 1,
    dim: int | None = None,
    generator: torch.Generator | None = None,
    distribution: Literal["gaussian", "rademacher"] = "gaussian",
    reorthogonalize: bool = True,
    keep_basis: bool = True,
) -> LanczosRuns:
    """Run independent Lanczos processes, one block product per step.

    With ``reorthogonalize`` each new vector is orthogonalised against all previous ones of its run by
    classical Gram–Schmidt applied twice (full reorthogonalisation, O(P m² N) extra work), which keeps the
    bases orthonormal to working precision; without it the plain three-term recurrence runs in O(P N)
    memory (converged Ritz values then reappear as ghosts, see :meth:`LanczosRuns.ritz_values`). A run
    stops early (breakdown) when ``β_j ≤ √N · eps · ‖T‖``: its Krylov space is invariant.

    Args:
        op: dense symmetric ``(N, N)`` tensor, a :class:`~lightning_chaos.core.operators.LinearOperator`,
            or a bare matvec (then ``dim`` is required).
        num_steps: maximal number of steps m (capped at N).
        start: start vectors ``(N,)`` or ``(N, P)`` (normalised here); default ``num_runs`` random vectors
            drawn with ``generator`` from ``distribution``.
        num_runs: P when ``start`` is not given.
        dim: N, for a bare matvec.
        generator: random generator of the default start vectors.
        distribution: ``"gaussian"`` or ``"rademacher"`` default start vectors.
        reorthogonalize: full reorthogonalisation.
        keep_basis: keep the Lanczos vectors (needed for Ritz vectors; implied by ``reorthogonalize``).

    Returns:
        The :class:`LanczosRuns`.

    Raises:
        ValueError: bad sizes or a zero / non-finite start vector.
        FloatingPointError: the operator returned non-finite values.

    Example:
        >>> a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> runs = lanczos(a, 10, generator=torch.Generator().manual_seed(0))
        >>> [round(float(x), 8) for x in runs.ritz_values()[:2]]
        [10.0, 9.0]
    """
    # a bare matvec works in the start's dtype and device
    like = (None, None) if start is None else (start.dtype, start.device)
    matmat, n, dtype, device = as_matmat(op, dim, *like)
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if start is None:
        start = random_block(n, num_runs, generator, dtype, device, distribution)
    start = start.reshape(n, -1).to(dtype=dtype, device=device)
    runs = start.shape[1]
    m = min(num_steps, n)
    norms = torch.linalg.vector_norm(start, dim=0)
    if not (torch.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError("starting vectors must be finite and nonzero")
    stored = reorthogonalize or keep_basis
    basis = torch.zeros(runs, m, n, dtype=dtype, device=start.device) if stored else None
    alpha = torch.zeros(runs, m, dtype=dtype, device=start.device)
    beta = torch.zeros(runs, m, dtype=dtype, device=start.device)
    lengths = [m] * runs
    active = torch.ones(runs, dtype=torch.bool, device=start.device)
    breakdown = math.sqrt(n) * torch.finfo(dtype).eps
    t_norm = torch.zeros(runs, dtype=dtype, device=start.device)
    q = start / norms
    prev = torch.zeros_like(q)
    for j in range(m):
        if basis is not None:
            basis[:, j] = q.T
        w = matmat(q)
        a = (q * w).sum(dim=0)
        if not torch.isfinite(a).all():
            raise FloatingPointError(f"the operator returned non-finite values at Lanczos step {j}")
        alpha[:, j] = a
        if basis is not None and reorthogonalize:  # classical Gram-Schmidt twice against each run's basis
            done = basis[:, : j + 1]
            for _ in range(2):
                w = w - torch.einsum("pjn,pj->np", done, torch.einsum("pjn,np->pj", done, w))
        else:
            w = w - a * q - (beta[:, j - 1] * prev if j > 0 else 0.0)
        b = torch.linalg.vector_norm(w, dim=0)
        beta[:, j] = b
        t_norm = torch.maximum(t_norm, a.abs() + (beta[:, j - 1] if j > 0 else 0.0) + b)
        stopped = active & (b <= breakdown * t_norm)
        for p in stopped.nonzero().flatten().tolist():
            lengths[p] = j + 1
        active = active & ~stopped
        if j == m - 1 or not active.any():
            break
        beta[:, j] = torch.where(active, b, 0.0)
        prev, q = q, torch.where(active, w / torch.where(active, b, 1.0), 0.0)
    return LanczosRuns(alpha, beta, lengths, basis)
