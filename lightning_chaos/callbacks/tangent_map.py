"""TangentMapMonitor: the accumulated tangent map of the SGD run and its finite-time Lyapunov exponents."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_chaos.callbacks._base import SKIPPED, ProbeCallback, log_values
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.callbacks._checks import check_sgd, int_arg, sgd_of
from lightning_chaos.core.benettin import FiniteTimeLyapunov
from lightning_chaos.core.lanczos import lanczos
from lightning_chaos.core.sgd import sgd_first_step
from lightning_chaos.core.stability import local_lyapunov_exponents, log_tangent_map_norm
from lightning_chaos.core.step_curvature import StepCurvature
from lightning_chaos.core.tangent_map import apply_tangent_map

DEFAULT_COLUMNS = 10
"""Tangent directions followed when the model is too large for the full map and ``num_columns`` is None."""


class TangentMapMonitor(ProbeCallback):
    r"""Accumulate the tangent map of the SGD run and log its finite-time Lyapunov exponents.

    The tangent map of T steps is the product :math:`Y_T = J_T \cdots J_1` of the one-step maps of the
    update ``torch.optim.SGD`` actually performs (:mod:`lightning_chaos.core.tangent_map`):
    :math:`J_t = I - \gamma (H_t + \mathrm{wd}\,I)` for plain SGD, the :math:`2N \times 2N` map on
    :math:`(\delta\theta, \delta v)` with momentum, dampening or Nesterov (torch's first momentum step,
    which creates the buffer without dampening, gets its own map). :math:`H_t` is the exact Hessian of
    step t's batch at :math:`\theta_t`, taken in ``on_before_optimizer_step`` before the optimizer moves θ
    (shared with the other callbacks of the step, DDP-averaged); γ, μ, τ and wd are read from the
    optimizer at that moment, so schedulers are followed.

    The product is not formed (it over/underflows within a few hundred steps); Benettin's method carries
    an orthonormal frame :math:`Q` instead: :math:`J_t Q = Q' R_t`, and the finite-time Lyapunov
    exponents are :math:`\mathrm{ftle}_i = \frac{1}{T}\sum_t \log R_{t,ii}`, which equal
    :math:`\frac{1}{T}\log|R_{ii}|` of the QR factorisation of :math:`Y_T Q_0` and converge to the
    Lyapunov spectrum. The frame starts in the parameter directions: :math:`Q_0 = I_N` (full map) or N × k
    random orthonormal columns, with :math:`\delta v = 0` under momentum (the buffer is not a free initial
    condition).

    - Full map (N ≤ ``max_full_params`` and ``num_columns`` None): dense Hessian each step (N exact
      Hessian-vector products), all N exponents; cost per step O(N³) (dense Hessian, ``eigvalsh``, a
      product and a QR of (2)N × N).
    - k columns (larger N, or ``num_columns=k``): k batched exact Hessian-vector products per step plus
      a Lanczos run of ``lanczos_steps`` products for the extreme eigenvalues the bound needs.

    Logged under ``log_prefix`` every optimizer step:

    - ``ftle_{i}`` for ``i < num_exponents``: the largest finite-time exponents, descending;
      ``ftle_min``: the smallest one (full map only: with k columns it is not the system's smallest;
      with momentum the N parameter directions converge to the N largest of the 2N exponents);
    - ``mlce``: the finite-time maximal Lyapunov characteristic exponent (``ftle_0``);
    - ``mlce_bound``: :math:`\frac{1}{T}\sum_t \log\lVert J_t\rVert_2` (exact from the eigenvalues of
      :math:`H_t`, :func:`~lightning_chaos.core.stability.log_tangent_map_norm`), which bounds ``mlce`` at
      every T by submultiplicativity; for plain SGD :math:`\log\lVert J_t\rVert` is the step's largest
      LLE, so this is the running mean of the per-step max LLE that Herrmann, Granz and Landgraf
      ("Chaotic Dynamics are Intrinsic to Neural Network Training with SGD", NeurIPS 2022) use as the
      bound;
    - ``lle_max_mean``: the running mean of the per-step largest LLE (log spectral radius). Equal to
      ``mlce_bound`` without momentum; with momentum :math:`J_t` is not normal and only the norm bounds;
    - ``map_log_norm``: this step's :math:`\log\lVert J_t\rVert_2`;
    - ``tangent_steps``: T, the number of maps accumulated; ``tangent_skipped``: steps left out of the
      product because their Hessian (or the mapped frame) was not finite, the ``training_step`` returned
      ``None`` or the model has no second-order derivative (the reason is warned once). The exponents
      then describe the product of the remaining steps.

    With ``num_columns`` the extremes of :math:`H_t` come from Lanczos (converging from inside the
    spectrum), so ``mlce_bound`` is then as accurate as those Ritz values.

    The map is that of the update on the full batch: gradient accumulation and gradient clipping change
    the update and are refused (``MisconfigurationException``), as are optimizers other than one
    ``torch.optim.SGD`` with shared hyper-parameters. Training is not changed by a single bit. The state
    (frame, sums, counters, generator) is saved in checkpoints; a resumed run logs what the
    uninterrupted one logs. The frame is (2)N × k float64.

    Args:
        num_columns: follow k tangent directions (k ≤ N); ``None``: the full map when N ≤
            ``max_full_params``, else :data:`~lightning_chaos.callbacks.tangent_map.DEFAULT_COLUMNS`
            (at least ``num_exponents``).
        max_full_params: largest N for which the full map is accumulated by default.
        num_exponents: number of exponents logged as ``ftle_{i}``.
        lanczos_steps: Lanczos steps for the extreme eigenvalues of each step (k-column mode).
        seed: seed of the private generator (random frame, Lanczos start vectors).
        log_prefix: prefix of the logged keys.

    Attributes:
        lyapunov: the :class:`~lightning_chaos.core.benettin.FiniteTimeLyapunov` accumulator (``None``
            before the first step).
        full: whether the full map is accumulated (``None`` before the first step).
        skipped_steps: steps left out of the product.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_chaos import TangentMapMonitor
        >>> trainer = pl.Trainer(callbacks=[TangentMapMonitor(num_columns=4)], logger=False)
    """

    def __init__(
        self,
        num_columns: int | None = None,
        max_full_params: int = 1000,
        num_exponents: int = 5,
        lanczos_steps: int = 40,
        seed: int = 0,
        log_prefix: str = "chaos/",
    ) -> None:
        self.num_columns = None if num_columns is None else int_arg("num_columns", num_columns)
        self.max_full_params = int_arg("max_full_params", max_full_params)
        self.num_exponents = int_arg("num_exponents", num_exponents)
        self.lanczos_steps = int_arg("lanczos_steps", lanczos_steps, minimum=2)
        self.seed = int(seed)
        self.log_prefix = log_prefix
        self.generator = torch.Generator().manual_seed(self.seed)
        self.lyapunov: FiniteTimeLyapunov | None = None
        self.full: bool | None = None
        self.skipped_steps = 0
        self._momentum: bool | None = None
        self._lle_max_sum = 0.0
        self._stashed: dict[str, Any] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reject set-ups whose update is not the SGD map of the probed batch."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        owner = type(self).__name__
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"{owner}: with accumulate_grad_batches={trainer.accumulate_grad_batches} the update "
                "uses the Hessian of several micro-batches; the tangent map of one batch would be wrong."
            )
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"{owner}: gradient clipping changes the update and its tangent map; "
                "remove gradient_clip_val."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer (one ``torch.optim.SGD``) and write the TensorBoard layout."""
        check_sgd(trainer, type(self).__name__)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Apply this step's tangent map to the frame before the optimizer moves θ, and log."""
        sgd = sgd_of(optimizer, type(self).__name__)
        if sgd_first_step(optimizer):
            sgd = sgd.at_first_step()
        curvature = step_curvature(trainer, pl_module)
        lyapunov = self._accumulator(curvature, sgd.momentum > 0)
        values: dict[str, float | None] = {}
        try:
            extremes, hvp = self._curvature(curvature)
            lyapunov.update(lambda y: apply_tangent_map(hvp, y, sgd))
        except SKIPPED as err:
            self.skip(trainer, err)
        else:
            map_norm = log_tangent_map_norm(extremes, sgd)
            self._lle_max_sum += float(local_lyapunov_exponents(extremes, sgd).max())
            lyapunov.record_log_norm(map_norm)
            values.update(self._exponents(lyapunov), map_log_norm=map_norm)
        values.update(tangent_steps=lyapunov.num_steps, tangent_skipped=self.skipped_steps)
        log_values(trainer, values, self.log_prefix)

    def _accumulator(self, curvature: StepCurvature, momentum: bool) -> FiniteTimeLyapunov:
        """The Benettin accumulator, created at the first step (or from a checkpoint's stashed state)."""
        if self.lyapunov is None:
            dim = curvature.loss.dim
            self.full = self.num_columns is None and dim <= self.max_full_params
            k = dim if self.full else min(dim, self.num_columns or max(DEFAULT_COLUMNS, self.num_exponents))
            if self._stashed is not None:  # the checkpoint's frame replaces this one: draw nothing
                frame = torch.eye(dim, k, dtype=torch.float64)
            elif self.full:
                frame = torch.eye(dim, dtype=torch.float64)
            else:
                frame = torch.linalg.qr(torch.randn(dim, k, generator=self.generator, dtype=torch.float64)).Q
            if momentum:  # perturbations of θ only: the buffer starts from the optimizer's own value
                frame = torch.cat([frame, torch.zeros_like(frame)], dim=0)
            self._momentum = momentum
            self.lyapunov = FiniteTimeLyapunov(
                frame.shape[0], k, initial_frame=frame.to(curvature.loss.params[0].device)
            )
            if self._stashed is not None:
                self.lyapunov.load_state_dict(self._stashed)  # checks the shape (N, 2N, k)
                self._stashed = None
        if momentum != self._momentum:
            raise MisconfigurationException(
                f"{type(self).__name__}: momentum was switched on or off during training; the tangent "
                "space changes dimension (N vs 2N) and the accumulated map cannot continue."
            )
        return self.lyapunov

    def _curvature(self, curvature: StepCurvature) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Eigenvalues that decide ``‖J_t‖`` and the (float64) Hessian product of the step.

        Raises:
            FloatingPointError: the Hessian (or its extreme eigenvalues) is not finite.
        """
        if self.full:
            dense = curvature.dense()
            if not torch.isfinite(dense).all():
                raise FloatingPointError("the batch Hessian is not finite")
            eigenvalues = curvature.eigvalsh().to(torch.float64)
            return eigenvalues, dense.to(torch.float64).__matmul__
        operator = curvature.hessian()
        steps = min(self.lanczos_steps, operator.shape[0])
        ritz, _ = lanczos(operator, steps, generator=self.generator).ritz_pairs(1, "both")
        if not torch.isfinite(ritz).all():
            raise FloatingPointError("the extreme eigenvalues of the batch Hessian are not finite")

        def hvp(block: Tensor) -> Tensor:
            return operator.matmat(block.to(operator.dtype)).to(torch.float64)

        return ritz.to(torch.float64), hvp

    def _exponents(self, lyapunov: FiniteTimeLyapunov) -> dict[str, float]:
        exponents = lyapunov.exponents()
        values = {f"ftle_{i}": float(x) for i, x in enumerate(exponents[: self.num_exponents])}
        if self.full:
            values["ftle_min"] = float(exponents[-1])
        values.update(
            mlce=float(exponents[0]),
            mlce_bound=lyapunov.mlce_bound(),
            lle_max_mean=self._lle_max_sum / lyapunov.num_steps,
        )
        return values

    @override
    def state_dict(self) -> dict[str, Any]:
        """Frame, accumulated sums, counters and generator: a resumed run continues the same product."""
        return {
            "lyapunov": None if self.lyapunov is None else self.lyapunov.state_dict(),
            "lle_max_sum": self._lle_max_sum,
            "skipped_steps": self.skipped_steps,
            "generator": self.generator.get_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the accumulator is rebuilt at the next step)."""
        self._stashed = state_dict["lyapunov"]
        self.lyapunov = None
        self._lle_max_sum = float(state_dict["lle_max_sum"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.generator.set_state(state_dict["generator"])
