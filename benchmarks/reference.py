"""The competitors' methods and the exact references the per-step estimates are compared against.

These are deliberately self-contained, PyHessian-style implementations (Yao et al., "PyHessian", 2020):

* :class:`DoubleBackwardHVP` builds the gradient graph once (``create_graph=True``) and gets every
  Hessian-vector product by one more backward pass through it (``torch.autograd.grad(g, θ, v)``), exactly as
  ``pyhessian.hessian.dataloader_hv_product``/``hessian.eigenvalues`` do for one batch;
* :func:`power_iteration` is PyHessian's ``eigenvalues(maxIter=100, tol=1e-3)``: Rayleigh quotient of the
  normalised iterate, stopped when it changes by less than ``tol`` relative;
* :func:`lanczos` is the textbook Lanczos recurrence with full reorthogonalisation (optional), used with
  20 steps as a competitor and with 100 steps as the reference of the timing table;
* :func:`dense_hessian` is the exact Hessian from ``torch.func.hessian`` for ``eigvalsh``.

One deliberate difference from PyHessian: it evaluates the model in ``eval()`` mode, which changes the loss
of BatchNorm networks; here every method differentiates the *training-mode* loss of the batch through the
library's :class:`~lightning_chaos.core.probe.FunctionalLoss`, so that all methods see exactly the function
whose curvature the monitor estimates.

TODO(spectrum): replace these routines by ``lightning_chaos.core.spectrum`` (``HessianOperator`` with
double-backward and forward-over-reverse HVPs, ``dense_hessian``, ``lanczos``) once that module is merged,
and keep only PyHessian's stopping rule here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_chaos.core.params import flatten, unflatten
from lightning_chaos.core.probe import FunctionalLoss

MatVec = Callable[[Tensor], Tensor]


class DoubleBackwardHVP:
    """Hessian-vector products of a fixed-batch loss by double backward (PyHessian's method).

    Construction runs one forward and one backward pass with ``create_graph=True``; every call then costs
    one backward pass through that graph (which is kept alive: that is the memory cost of the method).

    Args:
        loss: the fixed-batch functional loss at the current point θ.
    """

    def __init__(self, loss: FunctionalLoss) -> None:
        self.leaves = [p.detach().requires_grad_() for p in loss.params]
        with torch.enable_grad():
            value = loss(self.leaves)
            self.grads = torch.autograd.grad(value, self.leaves, create_graph=True)
        self.dim = sum(p.numel() for p in self.leaves)
        self.dtype = self.leaves[0].dtype
        self.device = self.leaves[0].device
        self.num_hvps = 0

    def __call__(self, v: Tensor) -> Tensor:
        """Return ``H v`` for a flat ``v`` of shape ``(N,)``."""
        pieces = unflatten(v.to(self.dtype), self.leaves)
        with torch.enable_grad():
            hv = torch.autograd.grad(self.grads, self.leaves, grad_outputs=pieces, retain_graph=True)
        self.num_hvps += 1
        return flatten(hv).detach()


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


@dataclass
class LanczosResult:
    """Ritz values (descending) of an ``m``-step Lanczos run, and optionally the top Ritz vector."""

    ritz_values: Tensor
    steps: int
    reorthogonalized: bool
    top_vector: Tensor | None = None

    @property
    def top(self) -> float:
        """Largest Ritz value."""
        return float(self.ritz_values[0])


def lanczos(
    matvec: MatVec,
    dim: int,
    steps: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    reorthogonalize: bool = True,
    top_vector: bool = False,
) -> LanczosResult:
    """``steps`` Lanczos iterations from a random start; Ritz values from the tridiagonal matrix (float64).

    With ``reorthogonalize`` every new vector is orthogonalised (twice) against all previous ones, which
    costs ``steps × N`` stored entries. Without it, rounding makes converged Ritz values reappear as
    copies ("ghosts"), which duplicates but does not move the extreme Ritz values, so the top eigenvalue
    stays accurate.

    Args:
        matvec: ``v ↦ H v``.
        dim: ``N``.
        steps: number of matrix-vector products.
        seed: seed of the random start.
        dtype: dtype of the Lanczos vectors.
        device: their device.
        reorthogonalize: full reorthogonalisation (keeps the basis).
        top_vector: also return the unit Ritz vector of the top Ritz value (needs ``reorthogonalize``).
    """
    device = torch.device(device)
    steps = min(int(steps), dim)
    v = _random_unit(dim, seed, dtype, device)
    basis = torch.empty(steps, dim, dtype=dtype, device=device) if reorthogonalize else None
    alphas: list[float] = []
    betas: list[float] = []
    v_prev = torch.zeros_like(v)
    beta = 0.0
    for j in range(steps):
        if basis is not None:
            basis[j] = v
        w = matvec(v)
        alpha = float(torch.dot(w, v))
        w = w - alpha * v - beta * v_prev
        if basis is not None:
            for _ in range(2):
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        beta = float(torch.linalg.vector_norm(w))
        if j == steps - 1 or beta <= 1e-10 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        v_prev, v = v, w / beta
    m = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tri)
    values, vectors = values.flip(0), vectors.flip(1)
    vector = None
    if top_vector:
        if basis is None:
            raise ValueError("top_vector needs reorthogonalize=True (the basis is kept)")
        vector = basis[:m].T @ vectors[:, 0].to(dtype=dtype, device=device)
        vector = vector / torch.linalg.vector_norm(vector)
    return LanczosResult(values, m, basis is not None, vector)


def dense_hessian(loss: FunctionalLoss) -> Tensor:
    """Exact Hessian ``(N, N)`` of the fixed-batch loss at θ (``torch.func.hessian``)."""

    def of_flat(theta: Tensor) -> Tensor:
        return loss(unflatten(theta, loss.params))

    return torch.func.hessian(of_flat)(loss.theta().detach())


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
    run = lanczos(
        lambda x: h @ x,
        dim,
        min(dim, 150),
        dtype=torch.float64,
        device=h.device,
        reorthogonalize=True,
        top_vector=True,
    )
    vector = run.top_vector
    assert vector is not None
    residual = float(torch.linalg.vector_norm(h @ vector - values[0] * vector)) / max(
        abs(float(values[0])), 1e-30
    )
    return ExactSpectrum(values, vector, residual)
