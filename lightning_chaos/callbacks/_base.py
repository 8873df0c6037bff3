"""The base of every callback that probes the training batch: batch record, logging, skipped steps.

A probing callback records the batch at ``on_train_batch_start``, writes the TensorBoard layout at fit
start, logs finite values only (:func:`log_values`), and turns what a probe legitimately cannot do on a
step (no loss: ``training_step`` returned ``None``; a non-finite Hessian; a second-order product the
model's operations do not support) into a skipped, counted step with the reason warned once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_chaos.callbacks._batch import record_batch
from lightning_chaos.callbacks._checks import check_supported
from lightning_chaos.core.functional_loss import NoLossError
from lightning_chaos.core.operators import SecondOrderError
from lightning_chaos.dashboards import write_layout

SKIPPED = (NoLossError, SecondOrderError, FloatingPointError, torch.linalg.LinAlgError)
"""What a probe cannot compute on a step, which skips (and counts) the step instead of failing the run."""


class ProbeCallback(Callback):
    """Base of the callbacks that probe the training batch.

    Subclasses set ``log_prefix`` (two instances of one class need different prefixes: they would write
    into the same logger keys) and call ``super()`` in ``setup`` and ``on_fit_start`` when they extend
    those hooks.

    Attributes:
        log_prefix: prefix of the logged keys.
        skipped_steps: steps on which the probe could not compute (see :data:`SKIPPED`).
    """

    log_prefix: str = "chaos/"
    skipped_steps: int = 0

    @property
    @override
    def state_key(self) -> str:
        """``ClassName{'log_prefix': ...}``: unique, because two instances may not share a prefix.

        Until :meth:`setup` the key is also made unique per instance: Lightning validates the callback
        list when the Trainer is built, and two instances with the same prefix should reach the clear
        error of :meth:`setup` rather than Lightning's generic one.
        """
        key = self._generate_state_key(log_prefix=self.log_prefix)
        return key if getattr(self, "_set_up", False) else f"{key}@{id(self):x}"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reject set-ups the probe cannot handle, and two instances of this class with one prefix."""
        if stage != "fit":
            return
        owner = type(self).__name__
        check_supported(trainer, pl_module, owner)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        twins = [c for c in callbacks if type(c) is type(self) and c.log_prefix == self.log_prefix]
        if len(twins) > 1:
            raise MisconfigurationException(
                f"{len(twins)} {owner} callbacks share log_prefix={self.log_prefix!r}: their values would be "
                "written into the same logger keys. Give each instance its own `log_prefix`."
            )
        self._set_up = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the TensorBoard custom-scalars layout (once per run)."""
        write_layout(trainer, self.log_prefix)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Record the batch and the random state its training step starts from."""
        record_batch(trainer, batch, batch_idx)

    def skip(self, trainer: pl.Trainer, reason: Exception) -> None:
        """Count a skipped step; warn the first time each kind of reason occurs.

        Args:
            trainer: the trainer (for the step number in the warning).
            reason: what the probe could not compute (one of :data:`SKIPPED`).
        """
        self.skipped_steps += 1
        warned: set[str] = self.__dict__.setdefault("_warned", set())
        kind = type(reason).__name__
        if kind not in warned:
            warned.add(kind)
            rank_zero_warn(
                f"{type(self).__name__} skipped step {trainer.global_step} ({kind}: {reason}). Steps skipped "
                "for this reason are not warned about again; they are counted in the logged skip count."
            )


def log_values(trainer: pl.Trainer, values: Mapping[str, float | None], prefix: str) -> None:
    """Send the finite ``values`` of this step to every logger and to ``trainer.callback_metrics``.

    Not through ``pl_module.log``: Lightning re-emits an ``on_step`` value at every later step of the
    epoch until it is logged again, so a key computed only on some steps (``every_n_steps``, skipped
    steps, the warm-up count) would be logged as stale numbers. NaN/inf are never logged. The step is
    Lightning's own logging step, so the values line up with ``train/loss``.
    """
    finite = {prefix + k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return
    # the dict trainer.callback_metrics returns, without the property's recomputation of every value the
    # module logged; one tensor, unbound into 0-dim views: a tenth of the cost of one torch.tensor() per key
    metrics = getattr(trainer._logger_connector, "_callback_metrics", None)
    if metrics is None:  # pragma: no cover - another Lightning version
        metrics = trainer.callback_metrics
    metrics.update(zip(finite, torch.tensor(list(finite.values())).unbind(), strict=True))
    if trainer.is_global_zero:
        # the step Lightning's own logger connector uses, so the values line up with train/loss
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=step)
