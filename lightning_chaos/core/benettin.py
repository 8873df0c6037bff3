"""Finite-time Lyapunov exponents of a product of tangent maps, by Benettin's QR method.

Benettin, Galgani, Giorgilli and Strelcyn, "Lyapunov characteristic exponents for smooth dynamical systems
and for Hamiltonian systems; a method for computing all of them", Meccanica 15 (1980). An orthonormal frame
``Q`` is pushed through each step's map ``J_t`` and re-orthonormalised, ``J_t Q = Q' R_t``; the exponents are
the time averages of ``log R_t,ii``. The same sign-fixed QR (:func:`positive_qr`) re-orthonormalises the
direction block of the controlled Lyapunov iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["FiniteTimeLyapunov", "positive_qr"]


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

    The bound ``mLCE ≤ (1/T) Σ_t log ‖J_t‖₂`` (submultiplicativity of the norm) is tracked by feeding each
    step's log map norm to :meth:`record_log_norm`.

    Example:
        >>> lyapunov = FiniteTimeLyapunov(2, dtype=torch.float64)
        >>> for _ in range(3):
        ...     _ = lyapunov.update(torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64)))
        >>> lyapunov.exponents().exp()
        tensor([2.0000, 0.5000], dtype=torch.float64)
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
        self._q = positive_qr(frame)[0]
        self._log_r_sum = torch.zeros(k, dtype=torch.float64, device=self._q.device)
        self._num_steps = 0
        self._log_norm_sum = 0.0
        self._num_norms = 0

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
        q, r_diag = positive_qr(mapped.to(self._q.dtype))
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

    def record_log_norm(self, log_norm: float) -> None:
        """Record one step's ``log ‖J_t‖₂`` for :meth:`mlce_bound`.

        For plain SGD (``J_t`` symmetric) it is the step's largest local Lyapunov exponent; with momentum
        ``J_t`` is not normal and the norm exceeds it: use
        :func:`~lightning_chaos.core.stability.log_tangent_map_norm`.
        """
        self._log_norm_sum += float(log_norm)
        self._num_norms += 1

    def mlce_bound(self) -> float:
        """Upper bound on the mLCE: the time average of the recorded per-step ``log ‖J_t‖₂``."""
        if self._num_norms == 0:
            raise RuntimeError("no per-step log map norm has been recorded yet")
        return self._log_norm_sum / self._num_norms

    def state_dict(self) -> dict[str, Any]:
        """Frame, accumulated logs and counters; :meth:`load_state_dict` continues exactly from them."""
        return {
            "frame": self._q.clone(),
            "log_r_sum": self._log_r_sum.clone(),
            "num_steps": self._num_steps,
            "log_norm_sum": self._log_norm_sum,
            "num_norms": self._num_norms,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors are moved to this accumulator's device and dtype)."""
        frame = state["frame"]
        if tuple(frame.shape) != (self.dim, self.k):
            raise ValueError(f"state frame has shape {tuple(frame.shape)}, expected {(self.dim, self.k)}")
        self._q = frame.to(dtype=self._q.dtype, device=self._q.device).clone()
        self._log_r_sum = state["log_r_sum"].to(dtype=torch.float64, device=self._q.device).clone()
        self._num_steps = int(state["num_steps"])
        self._log_norm_sum = float(state["log_norm_sum"])
        self._num_norms = int(state["num_norms"])


def positive_qr(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR with ``R_ii ≥ 0``: returns ``Q`` ``(n, k)`` and ``|diag R|`` ``(k,)``."""
    q, r = torch.linalg.qr(matrix)
    diag = torch.diagonal(r)
    sign = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    return q * sign, diag.abs()
