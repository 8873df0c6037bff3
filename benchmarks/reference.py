"""The competitors' methods and the exact references the per-step estimates are compared against.

Hessian-vector products, Lanczos and the dense Hessian are the library's own
(:mod:`lightning_chaos.core.operators`, :mod:`lightning_chaos.core.lanczos`); what is specific to the
competitors is kept here:

* :func:`hessian_operator`: PyHessian's Hessian-vector products (Yao et al., "PyHessian", 2020) — the
  gradient graph is built once (``create_graph=True``) and every product is one more backward pass through
  it, exactly as ``pyhessian.hessian.dataloader_hv_product``/``hessian.eigenvalues`` do for one batch;
* :func:`power_iteration` is PyHessian's ``eigenvalues(maxIter=100, tol=1e-3)``: Rayleigh quotient of the
  normalised iterate, stopped when it changes by less than ``tol`` relative;
* :func:`lanczos_top`: the largest Ritz value of a Lanczos run, used with 20 steps as a competitor and
  with 100 steps as the reference of the timing table;
* :func:`exact_spectrum`: ``eigvalsh`` of the dense Hessian and its top eigenvector.

One deliberate difference from PyHessian: it evaluates the model in ``eval()`` mode, which changes the loss
of BatchNorm networks; here every method differentiates the *training-mode* loss of the batch through the
library's :class:`~lightning_chaos.core.functional_loss.FunctionalLoss`, so that all methods see exactly
the function whose curvature the monitor estimates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.lanczos import lanczos
from lightning_chaos.core.operators import HessianOperator

MatVec = Callable[[Tensor], Tensor]


def hessian_operator(loss: FunctionalLoss) -> HessianOperator:
    """Double-backward Hessian-vector products of the fixed-batch loss at θ; ``num_hvps`` counts them."""
    return HessianOperator(loss, loss.params, method="double_backward")


def _random_unit(dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return v / torch.linalg.vector_norm(v)


@dataclass
class PowerIterationResult:
    """Top eigenvalue (largest in magnitude) from power iteration and the HVPs it took."""

    eigenvalue: float
    iterations: int
    converged: bool


def power_iteration(
    matvec: MatVec,
    dim: int,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PowerIterationResult:
    """PyHessian's ``hessian.eigenvalues(top_n=1)``: power iteration with a relative-change stopping rule.

    Each iteration: ``ρ = vᵀHv``, ``v ← Hv/‖Hv‖``; stop when ``|ρ − ρ_prev| / (|ρ_prev| + 1e-6) < tol``.
    It converges to the eigenvalue of largest *magnitude* (the top one unless ``|h_min| > h0``).

    Args:
        matvec: ``v ↦ H v``.
        dim: ``N``.
        tol: relative-change tolerance (PyHessian's default 1e-3).
        max_iter: bound on the iterations (PyHessian's default 100).
        seed: seed of the random start.
        dtype: dtype of the iterate.
        device: device of the iterate.
    """
    v = _random_unit(dim, seed, dtype, torch.device(device))
    previous = None
    for i in range(1, max_iter + 1):
        hv = matvec(v)
        rho = float(torch.dot(hv, v))
        v = hv / torch.linalg.vector_norm(hv)
        if previous is not None and abs(rho - previous) / (abs(previous) + 1e-6) < tol:
            return PowerIterationResult(rho, i, True)
        previous = rho
    return PowerIterationResult(float(previous), max_iter, False)


def lanczos_top(op: HessianOperator, steps: int, *, reorthogonalize: bool = True, seed: int = 0) -> float:
    """Largest Ritz value of a ``steps``-step Lanczos run from a random unit start (seeded).

    Without reorthogonalisation no basis is kept (O(N) memory); rounding then makes converged Ritz values
    reappear as copies, which does not move the largest one.
    """
    start = _random_unit(op.shape[0], seed, op.dtype, op.device)
    runs = lanczos(op, steps, start=start, reorthogonalize=reorthogonalize, keep_basis=False)
    return float(runs.ritz_values()[0])


@dataclass
class ExactSpectrum:
    """Exact eigenvalues (float64, descending) of a dense Hessian and its unit top eigenvector."""

    eigenvalues: Tensor
    top_vector: Tensor
    top_vector_residual: float

    @property
    def h0(self) -> float:
        """Largest eigenvalue."""
        return float(self.eigenvalues[0])

    @property
    def h_min(self) -> float:
        """Smallest (most negative) eigenvalue."""
        return float(self.eigenvalues[-1])


def exact_spectrum(hessian: Tensor) -> ExactSpectrum:
    """``eigvalsh`` of the symmetrised float64 Hessian, plus its top eigenvector.

    The eigenvector comes from a float64 Lanczos run on the dense matrix (much cheaper than ``eigh`` with
    all vectors); its residual ``‖Hv − h0 v‖ / |h0|`` is returned so a caller can reject a poor one.
    """
    h = hessian.double()
    h = 0.5 * (h + h.T)
    values = torch.linalg.eigvalsh(h).flip(0)
    dim = h.shape[0]
    _, vectors = lanczos(h, min(dim, 150), start=_random_unit(dim, 0, h.dtype, h.device)).ritz_pairs(1)
    vector = vectors[:, 0]
    residual = float(torch.linalg.vector_norm(h @ vector - values[0] * vector)) / max(
        abs(float(values[0])), 1e-30
    )
    return ExactSpectrum(values, vector, residual)
