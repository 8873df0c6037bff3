"""CGDCurvature: hands every CGD optimizer the Hessian of its step's batch, and logs what CGD removed."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_chaos.callbacks._base import ProbeCallback, log_values
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.optim import CGD


class CGDCurvature(ProbeCallback):
    """Feed :class:`~lightning_chaos.CGD` the curvature of each training step (needed by CGD in Lightning).

    In ``on_before_optimizer_step`` (inside ``CGD.step``'s closure, after the backward pass, before the base
    optimizer moves θ) it passes the trainer's shared curvature of the step (a
    :class:`~lightning_chaos.core.step_curvature.StepCurvature`) to the CGD being stepped. CGD computes the
    eigendirections from it only on its refresh steps, so the callback costs nothing on the others, and
    the exact eigendecomposition is shared with any other chaos callback of the step (e.g.
    ``LyapunovSpectrumMonitor``) and DDP-averaged. The loss is ``curvature_loss(batch)`` when the
    module defines it, else ``training_step`` with logging muted (see ``HessianEigenvalueMonitor``); with
    gradient accumulation it is the last micro-batch's.

    Logged after every CGD step (``log_prefix`` + key, at the step of that batch's ``train/loss``; a suffix
    ``_{i}`` for the i-th optimizer when there are several):

    - ``cgd_removed``: number of eigendirections removed from the update;
    - ``cgd_update_ratio``: ``‖PΔθ‖ / ‖Δθ‖``, the share of the base update that was kept.

    Args:
        log_prefix: prefix of the logged keys.

    Without a CGD among the Trainer's optimizers it warns at fit start and does nothing (so one config can
    list it for runs with and without CGD).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_chaos import CGDCurvature
        >>> trainer = pl.Trainer(callbacks=[CGDCurvature()], logger=False, enable_checkpointing=False)
    """

    def __init__(self, log_prefix: str = "chaos/") -> None:
        self.log_prefix = log_prefix
        self._seen_steps: dict[int, int] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Require a CGD optimizer and write the TensorBoard layout."""
        if not any(isinstance(opt, CGD) for opt in trainer.optimizers):
            names = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or "none"
            rank_zero_warn(
                f"CGDCurvature found no CGD optimizer (optimizers: {names}) and does nothing; return "
                "lightning_chaos.CGD(torch.optim.SGD(self.parameters(), lr=...)) from configure_optimizers."
            )
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the step counters (a resumed CGD starts from its checkpointed count)."""
        self._seen_steps = {
            i: opt.num_steps for i, opt in enumerate(trainer.optimizers) if isinstance(opt, CGD)
        }

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Hand the CGD being stepped the curvature of this step's batch."""
        if isinstance(optimizer, CGD):
            optimizer.set_curvature(step_curvature(trainer, pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log what each CGD that stepped on this batch removed."""
        for i, opt in enumerate(trainer.optimizers):
            if not isinstance(opt, CGD) or opt.num_steps == self._seen_steps.get(i):
                continue
            self._seen_steps[i] = opt.num_steps
            suffix = f"_{i}" if i else ""
            values = {
                f"cgd_removed{suffix}": opt.last_removed,
                f"cgd_update_ratio{suffix}": opt.last_update_ratio,
            }
            log_values(trainer, values, self.log_prefix)
