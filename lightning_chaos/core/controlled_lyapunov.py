"""Controlled Lyapunov iteration: extreme Hessian eigenvalues for about one gradient per step.

The gradient-ascent map ``θ ↦ θ + β g(θ)`` has tangent map ``I + βH``. Two copies of the parameters a
distance ``q`` apart separate, once ``q`` is aligned with the top eigenvector ``v0``, by ``1 + β h0`` per
step. One iteration (Algorithm 1 of the ICLR 2021 submission, corrected):

    y = g(θ + q) − g(θ)                      ≈ H q             (finite difference, exact for quadratics)
    d = q + β y                              = θ1 − θ0 after both ascent steps
    λ = log(‖d‖ / ‖q‖)                       finite-size Lyapunov exponent
    h0 ≈ (exp(λ) − 1) / β                    eigenvalue of the discrete map (the paper reports 1/β,
                                             which at the controlled point β h0 = e − 1 is 1.72× too small)
    h0 ≈ qᵀ y / ‖q‖²                         Rayleigh quotient (exact for an aligned q)
    β ← β / λ                                control: drives λ → 1, i.e. β h0 → e − 1
    q ← Δq · d / ‖d‖                         re-centre (θ0 is θ again: g(θ) is computed once per step)

With ``k > 1`` columns this is Benettin's algorithm (``D = Q + βY``, ``D = Q'R``, exponents
``log|R_jj|``) plus Rayleigh–Ritz on ``span(Q)``. The most negative eigenvalue comes from the same
iteration on the shifted operator ``sI − H`` with ``s ≥ h0``, whose dominant eigenvalue is ``s − h_min``.

:class:`ControlledLyapunov` runs the iteration on any operator given as ``Q ↦ BQ``;
:class:`HessianEigenEstimator` wires it to a :class:`~lightning_chaos.core.functional_loss.FunctionalLoss`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_chaos.core.benettin import positive_qr
from lightning_chaos.core.functional_loss import FunctionalLoss

BlockOperator = Callable[[Tensor], Tensor]
"""``Q ↦ B Q`` for a block ``Q`` of shape ``(N, k)``."""


@dataclass
class LyapunovStep:
    """Outcome of one controlled iteration on an operator ``B``.

    Attributes:
        valid: False when the iteration produced NaN/inf (in ``BQ``, the estimates or the next β) or no
            measurable growth (``λ0 ≤ 100·eps`` of the dtype, which includes ``λ0 ≤ 0``); then nothing
            else is meaningful, the direction is re-randomised and β kept (or, if ``0 < λ0`` was just too
            small to measure while the Rayleigh quotient ρ > 0, re-aimed at ``(e − 1)/ρ``).
        exponents: ``(k,)`` finite-size exponents ``λ_j = log|R_jj|`` of the map ``I + βB``.
        eigenvalues: ``(k,)`` Lyapunov estimates ``(exp(λ_j) − 1) / β`` of the top-k eigenvalues of ``B``.
        ritz_values: ``(k,)`` Rayleigh–Ritz values of ``B`` on ``span(Q)``, descending (for ``k = 1`` the
            Rayleigh quotient ``qᵀBq / ‖q‖²``).
        residuals: ``(k,)`` Ritz residual norms ``‖B u − ρ u‖`` for unit Ritz vectors ``u``. For symmetric
            ``B`` an exact eigenvalue lies within this distance of each Ritz value.
        beta: the β used by this iteration (before the control update).
    """

    valid: bool
    exponents: Tensor
    eigenvalues: Tensor
    ritz_values: Tensor
    residuals: Tensor
    beta: float


class ControlledLyapunov:
    """Controlled Lyapunov (Benettin) iteration with a warm-started block of ``k`` directions.

    The direction block is stored as an orthonormal ``U`` of shape ``(N, k)``; each iteration probes
    ``Q = Δq · U``. The state (``U``, β, the generator, the recent exponents) persists across calls: that
    warm start is what makes one iteration per training step enough.

    Args:
        k: number of directions (1: largest eigenvalue only).
        delta_q: separation ``Δq > 0`` of the probe points (absolute, or relative to ``scale`` passed to
            :meth:`iterate`).
        beta: initial ascent rate β > 0; the control adapts it.
        seed: seed of the private generator that draws random directions (identical on every rank).
        window: number of recent valid ``λ0`` kept for :attr:`fluctuation`.

    Raises:
        ValueError: on ``k < 1``, ``delta_q ≤ 0``, ``beta ≤ 0`` or ``window < 1``.
    """

    def __init__(self, k: int = 1, delta_q: float = 5e-2, beta: float = 1.0, seed: int = 0, window: int = 20):
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if not delta_q > 0 or not math.isfinite(delta_q):
            raise ValueError(f"delta_q must be a finite number > 0, got {delta_q!r}.")
        if not beta > 0 or not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}.")
        self.k = int(k)
        self.delta_q = float(delta_q)
        self.beta = float(beta)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.basis: Tensor | None = None
        self.recent: deque[float] = deque(maxlen=int(window))
        self.num_restarts = 0

    @property
    def fluctuation(self) -> float:
        """Mean ``|λ0 − 1|`` over the recent valid iterations (``nan`` before the first).

        The control holds λ0 at 1 while the curvature seen by the direction is steady; a settled estimate
        has a small fluctuation, a cold or drifting one a large one.
        """
        return sum(abs(x - 1.0) for x in self.recent) / len(self.recent) if self.recent else math.nan

    def _randomize(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        block = torch.randn(dim, self.k, generator=self.generator, dtype=torch.float64)
        self.basis = torch.linalg.qr(block).Q.to(dtype=dtype, device=device)

    def _ensure_basis(self, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.basis is None or self.basis.shape != (dim, self.k):
            self._randomize(dim, dtype, device)
        elif self.basis.device != device or self.basis.dtype != dtype:
            self.basis = self.basis.to(device=device, dtype=dtype)
        return self.basis

    def iterate(
        self,
        apply: BlockOperator,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        scale: float = 1.0,
    ) -> LyapunovStep:
        """One controlled iteration.

        Args:
            apply: ``Q ↦ BQ`` for ``Q`` of shape ``(N, k)`` whose columns have norm ``Δq·scale``.
            dim: ``N``.
            dtype: dtype of the direction block (that of the parameters).
            device: device of the direction block.
            scale: multiplies ``delta_q`` (``‖θ‖`` for a relative separation).

        Returns:
            The :class:`LyapunovStep`. On an invalid step β is kept and the directions re-drawn.
        """
        basis = self._ensure_basis(dim, dtype, torch.device(device))
        delta = self.delta_q * float(scale)
        beta = self.beta
        b_basis = apply(delta * basis) / delta  # B U
        measure = self._measure_vector if self.k == 1 else self._measure_block
        exponents, ritz, residuals, new_basis = measure(basis, b_basis, beta)
        eigenvalues = torch.expm1(exponents) / beta
        # Growth below a few hundred ulps of the parameters' dtype is rounding, not curvature (e.g. a
        # finite difference that cancelled to zero at huge weights): treat it as "no measurable growth".
        floor = 100 * torch.finfo(dtype).eps
        lam0 = float(exponents[0])
        next_beta = beta / lam0 if lam0 > 0 else math.inf
        valid = (
            bool(torch.isfinite(b_basis).all())
            and bool(torch.isfinite(eigenvalues).all())
            and lam0 > floor
            and math.isfinite(next_beta)
        )
        if not valid:
            rayleigh = float(ritz[0])
            if 0.0 < lam0 <= floor and math.isfinite(rayleigh) and rayleigh > 0:
                self.beta = (math.e - 1) / rayleigh  # β far too small for this curvature: re-aim it
            self.num_restarts += 1
            self._randomize(dim, dtype, torch.device(device))
            nan = torch.full((self.k,), math.nan, dtype=torch.float64)
            return LyapunovStep(False, nan, nan, nan, nan, beta)
        self.beta = next_beta
        self.basis = new_basis.to(dtype=dtype)
        self.recent.append(lam0)
        return LyapunovStep(True, exponents, eigenvalues, ritz, residuals, beta)

    @staticmethod
    def _measure_block(u: Tensor, b_u: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Benettin QR of ``(I + βB)U`` and Rayleigh–Ritz on ``span(U)``, in float64.

        Returns:
            ``(exponents (k,), Ritz values descending (k,), Ritz residuals (k,), next basis (N, k))``.
        """
        u, b_u = u.double(), b_u.double()
        new_basis, r_diag = positive_qr(u + beta * b_u)
        exponents = torch.log(r_diag)
        projected = u.T @ b_u
        ritz, vectors = torch.linalg.eigh(0.5 * (projected + projected.T))
        ritz, vectors = ritz.flip(0), vectors.flip(1)
        residuals = torch.linalg.vector_norm(b_u @ vectors - (u @ vectors) * ritz, dim=0)
        return exponents, ritz, residuals, new_basis

    @staticmethod
    def _measure_vector(u: Tensor, b_u: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``k = 1`` case of :meth:`_measure_block` from two dot products, in the parameters' dtype.

        With ``‖u‖ = 1``, ``ρ = uᵀBu`` and ``s = ‖Bu‖²``: ``‖(I + βB)u‖² = 1 + 2βρ + β²s``, and the
        Rayleigh residual is ``‖Bu − ρu‖ = √(s − ρ²)``. No float64 copies of N-vectors, no QR (the
        block path costs several times the probe's gradient on large models).
        """
        d = u + beta * b_u
        rho, s = float(u[:, 0] @ b_u[:, 0]), float(b_u[:, 0] @ b_u[:, 0])
        growth = 1.0 + 2.0 * beta * rho + beta * beta * s
        exponent = 0.5 * math.log(growth) if growth > 0 else -math.inf
        residual = math.sqrt(max(s - rho * rho, 0.0))
        exponents, ritz, residuals = torch.tensor([[exponent], [rho], [residual]], dtype=torch.float64)
        return exponents, ritz, residuals, d / torch.linalg.vector_norm(d)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the iteration exactly: direction, β, generator, history."""
        return {
            "basis": None if self.basis is None else self.basis.detach().cpu().clone(),
            "beta": self.beta,
            "generator": self.generator.get_state(),
            "recent": list(self.recent),
            "num_restarts": self.num_restarts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the basis moves to the parameters' device on first use)."""
        self.basis = state["basis"]
        self.beta = float(state["beta"])
        self.generator.set_state(state["generator"])
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.num_restarts = int(state["num_restarts"])


@dataclass
class CurvatureEstimate:
    """Hessian eigenvalue estimates of one training step (all floats; ``nan`` where not computed).

    Attributes:
        valid: False when the step was skipped (NaN/inf gradients or ``λ ≤ 0``).
        h0: largest eigenvalue from the Lyapunov exponent, ``(exp(λ) − 1) / β``.
        h0_rayleigh: largest Ritz value (Rayleigh quotient for ``k = 1``).
        h0_residual: Ritz residual of the top pair: an exact eigenvalue lies within it of ``h0_rayleigh``.
        lyapunov_exponent: finite-size exponent λ of the top direction (≈ 1 once controlled).
        beta: ascent rate β used for the step.
        fluctuation: mean ``|λ − 1|`` over the recent steps (small = settled).
        top: Ritz values of the top-k block, descending.
        h_min: most negative eigenvalue from its Lyapunov exponent (``nan`` unless requested).
        h_min_rayleigh: Rayleigh quotient of the most negative direction.
        num_gradients: gradients evaluated by the probe in this step.
    """

    valid: bool
    h0: float = math.nan
    h0_rayleigh: float = math.nan
    h0_residual: float = math.nan
    lyapunov_exponent: float = math.nan
    beta: float = math.nan
    fluctuation: float = math.nan
    top: list[float] = field(default_factory=list)
    h_min: float = math.nan
    h_min_rayleigh: float = math.nan
    num_gradients: int = 0


class HessianEigenEstimator:
    """Per-step estimates of the top-k and the most negative Hessian eigenvalues of a fixed-batch loss.

    Each :meth:`step` takes the loss of the current batch at the current point θ and runs ``n_iter``
    controlled iterations from the warm-started directions. The cost is one gradient ``g(θ)`` (free when
    the caller passes the training gradient as ``g0``) plus ``k`` gradients per iteration, plus one per
    iteration for the most negative eigenvalue.

    Args:
        top_k: number of top eigenvalues (Benettin block size).
        most_negative: also estimate the most negative eigenvalue (shifted iteration on ``sI − H`` with
            ``s = max(h0, 0)``; requires ``|h_min| < 2.16 h0`` to separate from ``h0`` in the first place
            and ``s − h_min`` to dominate ``s − h_i``).
        delta_q: probe separation Δq.
        relative_delta_q: if True the separation is ``delta_q · ‖θ‖``.
        seed: seed of the direction generator.
        window: number of steps in :attr:`CurvatureEstimate.fluctuation`.
    """

    def __init__(
        self,
        top_k: int = 1,
        most_negative: bool = False,
        delta_q: float = 5e-2,
        relative_delta_q: bool = False,
        seed: int = 0,
        window: int = 20,
    ) -> None:
        self.top = ControlledLyapunov(k=top_k, delta_q=delta_q, seed=seed, window=window)
        self.negative = (
            ControlledLyapunov(k=1, delta_q=delta_q, seed=seed + 1, window=window) if most_negative else None
        )
        self.relative_delta_q = bool(relative_delta_q)
        self._shift = 0.0

    def _scale(self, loss: FunctionalLoss) -> float:
        return float(torch.linalg.vector_norm(loss.theta())) if self.relative_delta_q else 1.0

    def step(self, loss: FunctionalLoss, g0: Tensor | None = None, n_iter: int = 1) -> CurvatureEstimate:
        """Run ``n_iter`` iterations at the point and batch of ``loss``.

        Args:
            loss: the fixed-batch functional loss at the current θ.
            g0: the gradient ``g(θ)`` of exactly this loss, ``(N,)``, if already known (the training
                gradient); computed otherwise.
            n_iter: iterations on this batch (each costs ``top_k`` (+1) gradients).

        Returns:
            The estimates of the last iteration; ``valid=False`` if any iteration was invalid.
        """
        start = loss.num_gradients
        if g0 is None:
            g0 = loss.gradient()
        if not torch.isfinite(g0).all():
            return CurvatureEstimate(valid=False, num_gradients=loss.num_gradients - start)
        dim, dtype, device, scale = g0.numel(), g0.dtype, g0.device, self._scale(loss)

        def hessian_block(block: Tensor) -> Tensor:
            return loss.gradients(block) - g0[:, None]

        def shifted_block(block: Tensor) -> Tensor:
            return self._shift * block - hessian_block(block)

        estimate = CurvatureEstimate(valid=True)
        for _ in range(n_iter):
            top = self.top.iterate(hessian_block, dim, dtype=dtype, device=device, scale=scale)
            if not top.valid:
                return CurvatureEstimate(valid=False, num_gradients=loss.num_gradients - start)
            estimate.h0 = float(top.eigenvalues[0])
            estimate.h0_rayleigh = float(top.ritz_values[0])
            estimate.h0_residual = float(top.residuals[0])
            estimate.lyapunov_exponent = float(top.exponents[0])
            estimate.beta = top.beta
            estimate.top = [float(x) for x in top.ritz_values]
            if self.negative is not None:
                self._shift = max(estimate.h0, estimate.h0_rayleigh, 0.0)
                low = self.negative.iterate(shifted_block, dim, dtype=dtype, device=device, scale=scale)
                if not low.valid:
                    return CurvatureEstimate(valid=False, num_gradients=loss.num_gradients - start)
                estimate.h_min = self._shift - float(low.eigenvalues[0])
                estimate.h_min_rayleigh = self._shift - float(low.ritz_values[0])
        estimate.fluctuation = self.top.fluctuation
        estimate.num_gradients = loss.num_gradients - start
        return estimate

    def warmup(
        self,
        loss: FunctionalLoss,
        g0: Tensor | None = None,
        max_iters: int = 100,
        tol: float = 1e-2,
        patience: int = 3,
    ) -> tuple[int, bool]:
        """Iterate at a fixed point until the estimate settles (the cold start).

        Settled means ``|λ − 1| < tol`` and a relative change of ``h0`` below ``tol`` for ``patience``
        consecutive iterations.

        Args:
            loss: the fixed-batch functional loss.
            g0: ``g(θ)`` if known.
            max_iters: bound on the iterations.
            tol: tolerance on ``|λ − 1|`` and on the relative change of ``h0``.
            patience: consecutive settled iterations required.

        Returns:
            ``(iterations used, settled)``.
        """
        if g0 is None:
            g0 = loss.gradient()
        streak, previous = 0, math.nan
        for i in range(1, max_iters + 1):
            estimate = self.step(loss, g0=g0)
            if not estimate.valid:
                streak, previous = 0, math.nan
                continue
            settled = abs(estimate.lyapunov_exponent - 1.0) < tol and abs(
                estimate.h0 - previous
            ) <= tol * abs(estimate.h0)
            streak = streak + 1 if settled else 0
            previous = estimate.h0
            if streak >= patience:
                return i, True
        return max_iters, False

    def state_dict(self) -> dict[str, Any]:
        """State of both iterations and of the shift."""
        return {
            "top": self.top.state_dict(),
            "negative": None if self.negative is None else self.negative.state_dict(),
            "shift": self._shift,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.top.load_state_dict(state["top"])
        if self.negative is not None and state["negative"] is not None:
            self.negative.load_state_dict(state["negative"])
        self._shift = float(state["shift"])
