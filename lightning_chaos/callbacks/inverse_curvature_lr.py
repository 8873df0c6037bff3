"""InverseCurvatureLR: the quasi-Newton learning rate ``lr = scale / h0`` of the ICLR 2021 submission."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer
from typing_extensions import override

from lightning_chaos.callbacks._base import ProbeCallback, log_values
from lightning_chaos.callbacks._checks import check_sgd, choice_arg, int_arg, number_arg
from lightning_chaos.callbacks.hessian_eigenvalue import HessianEigenvalueMonitor
from lightning_chaos.core.controlled_lyapunov import Products


class InverseCurvatureLR(ProbeCallback):
    r"""Set every param group's learning rate to ``scale / h0`` each step (§3.1 of the ICLR submission).

    The curvature comes from the :class:`HessianEigenvalueMonitor` in the same Trainer when there is one
    (no second probe per step; its settings then apply and the monitor arguments here are ignored),
    otherwise from a monitor this callback owns, built from the monitor arguments below. In both cases
    the first step runs the monitor's warm-up at the initial point, so step 1 already trains with a
    curvature-based learning rate.

    Each computed step, in ``on_before_optimizer_step`` (so the rate applies to this step's update):

    .. math:: \bar h_t = \text{ema}\,\bar h_{t-1} + (1 - \text{ema})\,h_{0,t}, \qquad
              \text{lr}_t = \operatorname{clamp}(\text{scale} / \bar h_t,\ \text{lr\_min},\ \text{lr\_max})

    (``h̄`` starts at the first estimate it uses). Converged estimates (``chaos/h0_converged = 1``, see
    :class:`HessianEigenvalueMonitor`) are always used. An unconverged h0 is a Ritz value of too small a
    Krylov space: a lower bound of h0 for exact products, typically too low otherwise. It is used only
    when it exceeds the average, i.e. it may lower the rate (the curvature rose at least that much) but
    never raise it. Other unconverged, skipped and non-computed steps keep the previous rate (counted as
    ``lr_held_steps``); before the first converged estimate the optimizer's own rate is used.
    ``use_unconverged=True`` uses every valid estimate instead (the paper's rule).

    Only ``torch.optim.SGD`` is supported (``MisconfigurationException`` at fit start otherwise): ``1/h0``
    is the Newton step of the SGD update; an adaptive optimizer such as Adam preconditions the update,
    and its rate would need the curvature of the preconditioned Hessian.

    What ``scale`` means: on a quadratic, gradient descent with ``lr = 1/h0`` is Newton's step along the
    top eigenvector and ``lr < 2/h0`` is the stability limit. ``scale=1`` (default) is the paper's rule
    with the *accurate* estimate of h0. The paper's implementation reported ``1/β`` as h0, which at the
    controlled point is ``h0/(e − 1)``, so its learning rate was effectively ``(e − 1)/h0 ≈ 1.72/h0``:
    use ``scale=math.e - 1`` to reproduce that behaviour.

    Learning-rate schedulers: this callback owns the learning rate, so configuring a Lightning LR
    scheduler as well is an error (a step scheduler would rescale the rate after every update and the
    two would fight silently). ``LearningRateMonitor`` reads ``param_groups`` at the start of the next
    batch, so its curve is ``chaos/lr`` shifted by one step.

    Logged every computed step: ``lr`` (the rate this step's update uses, once one was set),
    ``h0_ema`` and ``lr_held_steps``.

    Args:
        scale: numerator of the rule, > 0.
        ema: decay of the exponential moving average of h0, in ``[0, 1)`` (0: no averaging).
        lr_min: lower clamp of the rate, >= 0.
        lr_max: upper clamp of the rate, > 0 (``inf``: none).
        estimator: which estimate drives the rate: ``"ritz"`` (the top Ritz value, logged as ``h0``) or
            ``"lyapunov"`` (``(e^λ − 1)/β`` of the step's first iteration, logged as ``h0_lyapunov``).
        use_unconverged: act on unconverged estimates in both directions.
        every_n_steps: owned monitor only, see :class:`HessianEigenvalueMonitor`.
        n_iter: owned monitor only.
        products: owned monitor only.
        delta_q: owned monitor only.
        warmup_iters: owned monitor only (must be > 0: the warm start is the point of this callback).
        seed: owned monitor only.
        log_prefix: prefix of the logged keys (and of the owned monitor's).

    Attributes:
        monitor: the monitor the curvature comes from (``None`` before ``setup``).
        h0_ema: the moving average of h0 (``None`` before the first estimate used).
        lr: the rate set last (``None`` before).
        held_steps: computed steps on which the rate was kept.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_chaos import InverseCurvatureLR
        >>> trainer = pl.Trainer(callbacks=[InverseCurvatureLR(lr_max=1.0)], logger=False)
    """

    def __init__(
        self,
        scale: float = 1.0,
        ema: float = 0.9,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        estimator: str = "ritz",
        use_unconverged: bool = False,
        every_n_steps: int = 1,
        n_iter: int = 4,
        products: Products = "auto",
        delta_q: float = 5e-2,
        warmup_iters: int = 100,
        seed: int = 0,
        log_prefix: str = "chaos/",
    ) -> None:
        self.scale = number_arg("scale", scale, 0.0, low_open=True, high_open=True)
        self.ema = number_arg("ema", ema, 0.0, 1.0, high_open=True)
        self.lr_min = number_arg("lr_min", lr_min, 0.0, high_open=True)
        self.lr_max = number_arg("lr_max", lr_max, 0.0, low_open=True)
        if self.lr_max < self.lr_min:
            raise MisconfigurationException(f"`lr_max` ({lr_max}) must be >= `lr_min` ({lr_min}).")
        self.estimator = choice_arg("estimator", estimator, ("ritz", "lyapunov"))
        self.use_unconverged = bool(use_unconverged)
        self.log_prefix = log_prefix
        self._own_monitor = HessianEigenvalueMonitor(
            every_n_steps=every_n_steps,
            n_iter=n_iter,
            products=products,
            delta_q=delta_q,
            warmup_iters=int_arg("warmup_iters", warmup_iters),
            seed=seed,
            log_prefix=log_prefix,
        )
        self.monitor: HessianEigenvalueMonitor | None = None
        self.h0_ema: float | None = None
        self.lr: float | None = None
        self.held_steps = 0

    @property
    def owns_monitor(self) -> bool:
        """Whether the curvature comes from this callback's own monitor (none in the Trainer)."""
        return self.monitor is self._own_monitor

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the Trainer's HessianEigenvalueMonitor, or fall back to an owned one."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        shared = [c for c in callbacks if isinstance(c, HessianEigenvalueMonitor)]
        self.monitor = shared[0] if shared else self._own_monitor
        if self.owns_monitor:
            self.monitor.setup(trainer, pl_module, stage)  # the owned monitor is not in trainer.callbacks
        elif self.monitor.warmup_iters == 0:
            rank_zero_warn(
                "InverseCurvatureLR reads a HessianEigenvalueMonitor with warmup_iters=0: the first learning "
                "rates come from a cold, unaligned estimate."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse optimizers other than SGD and an LR scheduler; write the TensorBoard layout."""
        check_sgd(trainer, type(self).__name__)
        super().on_fit_start(trainer, pl_module)
        if trainer.lr_scheduler_configs:
            raise MisconfigurationException(
                "InverseCurvatureLR sets the learning rate itself at every step; remove the LR scheduler "
                "returned by `configure_optimizers` (or drop InverseCurvatureLR)."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Update the average curvature and write the learning rate this step's update will use."""
        assert self.monitor is not None
        estimate = self.monitor.estimate(trainer, pl_module)
        if estimate is None:
            return
        h0 = estimate.h0 if self.estimator == "ritz" else estimate.h0_lyapunov
        usable = estimate.valid and math.isfinite(h0) and h0 > 0
        if usable and not (estimate.converged or self.use_unconverged):
            # an unconverged Ritz value is (for exact products) a lower bound of h0: it may only say that
            # the curvature rose above the average, never that it fell
            usable = self.h0_ema is not None and h0 > self.h0_ema
        if usable:
            self.h0_ema = h0 if self.h0_ema is None else self.ema * self.h0_ema + (1 - self.ema) * h0
            self.lr = min(max(self.scale / self.h0_ema, self.lr_min), self.lr_max)
            for group in optimizer.param_groups:
                group["lr"] = self.lr
        else:
            self.held_steps += 1
        values: dict[str, float | None] = {
            "lr": self.lr,
            "h0_ema": self.h0_ema,
            "lr_held_steps": self.held_steps,
        }
        log_values(trainer, values, self.log_prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The average, the rate and, when owned, the monitor's state."""
        return {
            "h0_ema": self.h0_ema,
            "lr": self.lr,
            "held_steps": self.held_steps,
            "monitor": self._own_monitor.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.h0_ema = state_dict["h0_ema"]
        self.lr = state_dict["lr"]
        self.held_steps = int(state_dict["held_steps"])
        self._own_monitor.load_state_dict(state_dict["monitor"])
