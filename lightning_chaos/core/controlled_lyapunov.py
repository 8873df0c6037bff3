"""Where h0 is computed: the controlled Lyapunov iteration, accelerated by Rayleigh–Ritz.

The gradient-ascent map ``θ ↦ θ + β g(θ)`` has tangent map ``I + βH``: two copies of the parameters a
distance ``q`` apart separate, once ``q`` is aligned with the top eigenvector ``v0``, by ``1 + β h0`` per
step. One iteration of the method of "A Chaos Theory Approach to Understand Neural Network Optimization"
(ICLR 2021 submission, Algorithm 1, corrected) from a unit direction ``u``::

    y = H u                                   (a Hessian-vector product, see below)
    λ = log ‖u + β y‖                         finite-size Lyapunov exponent
    h0 ≈ (exp(λ) − 1) / β                     the paper reports 1/β, which at the controlled point
                                              β h0 = e − 1 is 1.72× too small
    β ← β / λ                                 control: drives λ → 1, i.e. β h0 → e − 1
    u ← (u + β y) / ‖u + β y‖                 re-centre: the next step's warm start

The direction carried from step to step is what makes one product per step enough when consecutive
batches share their top eigenvector. When they do not, one power step cannot recover: the iterates of a
step span a Krylov space ``span{u, Hu, H²u, …}``, and Rayleigh–Ritz on that space (Lanczos started from
the warm direction) is the best use of the same products. So each computed step here

1. applies the operator to the warm direction(s) (the first iteration, which also gives λ and β);
2. takes the top Ritz pair ``(ρ, x)`` of the space spanned so far, with residual ``r = ‖Hx − ρx‖``;
3. stops when ``r ≤ tol · |ρ|`` (*converged*) or after ``n_iter`` iterations, else extends the space by
   the (orthogonalised) residual, one product per iteration; a converged step is checked, where it can
   afford it, against the Krylov space of the batch gradient ``g, Hg, H²g`` (the gradient is
   concentrated on the top of the batch's spectrum): a higher Ritz value there means the warm direction
   had converged to a lower eigenvalue, and the step goes on from the larger space;
4. warm-starts the next step from the controlled iteration applied to the Ritz vector,
   ``(x + βHx)/‖x + βHx‖`` (no extra product: ``Hx`` is a combination of the products already made).

What the numbers are worth: with exact products ``ρ`` is a lower bound of h0 (Courant–Fischer). The
residual says an eigenvalue of H lies within ``r`` of ``ρ``; it locates the *nearest* eigenvalue, not h0:
a Krylov space whose start has almost no component along ``v0`` can converge to a lower eigenvalue. The
convergence flag is therefore a measured indicator, not a bound; ``benchmarks/README.md`` measures how
often a converged step is off.

The products are exact Hessian-vector products or finite differences ``(g(θ + Δq u) − g(θ))/Δq`` (one
gradient each, the paper's way; exact for quadratic losses, off by the third derivative and by rounding
otherwise). :class:`FiniteDifferenceScale` keeps Δq where the difference matches an exact product along
the current direction to a stated tolerance, re-checked as training moves. :class:`HessianEigenEstimator`
wires all of it to the curvature of a training step; :class:`ControlledLyapunov` is the iteration on any
symmetric operator given as ``V ↦ BV``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_chaos.core.benettin import positive_qr
from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.operators import SecondOrderError
from lightning_chaos.core.params import flatten, unflatten
from lightning_chaos.core.step_curvature import StepCurvature
from lightning_chaos.core.validation import check_choice, check_int, check_number

__all__ = [
    "CALIBRATION_DIRECTIONS",
    "CHECK_DIRECTIONS",
    "GRADIENT_START_DEPTH",
    "GRAPH_COST",
    "HVP_COST",
    "MAX_CHECK_BACKOFF",
    "PRODUCTS",
    "ControlledLyapunov",
    "CurvatureEstimate",
    "DirectionProbe",
    "FiniteDifferenceScale",
    "HessianEigenEstimator",
    "LyapunovStep",
]

BlockOperator = Callable[[Tensor], Tensor]
"""``V ↦ B V`` for a block ``V`` of shape ``(N, j)``."""

Products = Literal["auto", "finite_difference", "exact"]
PRODUCTS: tuple[Products, ...] = ("auto", "finite_difference", "exact")
"""How Hessian-vector products are formed (see :class:`HessianEigenEstimator`)."""


@dataclass
class LyapunovStep:
    """Outcome of one computed step of :class:`ControlledLyapunov` on an operator ``B``.

    Attributes:
        valid: False when a product was not finite; nothing else is meaningful then.
        converged: the residual criterion held for every requested pair.
        ritz_values: ``(k,)`` top Ritz values of B on the step's Krylov space, descending (float64).
        residuals: ``(k,)`` residual norms ``‖B x_i − ρ_i x_i‖`` of the unit Ritz vectors.
        exponents: ``(k,)`` finite-size exponents ``λ_j = log|R_jj|`` of ``(I + βB)U`` for the warm block U.
        lyapunov: ``(k,)`` Lyapunov estimates ``(exp(λ_j) − 1)/β`` (NaN where ``λ_j`` is not measurable).
        beta: the β of this step (before the control update).
        num_products: products ``B v`` spent (a block of j columns counts j).
        vectors: ``(N, k)`` unit Ritz vectors (``None`` when invalid).
        images: ``(N, k)`` their images ``B x_i`` (``None`` when invalid).
    """

    valid: bool
    converged: bool = False
    ritz_values: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    residuals: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    exponents: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    lyapunov: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    beta: float = math.nan
    num_products: int = 0
    vectors: Tensor | None = None
    images: Tensor | None = None


class ControlledLyapunov:
    """The controlled Lyapunov iteration at one end of a symmetric operator, with Rayleigh–Ritz.

    The warm block ``U`` (orthonormal, ``(N, k)``), β, the private generator and the recent exponents
    persist across calls: :meth:`step` runs one computed step (module docstring) and leaves the warm start
    for the next one. For the most negative eigenvalue of H run it on ``B = −H``.

    Args:
        k: number of top eigenpairs.
        beta: initial ascent rate β > 0; the control adapts it.
        seed: seed of the private generator that draws random directions (identical on every rank).
        window: number of recent ``λ0`` kept for :attr:`fluctuation`.

    Raises:
        ValueError: on ``k < 1``, ``beta ≤ 0`` or ``window < 1``.

    Example:
        >>> a = torch.diag(torch.tensor([10.0, 9.0, 1.0, 0.5], dtype=torch.float64))
        >>> iteration = ControlledLyapunov()
        >>> step = iteration.step(a.__matmul__, 4, dtype=torch.float64, max_products=4, tol=1e-6)
        >>> round(float(step.ritz_values[0]), 6), step.converged
        (10.0, True)
    """

    def __init__(
        self, k: int = 1, beta: float = 1.0, seed: int = 0, window: int = 20, block: int | None = None
    ) -> None:
        self.k = check_int("k", k)
        self.block = self.k if block is None else check_int("block", block, minimum=self.k)
        self.beta = check_number("beta", beta, 0.0, low_open=True, high_open=True)
        window = check_int("window", window)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.basis: Tensor | None = None
        self.recent: deque[float] = deque(maxlen=window)
        self.num_restarts = 0
        self.checks: deque[bool] = deque(maxlen=window)  # recent start checks: True where one failed
        self.check_interval = 1  # converged steps between checks: doubles while they pass, up to 8
        self.since_check = 0
        self.last_top = math.nan  # top Ritz value of the last valid step

    @property
    def fluctuation(self) -> float:
        """Mean ``|λ0 − 1|`` over the recent measurable exponents (``nan`` before the first).

        The control holds λ0 at 1 while the curvature seen by the warm direction is steady.
        """
        return sum(abs(x - 1.0) for x in self.recent) / len(self.recent) if self.recent else math.nan

    @property
    def warm_trusted(self) -> bool:
        """Whether a convergence may stand unchecked by the starts of :meth:`step`.

        True while at most one in ten of the recent checks found a higher eigenvalue.
        """
        return sum(self.checks) <= 0.1 * len(self.checks)

    def randomize(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Draw a fresh random orthonormal warm block (from the private generator)."""
        block = torch.randn(dim, self.block, generator=self.generator, dtype=torch.float64)
        self.basis = torch.linalg.qr(block).Q.to(dtype=dtype, device=device)

    def _warm(self, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.basis is None or self.basis.shape != (dim, self.block):
            self.randomize(dim, dtype, device)
        assert self.basis is not None
        if self.basis.device != device or self.basis.dtype != dtype:
            self.basis = self.basis.to(device=device, dtype=dtype)
        return self.basis

    def step(
        self,
        apply: BlockOperator,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_products: int = 1,
        tol: float = 0.05,
        first_images: Tensor | None = None,
        starts: Tensor | None = None,
        start_depth: int = 2,
        starts_limit: int | None = None,
    ) -> LyapunovStep:
        """One computed step: the iteration from the warm block, Rayleigh–Ritz, adaptive extension.

        Args:
            apply: ``V ↦ BV`` for ``V`` of shape ``(N, j)`` (unit columns).
            dim: ``N``.
            dtype: dtype of the directions (that of the parameters).
            device: device of the directions.
            max_products: bound on the products of this step (at least ``k``: the warm block).
            tol: convergence tolerance on the relative Ritz residual ``‖Bx − ρx‖ / |ρ|``.
            first_images: ``B U`` for the first columns of the current warm block ``U``, if already
                computed (counted in :attr:`LyapunovStep.num_products`, not applied again).
            starts: ``(N, e)`` directions that check a convergence: once the pairs have converged and
                ``max_products`` still affords it, the space is extended by each start ``s`` and its
                images ``Bs, …`` (``start_depth`` products per start, orthogonalised). If that larger
                space has no Ritz value above the converged ones (by more than ``tol``) they stand;
                otherwise the step goes on from the larger space. Not carried to the next step.
            start_depth: products per start direction.
            starts_limit: products the step may have spent with the check at most (default
                ``max_products``).

        Returns:
            The :class:`LyapunovStep`. On an invalid step β is kept and the directions re-drawn.
        """
        device = torch.device(device)
        warm = self._warm(dim, dtype, device)
        beta = self.beta
        known = 0 if first_images is None else first_images.reshape(dim, -1).shape[1]
        if first_images is None or known == 0:
            images = apply(warm)
        elif known < self.block:  # the first columns of the warm block were applied already
            images = torch.cat([first_images.reshape(dim, known), apply(warm[:, known:])], dim=1)
        else:
            images = first_images.reshape(dim, self.block)
        spent = self.block  # the given images count as products of this step (their cost is the caller's)
        space: _KrylovSpace | None = None
        coefficients: Tensor | None = None
        if self.block == 1:
            # one warm direction u: its Ritz pair on span{u} is (ρ, u) with ρ = uᵀBu (no eigensolver), and
            # ρ, ‖Bu‖² and the residual reach the host together; ‖Bu‖² is finite only if Bu is
            rho, square, residual = _direction_statistics(warm[:, 0], images[:, 0])
            if not math.isfinite(square) and not bool(torch.isfinite(images).all()):
                return self._invalid(dim, dtype, device, spent, beta)
            exponent = _growth_exponent(rho, square, beta)
            self._control(exponent, rho, dtype)
            lyapunov_value = math.expm1(exponent) / beta if exponent > _floor(dtype) else math.nan
            ritz, residuals, exponents, lyapunov = torch.tensor(
                [[rho], [residual], [exponent], [lyapunov_value]], dtype=torch.float64
            ).unbind()
            vectors, mapped = warm, images
        else:
            if not bool(torch.isfinite(images).all()):
                return self._invalid(dim, dtype, device, spent, beta)
            exponents, rho0 = self._exponents(warm[:, : self.k], images[:, : self.k], beta)
            self._control(float(exponents[0]), float(rho0), dtype)
            lyapunov = torch.where(exponents > _floor(dtype), torch.expm1(exponents) / beta, math.nan)
            space = _KrylovSpace(warm, images, max_products)
            ritz, coefficients, vectors, mapped, residuals = self._ritz(space, dtype)
        unconverged = _unconverged(residuals, ritz, tol)
        starts = None if starts is None else starts.reshape(dim, -1)
        unverified = starts is not None  # converged pairs are checked once against the starts' space
        converged_basis: Tensor | None = None
        while True:
            if not unconverged:
                if starts is None or not unverified:
                    break
                # what a convergence below the top looks like: the converged value dropped by more than
                # tol below the last step's, or recent checks found higher eigenvalues. Such a check is
                # urgent: it is never skipped and may spend what earlier steps saved
                dropped = float(ritz[0]) < (1 - tol) * self.last_top
                urgent = dropped or not self.warm_trusted
                limit = max_products if urgent or starts_limit is None else min(starts_limit, max_products)
                if spent + start_depth * starts.shape[1] > limit:
                    break
                unverified = False
                self.since_check += 1
                if self.since_check < self.check_interval and not urgent:  # recent checks passed
                    break
                self.since_check = 0
                result = (ritz, coefficients, vectors, mapped, residuals)
                result_basis = warm if space is None else space.basis
                if space is None:
                    space = _KrylovSpace(warm, images, max_products)
                added = self._extend_by_starts(space, apply, starts, start_depth)
                if added < 0:  # a product was not finite
                    return self._invalid(dim, dtype, device, spent - added, beta)
                spent += added
                ritz, coefficients, vectors, mapped, residuals = self._ritz(space, dtype)
                found_higher = bool((ritz > result[0] + tol * result[0].abs()).any())
                self.checks.append(found_higher)
                self.check_interval = 1 if found_higher else min(2 * self.check_interval, _MAX_CHECK_INTERVAL)
                if not found_higher:
                    # nothing above the converged pairs: they stand (the larger space mixes in the next
                    # eigenvectors, whose residuals it has not resolved)
                    ritz, coefficients, vectors, mapped, residuals = result
                    converged_basis = result_basis
                    break
                unconverged = _unconverged(residuals, ritz, tol)  # a higher eigenvalue: go on from it
                continue
            if spent >= max_products:
                break
            if space is None:
                space = _KrylovSpace(warm, images, max_products)
            # B x_i orthogonalised against span(basis) is the direction of its residual B x_i − ρ_i x_i
            image = space.extend(apply, mapped[:, unconverged[0]])
            if image is None:  # the Krylov space is invariant: the Ritz pairs are exact
                unconverged = []
                continue
            spent += 1
            if not bool(torch.isfinite(image).all()):
                return self._invalid(dim, dtype, device, spent, beta)
            ritz, coefficients, vectors, mapped, residuals = self._ritz(space, dtype)
            unconverged = _unconverged(residuals, ritz, tol)
        if not unconverged and unverified and not self.warm_trusted:
            # converged without the check (not affordable) while recent checks found the warm start
            # converging below the top: a value, not a converged one
            unconverged = list(range(self.k))
        self.last_top = float(ritz[0])
        if converged_basis is not None:
            basis = converged_basis
        else:
            basis = warm if space is None else space.basis
        self.basis = self._next_block(basis, coefficients, vectors, ritz, mapped, beta)
        return LyapunovStep(
            valid=True,
            converged=not unconverged,
            ritz_values=ritz,
            residuals=residuals,
            exponents=exponents,
            lyapunov=lyapunov,
            beta=beta,
            num_products=spent,
            vectors=vectors,
            images=mapped,
        )

    @staticmethod
    def _extend_by_starts(space: _KrylovSpace, apply: BlockOperator, starts: Tensor, depth: int) -> int:
        """Extend ``space`` by each start ``s`` ``(N, e)`` and its images ``Bs, …`` (``depth`` products each).

        Returns the products spent, negated when one was not finite (the space is then left unfinished).
        """
        spent = 0
        for column in starts.T:
            direction = column
            for _ in range(depth):
                image = space.extend(apply, direction)
                if image is None:  # nothing new in this direction
                    break
                spent += 1
                if not bool(torch.isfinite(image).all()):
                    return -spent
                direction = image
        return spent

    def _ritz(self, space: _KrylovSpace, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Top-k Ritz values, coefficients, unit vectors, images and residual norms on the space."""
        ritz_all, coefficients = space.rayleigh_ritz(self.block)
        ritz = ritz_all[: self.k]
        basis, columns = space.basis, space.images
        vectors, mapped = basis @ coefficients[:, : self.k], columns @ coefficients[:, : self.k]
        residuals = torch.linalg.vector_norm(mapped - vectors * ritz.to(dtype), dim=0).double()
        return ritz, coefficients, vectors, mapped, residuals

    def _next_block(
        self,
        basis: Tensor,
        coefficients: Tensor | None,
        vectors: Tensor,
        ritz: Tensor,
        mapped: Tensor,
        beta: float,
    ) -> Tensor:
        """The next warm block: the controlled iteration applied to the top-k Ritz vectors, and more.

        With a block larger than k: the top residual and further Ritz vectors up to the block size, so that
        the block spans ``x_1`` and ``Hx_1`` (one Lanczos step carried over to the next batch).
        """
        iterate = (mapped * beta).add_(vectors)  # x + βBx
        if self.block == self.k:
            if self.k == 1:  # the QR of one column is its normalisation
                return iterate.div_(torch.linalg.vector_norm(iterate))
            return positive_qr(iterate)[0]
        assert coefficients is not None  # a block larger than k went through Rayleigh–Ritz
        residual = mapped[:, :1] - vectors[:, :1] * ritz[:1].to(vectors.dtype)
        others = basis @ coefficients[:, self.k : self.block - 1]
        return positive_qr(torch.cat([iterate, residual, others], dim=1))[0]

    def _exponents(self, warm: Tensor, images: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """Benettin exponents ``log|R_jj|`` of ``(I + βB)U`` and the Rayleigh quotient of ``u_0``."""
        rho0 = warm[:, 0] @ images[:, 0]
        if self.k == 1:
            exponent = _growth_exponent(float(rho0), float(images[:, 0] @ images[:, 0]), beta)
            return torch.tensor([exponent], dtype=torch.float64), rho0
        _, r_diag = positive_qr((warm + beta * images).double())
        return torch.log(r_diag), rho0

    def _control(self, lam0: float, rho0: float, dtype: torch.dtype) -> None:
        """β ← β/λ; growth below rounding level re-aims β at ``(e − 1)/ρ`` instead."""
        if math.isfinite(lam0) and lam0 > _floor(dtype):
            self.beta = self.beta / lam0
            self.recent.append(lam0)
        elif math.isfinite(rho0) and rho0 > 0:
            self.beta = (math.e - 1) / rho0

    def _invalid(
        self, dim: int, dtype: torch.dtype, device: torch.device, spent: int, beta: float
    ) -> LyapunovStep:
        self.num_restarts += 1
        self.randomize(dim, dtype, device)
        return LyapunovStep(valid=False, beta=beta, num_products=spent)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the iteration exactly: warm block, β, generator, history."""
        return {
            "basis": None if self.basis is None else self.basis.detach().cpu().clone(),
            "beta": self.beta,
            "generator": self.generator.get_state(),
            "recent": list(self.recent),
            "num_restarts": self.num_restarts,
            "checks": list(self.checks),
            "check_interval": self.check_interval,
            "since_check": self.since_check,
            "last_top": self.last_top,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the block moves to the parameters' device on first use)."""
        self.basis = state["basis"]
        self.beta = float(state["beta"])
        self.generator.set_state(state["generator"])
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.num_restarts = int(state["num_restarts"])
        self.checks.clear()
        self.checks.extend(bool(c) for c in state.get("checks", ()))
        self.check_interval = int(state.get("check_interval", 1))
        self.since_check = int(state.get("since_check", 0))
        self.last_top = float(state.get("last_top", math.nan))


def _floor(dtype: torch.dtype) -> float:
    """Growth below a few hundred ulps of the parameters' dtype is rounding, not curvature."""
    return 100 * torch.finfo(dtype).eps


_THETA_NORM = "controlled_lyapunov.theta_norm"
"""Key of ``‖θ‖`` in the step's :attr:`StepCurvature.cache` (computed at most once per step)."""


def _counts(curvature: StepCurvature, before: tuple[int, ...]) -> tuple[int, int, int]:
    """Gradients, exact products and gradient graphs of the step's curvature since ``before``."""
    operator = curvature.cache.get("hessian")
    gradients = curvature.loss.num_gradients - before[0]
    if operator is None:
        return gradients, 0, 0
    return gradients, operator.num_hvps - before[1], operator.num_graphs - before[2]


def _space(loss: FunctionalLoss) -> tuple[int, torch.dtype, torch.device]:
    """``N``, dtype and device of the parameter space of ``loss``."""
    return loss.dim, loss.params[0].dtype, loss.params[0].device


def _host_norms(tensors: list[Tensor]) -> list[float]:
    """The Euclidean norm of each tensor, brought to the host in one transfer where they share a dtype."""
    norms = torch._foreach_norm(tensors)
    try:
        return torch.stack(norms).tolist()
    except RuntimeError:  # tensors of several dtypes or devices
        return [float(n) for n in norms]


def _theta_norm(curvature: StepCurvature) -> float:
    """``‖θ‖`` of the step, computed once per step (shared with the step's other consumers)."""
    if _THETA_NORM not in curvature.cache:
        curvature.cache[_THETA_NORM] = math.hypot(*_host_norms(curvature.loss.params))
    norm: float = curvature.cache[_THETA_NORM]
    return norm


def _growth_exponent(rho: float, square: float, beta: float) -> float:
    """``λ = log ‖u + βBu‖`` of a unit u from ``ρ = uᵀBu`` and ``‖Bu‖²``.

    ``‖u + βBu‖² = 1 + 2βρ + β²‖Bu‖²``: two dot products, no QR.
    """
    growth = 1.0 + 2.0 * beta * rho + beta * beta * square
    return 0.5 * math.log(growth) if growth > 0 else -math.inf


def _direction_statistics(direction: Tensor, image: Tensor) -> tuple[float, float, float]:
    """``ρ = uᵀy``, ``‖y‖²`` and the residual ``‖y − ρu‖`` of a unit ``u`` and ``y = Bu``, in one transfer."""
    rho = direction @ image
    residual = torch.linalg.vector_norm((direction * rho).sub_(image))  # ‖ρu − y‖ = ‖y − ρu‖
    rho_value, square, residual_value = torch.stack((rho, image @ image, residual)).tolist()
    return rho_value, square, residual_value


def _unconverged(residuals: Tensor, ritz: Tensor, tol: float) -> list[int]:
    """Indices of the Ritz pairs whose residual exceeds ``tol · |ρ|``."""
    return [i for i, (r, rho) in enumerate(zip(residuals.tolist(), ritz.tolist())) if r > tol * abs(rho)]


class _KrylovSpace:
    """An orthonormal basis ``V`` ``(N, j)``, its images ``BV`` and ``T = Vᵀ(BV)``, grown a column at a time.

    Appending a column costs two passes over ``j × N`` entries (the new row and column of ``T``) instead of
    recomputing the ``j × j`` projection. Columns are stored as contiguous rows of ``(capacity, N)``
    buffers that grow geometrically: the copies of a space of ``m`` columns total ``O(mN)``, its memory is
    at most twice what it holds, and every pass over ``V`` reads contiguous memory.

    Args:
        basis: ``(N, j0)`` orthonormal start block.
        images: ``(N, j0)`` its images ``B V``.
        capacity: columns the space may reach (storage grows up to this, as needed).
    """

    def __init__(self, basis: Tensor, images: Tensor, capacity: int) -> None:
        self.size = basis.shape[1]
        self.capacity = max(capacity, self.size)
        self._basis, self._images = basis.T, images.T  # (j, N) views until the first append copies them
        self.projected = (basis.T @ images).double()

    @property
    def basis(self) -> Tensor:
        """``V``, ``(N, j)``."""
        return self._basis[: self.size].T

    @property
    def images(self) -> Tensor:
        """``BV``, ``(N, j)``."""
        return self._images[: self.size].T

    def append(self, vector: Tensor, image: Tensor) -> None:
        """Add a unit column ``v`` ``(N, 1)`` orthogonal to ``V`` and its image ``Bv`` ``(N, 1)``."""
        j = self.size
        if j == self._basis.shape[0] or not self._basis.is_contiguous():
            room = max(j + 1, min(2 * j, self.capacity))
            self._basis, self._images = _grown(self._basis, j, room), _grown(self._images, j, room)
        self._basis[j] = vector[:, 0]
        self._images[j] = image[:, 0]
        column = (self._basis[: j + 1] @ image).double()  # [Vᵀ; vᵀ] Bv, (j + 1, 1)
        row = (self._images[:j] @ vector).double()  # (BV)ᵀ v, (j, 1)
        projected = self.projected.new_empty(j + 1, j + 1)
        projected[:j, :j] = self.projected
        projected[:, j:] = column
        projected[j:, :j] = row.T
        self.projected = projected
        self.size = j + 1

    def extend(self, apply: BlockOperator, direction: Tensor) -> Tensor | None:
        """Orthogonalise ``direction`` ``(N,)`` or ``(N, 1)`` against ``V``, apply B to it, append both.

        Returns:
            The image ``Bv`` ``(N, 1)`` of the new unit column, or ``None`` (nothing appended) when
            ``direction`` lies in ``span(V)`` to rounding.
        """
        extension = _orthogonal_extension(self.basis, direction)
        if extension is None:
            return None
        image = apply(extension)
        self.append(extension, image)
        return image

    def rayleigh_ritz(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k Ritz values (descending, float64) and coefficient vectors ``(j, k)`` on ``span(V)``.

        ``T = Vᵀ(BV)`` is symmetrised: finite-difference products are symmetric only up to their error.
        """
        projected = self.projected
        values, vectors = torch.linalg.eigh(0.5 * (projected + projected.T))
        top = min(k, values.numel())
        return values.flip(0)[:top], vectors.flip(1)[:, :top].to(self._basis.dtype)


def _grown(rows: Tensor, used: int, room: int) -> Tensor:
    """A contiguous ``(room, N)`` buffer whose first ``used`` rows are those of ``rows``."""
    grown = rows.new_empty(room, rows.shape[1])
    grown[:used] = rows[:used]
    return grown


def _orthogonal_extension(basis: Tensor, direction: Tensor) -> Tensor | None:
    """``direction`` orthogonalised against ``basis`` (Gram–Schmidt twice), unit, as ``(N, 1)``.

    ``None`` when nothing is left (``direction`` lies in ``span(basis)`` to rounding).
    """
    v = direction.reshape(-1, 1)
    start = torch.linalg.vector_norm(v)
    for _ in range(2):
        v = v - basis @ (basis.T @ v)
    norm, remaining = torch.stack((start, torch.linalg.vector_norm(v))).tolist()
    if not remaining > math.sqrt(basis.shape[0]) * torch.finfo(basis.dtype).eps * max(norm, 1e-300):
        return None
    return v / remaining


HVP_COST = 2.0
"""Gradient-equivalents charged for one exact Hessian-vector product (a backward pass through a gradient
graph, which is about twice the size of the forward graph; measured in ``benchmarks/README.md``)."""

CALIBRATION_DIRECTIONS = 24
"""Random directions (besides the top Ritz vector) along which the warm-up compares finite differences
with exact products. Kinks crossed within Δq hit a random direction as often as the top one, but any one
product rarely (ReLU networks: about one product in ten), so a handful of directions misses them and
lets through a Δq whose rare errors are large; the measurement behind the number is in
``benchmarks/README.md``. A one-time cost of the warm-up."""

_CHUNK = 4
"""Columns per batched exact product of the warm-up's directions (bounds their memory)."""

GRADIENT_START_DEPTH = 3
"""Products of the gradient's Krylov sequence ``g, Hg, H²g`` that check a converged step."""

_MAX_CHECK_INTERVAL = 8
"""Converged steps between gradient checks at most, once the checks keep passing."""

CHECK_DIRECTIONS = 2
"""Random directions (besides the warm direction) of each periodic Δq check."""

MAX_CHECK_BACKOFF = 4
"""Periodic Δq checks back off to every ``MAX_CHECK_BACKOFF · check_every`` computed steps at most."""

GRAPH_COST = 1.0
"""Gradient-equivalents charged for building the gradient graph (``create_graph=True``) of a step."""


@dataclass
class DirectionProbe:
    """A unit direction ``u`` with its exact image ``Hu``, for comparing finite differences with it.

    Attributes:
        finite_difference: ``Δq ↦ (g(θ + Δq u) − g(θ))/Δq`` (one gradient per call).
        exact: ``Hu``.
        scale: the curvature scale errors are measured in (the top eigenvalue: a residual of the
            iteration is compared with ``tol`` times it).
        known: finite differences already computed, by Δq (reused, not recounted).
    """

    finite_difference: Callable[[float], Tensor]
    exact: Tensor
    scale: float
    known: dict[float, Tensor] = field(default_factory=dict)

    def error(self, delta: float) -> tuple[float, int]:
        """Error ``‖FD(Δq) − Hu‖ / scale`` and the gradients spent on it (0 or 1)."""
        spent = 0
        if delta not in self.known:
            self.known[delta] = self.finite_difference(delta)
            spent = 1
        difference = float(torch.linalg.vector_norm(self.known[delta] - self.exact))
        return (difference / self.scale if self.scale > 0 else (0.0 if difference == 0 else math.inf)), spent


class FiniteDifferenceScale:
    """The separation Δq of finite-difference products, kept where they match exact products.

    A finite difference ``(g(θ + Δq u) − g(θ))/Δq`` is ``Hu`` up to ``O(Δq)`` (the third derivative, and
    the kinks of ReLU, max-pool and BatchNorm crossed within Δq, whose error does not shrink with Δq: a
    crossed kink adds a jump of the gradient divided by Δq) and up to rounding ``O(eps/Δq)``
    (cancellation in float32). Its error along a unit direction u, in units of the top eigenvalue h0 (the
    scale the iteration's residuals are compared with),

        e(Δq) = ‖(g(θ + Δq u) − g(θ))/Δq − Hu‖ / h0,

    is measured against exact products (:meth:`calibrate`), along the top direction (what h0 depends
    on) and along a random one (what a Krylov extension looks like). The largest Δq of the ladder
    ``delta_max · 4^{-j}`` whose worst error is ``≤ tol`` is kept; when no rung passes, finite
    differences are abandoned for exact products until the next check.

    Args:
        delta_max: the largest (and first) separation tried, ``> 0``.
        tol: tolerance on ``e``, ``> 0``.
        rungs: number of rungs below ``delta_max``.

    Attributes:
        delta_q: the current separation.
        exact: whether products are exact for now (no rung passed).
        error: the worst ``e`` of the current setting at the last check (``nan`` before).
        num_checks: checks made.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> grad = lambda theta: a @ theta + theta**3  # the gradient of ½θᵀAθ + θ⁴/4 at θ
        >>> u = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> probe = DirectionProbe(lambda dq: (grad(dq * u) - grad(0 * u)) / dq, a @ u, scale=3.62)
        >>> scale = FiniteDifferenceScale(delta_max=0.5, tol=1e-2)
        >>> scale.calibrate([probe]), scale.delta_q, scale.exact
        (3, 0.125, False)
    """

    def __init__(self, delta_max: float = 5e-2, tol: float = 2e-2, rungs: int = 8) -> None:
        self.delta_max = check_number("delta_q", delta_max, 0.0, low_open=True, high_open=True)
        self.tol = check_number("delta_q_tol", tol, 0.0, low_open=True, high_open=True)
        self.rungs = check_int("rungs", rungs, minimum=0)
        self.delta_q = self.delta_max
        self.exact = False
        self.error = math.nan
        self.num_checks = 0

    def ladder(self) -> list[float]:
        """The separations that may be chosen, largest first."""
        return [self.delta_max * 4.0**-j for j in range(self.rungs + 1)]

    def calibrate(self, probes: list[DirectionProbe]) -> int:
        """Choose Δq from the ladder by comparing finite differences with exact products.

        A rung passes when the worst error over the probes is ``≤ tol`` at it *and* at the next smaller
        rung: a smooth loss's finite difference converges as Δq shrinks, whereas a kink crossed at one
        scale shows as an error that does not. Starts at the current Δq. If it passes, tries one rung up
        when it passes by a wide margin (``e ≤ tol/4``: less cancellation); if it fails, walks down until a
        rung passes, and gives up (exact products) when the error grows twice in a row. A smooth loss's
        error only grows as Δq shrinks where rounding dominates; a loss with kinks (ReLU, max-pool) shows
        the same sign at large Δq, the jumps of the gradient over Δq, until Δq is below the distance to the
        nearest kink. Such a rung can pass on every probe and is still not safe: the iteration's own
        directions find the kinks, and a Krylov space of such finite differences converges, with a small
        residual, to spurious eigenpairs of the size of a jump over Δq (measured in
        ``benchmarks/README.md``). So the walk does not go below a rising error.

        Args:
            probes: the directions, each with its exact image.

        Returns:
            The gradients spent.
        """
        self.num_checks += 1
        spent = 0
        ladder = self.ladder()

        def error(index: int) -> float:
            nonlocal spent
            worst = 0.0
            for rung in (index, index + 1) if index + 1 < len(ladder) else (index,):
                for probe in probes:
                    e, cost = probe.error(ladder[rung])
                    worst, spent = max(worst, e), spent + cost
                    if worst > self.tol:  # nothing else can rescue this rung
                        return worst
            return worst

        start = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i] / self.delta_q)))
        current = error(start)
        if current <= self.tol:
            if current <= self.tol / 4 and start > 0:
                up = error(start - 1)
                if up <= self.tol:
                    start, current = start - 1, up
            self.delta_q, self.error, self.exact = ladder[start], current, False
            return spent
        best, best_error, rising, previous = start, current, 0, current
        for index in range(start + 1, len(ladder)):
            e = error(index)
            if e <= self.tol:
                self.delta_q, self.error, self.exact = ladder[index], e, False
                return spent
            if e < best_error:
                best, best_error = index, e
            rising = rising + 1 if e > previous else 0
            previous = e
            if rising >= 2:
                break
        self.delta_q, self.error, self.exact = ladder[best], best_error, True
        return spent

    def state_dict(self) -> dict[str, Any]:
        """The current separation, mode, error and check count."""
        return {
            "delta_q": self.delta_q,
            "exact": self.exact,
            "error": self.error,
            "num_checks": self.num_checks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.delta_q = float(state["delta_q"])
        self.exact = bool(state["exact"])
        self.error = float(state["error"])
        self.num_checks = int(state["num_checks"])


@dataclass
class CurvatureEstimate:
    """Hessian eigenvalue estimates of one computed step (floats; ``nan`` where not computed).

    Attributes:
        valid: False when the step was skipped (NaN/inf gradients or products).
        converged: the convergence criterion held (relative Ritz residual ``≤ tol`` for the top-k pairs,
            and for the most negative pair when requested).
        h0: largest Ritz value of the step's Krylov space: the estimate of the largest eigenvalue (a lower
            bound of it for exact products).
        h0_lyapunov: ``(exp(λ) − 1)/β`` of the step's first iteration (the paper's estimate, corrected).
        h0_residual: ``‖Hx − h0·x‖`` of the unit Ritz vector: an eigenvalue lies within it of ``h0`` (the
            nearest one, not necessarily the largest).
        lyapunov_exponent: finite-size exponent λ of the step's first iteration (≈ 1 once controlled).
        beta: ascent rate β used for the step.
        fluctuation: mean ``|λ − 1|`` over the recent steps.
        top: top-k Ritz values, descending.
        h_min: most negative Ritz value (``nan`` unless requested).
        num_gradients: gradients evaluated in this step (finite differences, ``g(θ)`` when computed here,
            Δq checks).
        num_hvps: exact Hessian-vector products in this step.
        num_graphs: gradient graphs built for exact products in this step (0 or 1).
        cost: gradient-equivalents of the step: ``num_gradients + HVP_COST·num_hvps + GRAPH_COST·num_graphs``.
        num_products: Hessian products the iteration used (finite-difference or exact).
        exact_products: whether the iteration's products were exact.
        delta_q: the separation of the finite differences (``nan`` for exact products).
        delta_q_error: worst relative error of a finite difference at ``delta_q`` measured on this step
            (check steps only).
        warmup_products: products of the warm-up, when it ran on this step.
    """

    valid: bool
    converged: bool = False
    h0: float = math.nan
    h0_lyapunov: float = math.nan
    h0_residual: float = math.nan
    lyapunov_exponent: float = math.nan
    beta: float = math.nan
    fluctuation: float = math.nan
    top: list[float] = field(default_factory=list)
    h_min: float = math.nan
    num_gradients: int = 0
    num_hvps: int = 0
    num_graphs: int = 0
    cost: float = 0.0
    num_products: int = 0
    exact_products: bool = False
    delta_q: float = math.nan
    delta_q_error: float = math.nan
    warmup_products: int = 0


class HessianEigenEstimator:
    """Per-step estimates of the top-k and the most negative Hessian eigenvalues of a training step.

    Each :meth:`step` takes the curvature of the current batch at the current θ
    (:class:`~lightning_chaos.core.step_curvature.StepCurvature`) and runs one computed step of the
    Rayleigh–Ritz-accelerated controlled Lyapunov iteration (module docstring) from the warm directions.
    The first step (and the first after a lost direction) runs a warm-up instead: the same iteration
    from a random direction with up to ``warmup_iters`` products and the tolerance ``warmup_tol``.

    Products (``products``):

    * ``"auto"``: the warm-up runs on exact Hessian-vector products (when the model has second
      derivatives) and then compares finite differences with exact products along its top Ritz vector
      and :data:`CALIBRATION_DIRECTIONS` random directions (:class:`FiniteDifferenceScale`). Where a Δq and
      the next smaller one meet ``delta_q_tol`` the steps use finite differences (one gradient each) at
      that Δq, re-checked after ``check_every`` computed steps (the interval doubles, up to
      :data:`MAX_CHECK_BACKOFF` times ``check_every``, while the checks keep the setting, and returns to
      ``check_every`` when one changes it); otherwise (ReLU, max-pool and BatchNorm
      kinks, attention softmax saturating within Δq) they use exact products until a check finds a Δq
      that passes. A model without second derivatives keeps
      finite differences at ``delta_q``, unchecked.
    * ``"finite_difference"``: finite differences at the fixed ``delta_q`` (the paper's method).
    * ``"exact"``: exact Hessian-vector products only (double backward through the step's gradient graph).

    Cost: every product, gradient and graph is counted (:attr:`CurvatureEstimate.cost`, in
    gradient-equivalents: a gradient 1, an exact product :data:`HVP_COST`, the step's gradient graph
    :data:`GRAPH_COST`). The computed steps after the warm-up spend at most ``budget`` on average: a step
    may use what earlier steps saved (up to three steps' worth) and at most ``n_iter`` products; a step
    always gets at least one product per warm direction. The warm-up is bounded by ``warmup_iters``.

    Args:
        top_k: number of top eigenvalues.
        most_negative: also estimate the most negative eigenvalue (the same iteration on ``−H``).
        n_iter: products per computed step at most, per end of the spectrum (1: the paper's one product
            per step).
        tol: convergence tolerance on the relative Ritz residual.
        budget: mean gradient-equivalents per computed step (``inf``: only ``n_iter`` bounds a step).
        products: ``"auto"``, ``"finite_difference"`` or ``"exact"``.
        delta_q: the (largest) finite-difference separation.
        delta_q_tol: tolerance on the relative error of a finite difference (``"auto"``).
        relative_delta_q: the separation is ``delta_q · ‖θ‖``.
        check_every: computed steps between Δq checks (``"auto"``) after the warm-up and after a check
            that changed Δq or the choice of exact products; doubled after each check that kept them.
        warmup_iters: products of the warm-up at most (0: no warm-up).
        warmup_tol: convergence tolerance of the warm-up.
        block: warm directions carried between steps (at least ``top_k``); beyond ``top_k`` the block
            also carries the top residual, i.e. one Lanczos step of the previous batch.
        seed: seed of the direction generators.
        window: number of steps in :attr:`CurvatureEstimate.fluctuation`.
        gradient_start: check a converged step against the batch gradient ``g(θ)``: the Krylov space of
            ``g, Hg, H²g`` (:data:`GRADIENT_START_DEPTH` finite-difference products, when the step still
            affords them) must hold no Ritz value above the converged one, or the step goes on from the
            larger space. The gradient is free, specific to the batch and concentrated on the top of its
            spectrum; a warm direction that is an eigenvector of a *lower* eigenvalue of the new batch
            converges there. While the checks pass they back off (up to every 8th converged step) and
            spend only the step's own ``budget``; a check is urgent (never skipped, and it may spend the
            credit saved by earlier steps) when the converged value dropped by more than ``tol`` below
            the last step's or more than one in ten recent checks found a higher eigenvalue, and while
            they do, a step that cannot afford its check is not flagged converged. Not applied to exact
            products, whose cost would take the budget of the step's own extensions.

    Example:
        >>> from lightning_chaos.core.functional_loss import FunctionalLoss
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> curvature = StepCurvature(FunctionalLoss(model, lambda: ((model(x) - y) ** 2).mean()))
        >>> estimate = HessianEigenEstimator().step(curvature)
        >>> estimate.valid, estimate.converged, estimate.h0 > 0
        (True, True, True)
    """

    def __init__(
        self,
        top_k: int = 1,
        most_negative: bool = False,
        n_iter: int = 8,
        tol: float = 0.05,
        budget: float = 4.0,
        products: Products = "auto",
        delta_q: float = 5e-2,
        delta_q_tol: float = 2e-2,
        relative_delta_q: bool = False,
        check_every: int = 50,
        warmup_iters: int = 100,
        warmup_tol: float = 1e-2,
        block: int | None = None,
        seed: int = 0,
        window: int = 20,
        gradient_start: bool = True,
    ) -> None:
        self.gradient_start = bool(gradient_start)
        self.top = ControlledLyapunov(k=top_k, seed=seed, window=window, block=block)
        self.negative = ControlledLyapunov(k=1, seed=seed + 1, window=window) if most_negative else None
        self.n_iter = check_int("n_iter", n_iter)
        self.tol = check_number("tol", tol, 0.0, low_open=True, high_open=True)
        self.budget = check_number("budget", budget, 0.0, low_open=True)
        self.products = check_choice("products", products, PRODUCTS)
        self.scale = FiniteDifferenceScale(delta_q, delta_q_tol)
        self.relative_delta_q = bool(relative_delta_q)
        self.check_every = check_int("check_every", check_every)
        self.warmup_iters = check_int("warmup_iters", warmup_iters, minimum=0)
        self.warmup_tol = check_number("warmup_tol", warmup_tol, 0.0, low_open=True, high_open=True)
        self.needs_warmup = self.warmup_iters > 0
        self.steps_since_check = 0
        self.recheck_after = self.check_every  # computed steps between Δq checks, now
        self.credit = 0.0
        self.h0_scale = 0.0  # |h0| of the last valid step: the unit of the Δq checks
        self.second_order = products != "finite_difference"  # False once the model showed it has none
        self._probe_generator = torch.Generator().manual_seed(int(seed) + 2)

    def _length(self, curvature: StepCurvature) -> float:
        """``‖θ‖`` for a relative separation, else 1."""
        return _theta_norm(curvature) if self.relative_delta_q else 1.0

    def _separation(self, curvature: StepCurvature) -> float:
        """The finite-difference separation of this step: the checked Δq (``"auto"``) or ``delta_q``."""
        delta = self.scale.delta_q if self.products == "auto" else self.scale.delta_max
        return delta * self._length(curvature)

    def _exact(self) -> bool:
        if self.products == "exact":
            return True
        return self.products == "auto" and self.second_order and (self.scale.exact or self.needs_warmup)

    def step(self, curvature: StepCurvature, g0: Tensor | None = None) -> CurvatureEstimate:
        """Estimate the eigenvalues of the step's Hessian (warm-up first when due).

        Args:
            curvature: the step's curvature (its loss, training gradient and exact operator).
            g0: ``g(θ)`` of exactly this loss, ``(N,)``, if known; else ``curvature.g0_tensors()``.

        Returns:
            The :class:`CurvatureEstimate` (``valid=False`` when a gradient or product was not finite).

        Raises:
            NoLossError: the loss closure returned ``None`` (nothing was estimated).
            SecondOrderError: ``products="exact"`` on a model without second derivatives.
        """
        loss = curvature.loss
        operator = curvature.cache.get("hessian")  # built by an earlier consumer of this step, if any
        before = (loss.num_gradients, *((operator.num_hvps, operator.num_graphs) if operator else (0, 0)))
        gradient = curvature.g0_tensors() if g0 is None else unflatten(g0, loss.params)
        # finite differences will need ‖θ‖ (whether θ + Δq·u is representable): one pass for both norms
        theta = not self._exact() or self.relative_delta_q
        norms = _host_norms([*gradient, *loss.params] if theta else gradient)
        if theta:
            curvature.cache.setdefault(_THETA_NORM, math.hypot(*norms[len(gradient) :]))
        # a norm is finite only if every entry is (a non-finite norm may also be an overflow: check then)
        if all(map(math.isfinite, norms[: len(gradient)])) or all(
            bool(torch.isfinite(g).all()) for g in gradient
        ):
            estimate = self._step(curvature, gradient, before)
        else:
            estimate = CurvatureEstimate(valid=False)
        self._count(estimate, curvature, before)
        return estimate

    def _count(self, estimate: CurvatureEstimate, curvature: StepCurvature, before: tuple[int, ...]) -> None:
        """Fill in the step's gradients, exact products, graphs and their cost in gradient-equivalents."""
        estimate.num_gradients, estimate.num_hvps, estimate.num_graphs = _counts(curvature, before)
        estimate.cost = self._spent(curvature, before)

    def _spent(self, curvature: StepCurvature, before: tuple[int, ...]) -> float:
        """Gradient-equivalents spent on the step so far."""
        gradients, hvps, graphs = _counts(curvature, before)
        return gradients + HVP_COST * hvps + GRAPH_COST * graphs

    def _products(self, curvature: StepCurvature, g0: list[Tensor], exact: bool) -> BlockOperator:
        """``V ↦ HV`` by exact products or by finite differences at the current Δq."""
        if exact:
            return curvature.hessian().matmat
        loss = curvature.loss
        delta = self._separation(curvature)
        flat: list[Tensor] = []  # g(θ) as one vector, for blocks of several columns only

        def finite_difference(block: Tensor) -> Tensor:
            if block.shape[1] == 1:
                return loss.gradient(block[:, 0] * delta, relative_to=g0).div_(delta).unsqueeze(1)
            flat[:] = flat or [flatten(g0)]
            return loss.gradients(delta * block).sub_(flat[0][:, None]).div_(delta)

        return finite_difference

    def _representable(self, curvature: StepCurvature, warm: Tensor) -> bool:
        """Whether ``θ + Δq·u`` carries the perturbation ``Δq·u`` to within 1 % in the parameters' dtype.

        ``u`` is the first column of the warm block ``warm``.

        Rounded to nearest (ε = eps/2), ``s = Δq·u`` is carried with an error
        ``‖fl(fl(θ + s) − θ) − s‖ ≤ (1 + ε)² ε (‖θ‖ + 2‖s‖)`` (underflow aside). Where
        ``eps (‖θ‖ + ‖s‖)`` is below a quarter of the 1 % (a unit u: ``‖s‖ = Δq``), the test passes however
        its norms are rounded, so it is not computed; otherwise it is, in the parameters' dtype.
        """
        loss = curvature.loss
        delta = self._separation(curvature)
        eps = torch.finfo(loss.params[0].dtype).eps
        if eps * (_theta_norm(curvature) + delta) <= 2.5e-3 * delta:
            return True
        theta = loss.theta()
        step = delta * warm[:, 0].to(theta)
        realized = (theta + step) - theta
        return bool(torch.linalg.vector_norm(realized - step) <= 1e-2 * torch.linalg.vector_norm(step))

    def _probe(
        self, curvature: StepCurvature, g0: list[Tensor], direction: Tensor, image: Tensor, scale: float
    ) -> DirectionProbe:
        """A :class:`DirectionProbe` along ``direction`` (normalised) with its exact ``image``."""
        loss, length = curvature.loss, self._length(curvature)
        norm = torch.linalg.vector_norm(direction)
        unit = direction / norm

        def finite_difference(delta: float) -> Tensor:
            return loss.gradient(delta * length * unit, relative_to=g0).div_(delta * length)

        return DirectionProbe(finite_difference, image / norm, scale)

    def _random_direction(self, loss: FunctionalLoss) -> Tensor:
        like = loss.params[0]
        direction = torch.randn(loss.dim, generator=self._probe_generator, dtype=torch.float64)
        return direction.to(dtype=like.dtype, device=like.device)

    def _max_products(
        self, curvature: StepCurvature, end: ControlledLyapunov, exact: bool, available: float, spent: float
    ) -> int:
        """Products one end may use: what the credit pays for, within ``[block, n_iter + block − 1]``."""
        graph = GRAPH_COST if exact and curvature.hessian().num_graphs == 0 else 0.0
        unit = HVP_COST if exact else 1.0
        affordable = math.floor((available - spent - graph) / unit) if math.isfinite(available) else math.inf
        return int(max(end.block, min(self.n_iter + end.block - 1, affordable)))

    def _step(self, curvature: StepCurvature, g0: list[Tensor], before: tuple[int, ...]) -> CurvatureEstimate:
        dim, dtype, device = _space(curvature.loss)
        warming = self.needs_warmup
        available = math.inf if warming else min(self.credit + self.budget, 3 * self.budget)
        try:
            return self._run(curvature, g0, before, warming, available)
        except SecondOrderError:
            if self.products != "auto":
                raise
            # no second derivatives: finite differences at the given Δq from now on, unchecked
            self.second_order = False
            if warming:
                self.top.randomize(dim, dtype, device)
            return self._run(curvature, g0, before, warming, available)

    def _run(
        self,
        curvature: StepCurvature,
        g0: list[Tensor],
        before: tuple[int, ...],
        warming: bool,
        available: float,
    ) -> CurvatureEstimate:
        dim, dtype, device = _space(curvature.loss)
        exact, first_images, check_error = self._exact(), None, math.nan
        if warming:
            self.top.randomize(dim, dtype, device)
        elif self.products == "auto" and self.second_order:
            self.steps_since_check += 1
            if self.steps_since_check >= self.recheck_after:
                first_images, exact, check_error = self._check(curvature, g0)
        if not exact and not self._representable(curvature, self.top._warm(dim, dtype, device)):
            # θ + Δq·u rounds the perturbation away (huge weights): a finite difference would measure
            # rounding, not curvature
            if not (self.products == "auto" and self.second_order):
                return CurvatureEstimate(valid=False)
            self.scale.exact = exact = True
        tol = self.warmup_tol if warming else self.tol
        if warming:
            budget = own = self.warmup_iters
        else:
            spent = self._spent(curvature, before)
            budget = self._max_products(curvature, self.top, exact, available, spent)
            # a routine gradient check spends only the step's own budget, never what earlier steps saved
            own = self._max_products(curvature, self.top, exact, self.budget, spent)
        apply = self._products(curvature, g0, exact)
        # the check costs GRADIENT_START_DEPTH products: with exact ones (about two gradients each) it would
        # take the budget of the residual extensions (measured in benchmarks/README.md)
        check = self.gradient_start and not exact and budget >= self.top.block + GRADIENT_START_DEPTH
        starts = flatten(g0) if check else None
        top = self.top.step(
            apply,
            dim,
            dtype=dtype,
            device=device,
            max_products=budget,
            tol=tol,
            first_images=first_images,
            starts=starts,
            start_depth=GRADIENT_START_DEPTH,
            starts_limit=own,
        )
        if not top.valid:
            self.needs_warmup = self.warmup_iters > 0
            return CurvatureEstimate(valid=False)
        ritz = top.ritz_values.tolist()
        estimate = CurvatureEstimate(
            valid=True,
            converged=top.converged,
            h0=ritz[0],
            h0_lyapunov=top.lyapunov.tolist()[0],
            h0_residual=top.residuals.tolist()[0],
            lyapunov_exponent=top.exponents.tolist()[0],
            beta=top.beta,
            fluctuation=self.top.fluctuation,
            top=ritz,
            num_products=top.num_products,
            exact_products=exact,
            delta_q=math.nan if exact else self._separation(curvature),
            delta_q_error=check_error,
            warmup_products=top.num_products if warming else 0,
        )
        self.h0_scale = abs(estimate.h0)
        if self.negative is not None:
            if warming:
                self.negative.randomize(dim, dtype, device)

            def negated(block: Tensor) -> Tensor:
                return -apply(block)

            if not warming:
                spent = self._spent(curvature, before)
                budget = self._max_products(curvature, self.negative, exact, available, spent)
            low = self.negative.step(negated, dim, dtype=dtype, device=device, max_products=budget, tol=tol)
            if not low.valid:
                self.needs_warmup = self.warmup_iters > 0
                return CurvatureEstimate(valid=False)
            estimate.h_min = -float(low.ritz_values[0])
            estimate.converged = estimate.converged and low.converged
            estimate.num_products += low.num_products
            estimate.warmup_products += low.num_products if warming else 0
        if warming and exact and self.products == "auto":
            assert top.vectors is not None and top.images is not None
            self._calibrate(curvature, g0, top.vectors[:, 0], top.images[:, 0])
            estimate.delta_q_error = self.scale.error
        if not warming:
            self.credit = available - self._spent(curvature, before)
        self.needs_warmup = False
        return estimate

    def _check(self, curvature: StepCurvature, g0: list[Tensor]) -> tuple[Tensor, bool, float]:
        """Re-check Δq along the warm direction and a random one; returns the step's first images.

        The exact product of the warm direction serves as the step's first product (it is exact and
        already paid for); the finite difference at the kept Δq is compared with it.
        """
        self.steps_since_check = 0
        setting = (self.scale.delta_q, self.scale.exact)
        warm = self.top._warm(*_space(curvature.loss))
        randoms = [self._random_direction(curvature.loss).unsqueeze(1) for _ in range(CHECK_DIRECTIONS)]
        directions = torch.cat([warm, *randoms], dim=1)
        images = curvature.hessian().matmat(directions)
        scale = max(abs(float(directions[:, 0] @ images[:, 0])), self.h0_scale)
        probes = [
            self._probe(curvature, g0, directions[:, i], images[:, i], scale)
            for i in [0, *range(self.top.block, directions.shape[1])]
        ]
        self.scale.calibrate(probes)
        # a check costs about three steps' budget and starves the steps after it: while checks confirm the
        # setting they back off (measured in benchmarks/README.md)
        kept = (self.scale.delta_q, self.scale.exact) == setting
        limit = MAX_CHECK_BACKOFF * self.check_every
        self.recheck_after = min(2 * self.recheck_after, limit) if kept else self.check_every
        return images[:, : self.top.block], self.scale.exact, self.scale.error

    def _calibrate(self, curvature: StepCurvature, g0: list[Tensor], vector: Tensor, image: Tensor) -> None:
        """Choose Δq after the warm-up: along its top Ritz vector (exact image known) and random ones."""
        directions = torch.stack(
            [self._random_direction(curvature.loss) for _ in range(CALIBRATION_DIRECTIONS)], dim=1
        )
        images = curvature.hessian().matmat_chunked(directions, _CHUNK)
        probes = [self._probe(curvature, g0, vector, image, self.h0_scale)] + [
            self._probe(curvature, g0, directions[:, i], images[:, i], self.h0_scale)
            for i in range(CALIBRATION_DIRECTIONS)
        ]
        self.scale.calibrate(probes)
        self.steps_since_check = 0
        self.recheck_after = self.check_every

    def state_dict(self) -> dict[str, Any]:
        """State of both iterations, of the Δq control, of the credit and of the schedule."""
        return {
            "top": self.top.state_dict(),
            "negative": None if self.negative is None else self.negative.state_dict(),
            "scale": self.scale.state_dict(),
            "needs_warmup": self.needs_warmup,
            "steps_since_check": self.steps_since_check,
            "recheck_after": self.recheck_after,
            "credit": self.credit,
            "h0_scale": self.h0_scale,
            "second_order": self.second_order,
            "probe_generator": self._probe_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.top.load_state_dict(state["top"])
        if self.negative is not None and state["negative"] is not None:
            self.negative.load_state_dict(state["negative"])
        self.scale.load_state_dict(state["scale"])
        self.needs_warmup = bool(state["needs_warmup"])
        self.steps_since_check = int(state["steps_since_check"])
        self.recheck_after = int(state["recheck_after"])
        self.credit = float(state["credit"])
        self.h0_scale = float(state["h0_scale"])
        self.second_order = bool(state["second_order"])
        self._probe_generator.set_state(state["probe_generator"])
