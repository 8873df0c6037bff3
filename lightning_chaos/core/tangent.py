"""Tangent maps of the update ``torch.optim.SGD`` performs, and finite-time Lyapunov exponents.

The update (``torch.optim.SGD``, ``maximize=False``), with ``g̃ = ∇L(θ) + wd·θ`` and buffer ``v``::

    v' = μ v + (1 − τ) g̃                     (first step: v' = g̃, see below)
    θ' = θ − γ v'                             (heavy ball)
    θ' = θ − γ (g̃ + μ v')                     (nesterov)

Differentiating with ``H̃ = H + wd·I`` gives the one-step tangent map on ``(δθ, δv)`` (seed 001, A.1 for
μ = 0; the buffer is part of the state as soon as μ > 0)::

    μ = 0:      J = I − γ H̃                                            (N × N; τ and the buffer unused)
    heavy ball: J = [[I − γ(1 − τ) H̃, −γ μ I], [(1 − τ) H̃, μ I]]       (2N × 2N)
    nesterov:   J = [[I − γ(1 + μ) H̃, −γ μ² I], [H̃, μ I]]             (2N × 2N, τ = 0 as torch requires)

torch initialises the buffer on the very first step to ``g̃`` itself, *without* dampening. That step is the
update above with ``v = 0`` and ``τ = 0``, so its map is the τ = 0 map (``first_step=True``). Every later
step uses the steady-state map with the configured τ; that is the map the local Lyapunov exponents of
:mod:`lightning_chaos.core.spectrum` describe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FiniteTimeLyapunov",
    "SGDHyperparameters",
    "apply_tangent_map",
    "sgd_first_step",
    "sgd_hyperparameters",
    "sgd_tangent_map",
    "validate_sgd_hyperparameters",
]


def validate_sgd_hyperparameters(
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """Reject SGD hyper-parameters for which the tangent-map formulas of this package do not hold.

    Mirrors the checks of ``torch.optim.SGD`` (non-negative momentum and weight decay, Nesterov only with
    momentum > 0 and zero dampening) and additionally requires ``lr > 0``, ``momentum < 1`` (a buffer that
    does not decay has no stable curvature) and ``0 ≤ dampening ≤ 1``.

    Args:
        lr: learning rate γ.
        momentum: momentum μ.
        dampening: dampening τ.
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient wd folded into the gradient by the optimizer.

    Raises:
        ValueError: naming the offending argument.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must satisfy 0 <= momentum < 1, got {momentum!r}")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"dampening must satisfy 0 <= dampening <= 1, got {dampening!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0 (as in torch.optim.SGD)")


@dataclass(frozen=True)
class SGDHyperparameters:
    """The hyper-parameters that define the ``torch.optim.SGD`` update (module docstring) and its tangent map.

    Attributes:
        lr: learning rate γ.
        momentum: momentum μ.
        dampening: dampening τ (torch ignores it when μ = 0).
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient wd folded into the gradient (the map uses H + wd·I).
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        validate_sgd_hyperparameters(self.lr, self.momentum, self.dampening, self.nesterov, self.weight_decay)

    def map_kwargs(self) -> dict[str, Any]:
        """Keyword arguments after ``lr`` for the map functions of the core.

        ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay``, as taken by :func:`sgd_tangent_map`,
        :func:`apply_tangent_map` and ``local_lyapunov_exponents``/``classify_eigenvalues``/
        ``spectral_counts``/``stability_interval`` (the last without ``weight_decay``) of
        :mod:`lightning_chaos.core.spectrum`.
        """
        return {
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }


_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")


def sgd_hyperparameters(optimizer: torch.optim.Optimizer) -> SGDHyperparameters:
    """Read γ, μ, τ, Nesterov and weight decay from a ``torch.optim.SGD`` (its current param groups).

    The learning rate is read as it is *now*: call this right before ``optimizer.step()`` (e.g. in a
    callback's ``on_before_optimizer_step``) to get the rate of the coming update, after any scheduler or
    callback changed it.

    Args:
        optimizer: the optimizer.

    Returns:
        The shared hyper-parameters of all param groups.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.SGD`` (another optimizer, or a wrapper around one,
            performs another update with another tangent map).
        ValueError: ``maximize=True``; param groups with different hyper-parameters (the map is then
            ``I − Γ H`` with a non-scalar Γ, for which the per-eigenvalue formulas do not hold); values
            outside the range of :func:`validate_sgd_hyperparameters`.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(
            f"the SGD tangent map needs a torch.optim.SGD optimizer, got {type(optimizer).__name__}: "
            "other update rules (and wrappers that change the update) have other tangent maps"
        )
    groups = [g for g in optimizer.param_groups if g["params"]]
    if not groups:
        raise ValueError("the optimizer has no parameters")
    if any(g.get("maximize", False) for g in groups):
        raise ValueError("SGD with maximize=True is gradient ascent (tangent map I + γH): not supported")
    first = groups[0]
    for index, group in enumerate(groups[1:], start=1):
        different = [k for k in _SGD_KEYS if float(group[k]) != float(first[k])]
        if different:
            raise ValueError(
                f"param group {index} differs from group 0 in {', '.join(different)}: the tangent map of "
                "per-group hyper-parameters is not I − γH; use one set of SGD hyper-parameters"
            )
    lr = first["lr"]
    lr = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
    return SGDHyperparameters(
        lr=lr,
        momentum=float(first["momentum"]),
        dampening=float(first["dampening"]),
        nesterov=bool(first["nesterov"]),
        weight_decay=float(first["weight_decay"]),
    )


def sgd_first_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the coming ``step()`` of a ``torch.optim.SGD`` with momentum initialises the buffer.

    torch creates ``state[p]["momentum_buffer"]`` on a parameter's first update with ``v' = g̃`` (no
    dampening), which is the ``first_step=True`` map of :func:`sgd_tangent_map`. Without momentum there
    is no buffer and the answer is False (the map has no first-step variant).

    Args:
        optimizer: a ``torch.optim.SGD``.

    Returns:
        True if μ > 0 and some parameter of the optimizer has no momentum buffer yet.
    """
    return any(
        group["momentum"] != 0 and optimizer.state.get(p, {}).get("momentum_buffer") is None
        for group in optimizer.param_groups
        for p in group["params"]
    )


def sgd_tangent_map(
    hessian: Tensor,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    first_step: bool = False,
) -> Tensor:
    """Dense one-step tangent map of the ``torch.optim.SGD`` update (module docstring for the equations).

    Args:
        hessian: loss Hessian H, shape ``(N, N)`` (without weight decay; it is added here).
        lr: learning rate γ.
        momentum: momentum μ; with μ = 0 ``dampening`` is ignored, as torch ignores it.
        dampening: dampening τ of the steady-state buffer update.
        nesterov: Nesterov momentum.
        weight_decay: wd; the map uses H̃ = H + wd·I.
        first_step: the map of torch's first step (buffer initialised to g̃, i.e. τ = 0 and v = 0).

    Returns:
        ``(N, N)`` map ``I − γ H̃`` when μ = 0, else the ``(2N, 2N)`` map on ``(δθ, δv)``.
    """
    validate_sgd_hyperparameters(lr, momentum, dampening, nesterov, weight_decay)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (N, N), got shape {tuple(hessian.shape)}")
    n = hessian.shape[0]
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    h_eff = hessian + weight_decay * eye
    if momentum == 0:
        return eye - lr * h_eff
    tau = 0.0 if first_step else dampening
    if nesterov:
        blocks = [[eye - lr * (1 + momentum) * h_eff, -lr * momentum**2 * eye], [h_eff, momentum * eye]]
    else:
        c = 1.0 - tau
        blocks = [[eye - lr * c * h_eff, -lr * momentum * eye], [c * h_eff, momentum * eye]]
    return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)


def apply_tangent_map(
    hvp: Callable[[Tensor], Tensor],
    tangents: Tensor,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    first_step: bool = False,
) -> Tensor:
    """Apply the one-step SGD tangent map to a block of tangent vectors without forming it.

    The perturbation ``(δθ, δv)`` is pushed through the linearised update itself::

        δg = (H + wd·I) δθ;  δv' = μ δv + (1 − τ) δg;  δθ' = δθ − γ δv'  (nesterov: δθ − γ(δg + μ δv'))

    which equals ``sgd_tangent_map(H, ...) @ tangents`` at the cost of one Hessian-matrix product.

    Args:
        hvp: Hessian-matrix product of the loss (without weight decay), ``(N, k) → (N, k)``, e.g.
            ``HessianOperator.matmat``. Pass weight decay either here or in the operator, not both.
        tangents: ``(N, k)`` or ``(N,)`` when μ = 0; with μ > 0, ``(2N, k)`` or ``(2N,)`` stacking
            ``(δθ, δv)``.
        lr: learning rate γ.
        momentum: momentum μ.
        dampening: dampening τ (ignored when μ = 0, as in torch).
        nesterov: Nesterov momentum.
        weight_decay: wd.
        first_step: use the map of torch's first step (τ = 0).

    Returns:
        The mapped tangents, same shape as ``tangents``.
    """
    validate_sgd_hyperparameters(lr, momentum, dampening, nesterov, weight_decay)
    vector = tangents.ndim == 1
    y = tangents.unsqueeze(1) if vector else tangents
    if momentum == 0:
        d_theta, d_buf = y, None
    else:
        if y.shape[0] % 2:
            raise ValueError(f"with momentum the tangents stack (δθ, δv) and need 2N rows, got {y.shape[0]}")
        d_theta, d_buf = y.chunk(2, dim=0)
    d_grad = hvp(d_theta)
    if weight_decay:
        d_grad = d_grad + weight_decay * d_theta
    if d_buf is None:
        out = d_theta - lr * d_grad
    else:
        tau = 0.0 if first_step else dampening
        d_buf_new = momentum * d_buf + (1.0 - tau) * d_grad
        step = d_grad + momentum * d_buf_new if nesterov else d_buf_new
        out = torch.cat([d_theta - lr * step, d_buf_new], dim=0)
    return out.squeeze(1) if vector else out


class FiniteTimeLyapunov:
    """Finite-time Lyapunov spectrum of a product of tangent maps, by Benettin's QR method.

    Keeps an orthonormal frame ``Q`` (``dim × k``). Each :meth:`update` with the step map ``J_t`` computes
    ``J_t Q = Q' R``, keeps ``Q'`` (signs fixed so that ``R_ii ≥ 0``) and accumulates ``log R_ii``. After T
    steps, with ``Y_T = J_T ⋯ J_1``::

        exponents_i = (1/T) Σ_t log |R_t,ii| = (1/T) log |R_ii(Y_T Q_0)|

    (uniqueness of the QR factorisation), i.e. the growth rates of the nested volumes spanned by
    ``Y_T Q_0``; for ``k = dim`` and ``Q_0 = I`` these are the QR exponents of ``Y_T`` itself, and they
    converge to the Lyapunov spectrum as T → ∞. ``mlce`` is the largest one. A singular step map (an
    eigenvalue h = 1/γ exactly) gives ``-inf`` for the affected column, which is the exact finite-time value.

    The A.6 bound of seed 001, ``mLCE ≤ (1/T) Σ_t max_i LLE_i(t)``, is tracked by feeding each step's largest
    local Lyapunov exponent to :meth:`record_max_lle`.
    """

    def __init__(
        self,
        dim: int,
        k: int | None = None,
        *,
        initial_frame: Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Create the accumulator.

        Args:
            dim: dimension of the tangent space (N, or 2N with momentum).
            k: number of exponents; ``None`` for all ``dim``.
            initial_frame: ``(dim, k)`` starting directions (orthonormalised here). Default: the identity
                for ``k = dim``, a random orthonormal frame (Gaussian + QR, drawn with ``generator``) else.
            generator: random generator for the default frame when ``k < dim``.
            dtype: dtype of the frame (the step maps must accept it); default ``torch.get_default_dtype()``.
            device: device of the frame.
        """
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if initial_frame is not None:
            if initial_frame.ndim != 2 or initial_frame.shape[0] != dim:
                raise ValueError(f"initial_frame must have shape (dim, k), got {tuple(initial_frame.shape)}")
            k = initial_frame.shape[1] if k is None else k
            if initial_frame.shape[1] != k:
                raise ValueError(f"initial_frame has {initial_frame.shape[1]} columns but k={k}")
            dtype = initial_frame.dtype if dtype is None else dtype
            device = initial_frame.device if device is None else device
        k = dim if k is None else k
        if not 1 <= k <= dim:
            raise ValueError(f"k must satisfy 1 <= k <= dim={dim}, got {k}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if initial_frame is not None:
            frame = initial_frame.to(dtype=dtype, device=device)
        elif k == dim:
            frame = torch.eye(dim, dtype=dtype, device=device)
        else:
            gen_device = generator.device if generator is not None else device
            frame = torch.randn(dim, k, generator=generator, dtype=dtype, device=gen_device).to(device)
        self.dim = dim
        self.k = k
        self._q = _positive_qr(frame)[0]
        self._log_r_sum = torch.zeros(k, dtype=torch.float64, device=self._q.device)
        self._num_steps = 0
        self._lle_max_sum = 0.0
        self._num_lle = 0

    @property
    def frame(self) -> Tensor:
        """Current orthonormal frame ``Q``, shape ``(dim, k)``."""
        return self._q

    @property
    def num_steps(self) -> int:
        """Number of tangent maps accumulated so far (T)."""
        return self._num_steps

    def update(self, step_map: Tensor | Callable[[Tensor], Tensor]) -> Tensor:
        """Accumulate one step map ``J_t``.

        Args:
            step_map: dense ``(dim, dim)`` matrix, or a callable mapping the frame ``(dim, k) → (dim, k)``
                (e.g. ``lambda y: apply_tangent_map(op.matmat, y, lr)``).

        Returns:
            This step's ``log |R_ii|``, shape ``(k,)`` (float64), in frame-column order.

        Raises:
            FloatingPointError: the mapped frame is not finite (the state is left unchanged).
        """
        mapped = step_map @ self._q if isinstance(step_map, Tensor) else step_map(self._q)
        if mapped.shape != self._q.shape:
            raise ValueError(f"step map returned {tuple(mapped.shape)}, expected {tuple(self._q.shape)}")
        if not torch.isfinite(mapped).all():
            raise FloatingPointError("the tangent map produced non-finite values; step not accumulated")
        q, r_diag = _positive_qr(mapped.to(self._q.dtype))
        log_r = torch.log(r_diag.to(torch.float64))
        self._q = q
        self._log_r_sum += log_r
        self._num_steps += 1
        return log_r

    def exponents(self) -> Tensor:
        """Finite-time Lyapunov exponents ``(1/T) Σ_t log |R_t,ii|``, sorted descending, shape ``(k,)``."""
        if self._num_steps == 0:
            raise RuntimeError("no tangent map has been accumulated yet")
        return torch.sort(self._log_r_sum / self._num_steps, descending=True).values

    def mlce(self) -> float:
        """Finite-time maximal Lyapunov characteristic exponent (the largest of :meth:`exponents`)."""
        return float(self.exponents()[0])

    def record_max_lle(self, lle_max: float) -> None:
        """Record one step's largest local Lyapunov exponent ``max_i LLE_i(t)`` for :meth:`mlce_bound`.

        The bound needs ``log ‖J_t‖₂``, which equals the largest LLE for plain SGD (``J_t`` symmetric). With
        momentum ``J_t`` is not normal: record ``spectrum.log_tangent_map_norm(...)`` instead.
        """
        self._lle_max_sum += float(lle_max)
        self._num_lle += 1

    def mlce_bound(self) -> float:
        """Upper bound on the mLCE (seed 001, A.6): the time average of the recorded per-step max LLEs."""
        if self._num_lle == 0:
            raise RuntimeError("no per-step max LLE has been recorded yet")
        return self._lle_max_sum / self._num_lle

    def state_dict(self) -> dict[str, Any]:
        """Frame, accumulated logs and counters; :meth:`load_state_dict` continues exactly from them."""
        return {
            "frame": self._q.clone(),
            "log_r_sum": self._log_r_sum.clone(),
            "num_steps": self._num_steps,
            "lle_max_sum": self._lle_max_sum,
            "num_lle": self._num_lle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors are moved to this accumulator's device and dtype)."""
        frame = state["frame"]
        if tuple(frame.shape) != (self.dim, self.k):
            raise ValueError(f"state frame has shape {tuple(frame.shape)}, expected {(self.dim, self.k)}")
        self._q = frame.to(dtype=self._q.dtype, device=self._q.device).clone()
        self._log_r_sum = state["log_r_sum"].to(dtype=torch.float64, device=self._q.device).clone()
        self._num_steps = int(state["num_steps"])
        self._lle_max_sum = float(state["lle_max_sum"])
        self._num_lle = int(state["num_lle"])


def _positive_qr(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR with ``R_ii ≥ 0``: returns ``Q`` ``(n, k)`` and ``|diag R|`` ``(k,)``."""
    q, r = torch.linalg.qr(matrix)
    diag = torch.diagonal(r)
    sign = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    return q * sign, diag.abs()
