"""Which batch, which loss and which gradient a curvature callback probes in a Lightning step.

A curvature callback records the batch and the random state at ``on_train_batch_start`` and probes in
``on_before_optimizer_step``. In Lightning 2.x that hook runs after the closure (forward and backward)
and after the AMP scaler's ``unscale_``, but before gradient clipping and before the module's own
``on_before_optimizer_step``: ``p.grad`` is then the unscaled, unclipped gradient of this batch, so it
can serve as ``g(θ)`` when nothing else has touched it (see :func:`step_curvature`).

The record and the step's :class:`~lightning_chaos.core.step_curvature.StepCurvature` live on the
trainer, so several callbacks in one Trainer share one batch record, one ``g(θ)`` and one cache (e.g. a
dense Hessian) per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Any, cast

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_chaos.core.functional_loss import FunctionalLoss, RNGState
from lightning_chaos.core.params import ModuleLayout
from lightning_chaos.core.step_curvature import StepCurvature

_RECORD = "_lightning_chaos_record"


@dataclass
class BatchRecord:
    """The batch of the current (last micro-)step and the random state its training step started from."""

    batch: Any
    batch_idx: int
    rng: RNGState
    vectorize: bool = True
    curvatures: dict[float, StepCurvature] = field(default_factory=dict)


def record_batch(trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
    """Remember the batch and the random state (call from ``on_train_batch_start``; idempotent per batch)."""
    record = getattr(trainer, _RECORD, None)
    if record is None or record.batch is not batch or record.batch_idx != batch_idx:
        # a model that could not be vmapped once is not tried again on every step
        vectorize = record is None or (
            record.vectorize and all(c.loss.vectorize for c in record.curvatures.values())
        )
        setattr(trainer, _RECORD, BatchRecord(batch, batch_idx, RNGState.capture(), vectorize))


def current_record(trainer: pl.Trainer) -> BatchRecord:
    """The batch and random state recorded by :func:`record_batch` for the current step.

    Raises:
        RuntimeError: nothing was recorded (the callback does not call ``record_batch``).
    """
    record: BatchRecord | None = getattr(trainer, _RECORD, None)
    if record is None:
        raise RuntimeError("No batch recorded: call record_batch() from on_train_batch_start.")
    return record


def _metrics(layout: ModuleLayout) -> list[Any]:
    """The torchmetrics ``Metric`` objects among a module's submodules (found once per module layout)."""
    if _METRICS not in layout.cache:
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics is a dependency of lightning
            layout.cache[_METRICS] = []
        else:
            layout.cache[_METRICS] = [m for m in layout.modules if isinstance(m, Metric)]
    metrics: list[Any] = layout.cache[_METRICS]
    return metrics


_METRICS = "callbacks.torchmetrics"
_GUARD = "callbacks.metric_guard"


def _clone_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_clone_state(v) for v in value]
    return value


_METRIC_BOOKKEEPING = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_cache")
_MISSING = object()


class MetricGuard:
    """Restores every metric's state, update count and cached results after each block it guards.

    A probe evaluates the loss at perturbed parameters; a metric updated inside ``training_step`` would
    otherwise count those evaluations as batches. The guard keeps a copy of each metric as it was before
    a block and, after the block, puts the copy back if the metric changed. It copies a metric only when
    the metric changed since its last copy (the training step updates ``train_acc`` once per step, the
    probe's evaluations of ``curvature_loss`` leave every metric alone), and it tells whether a metric
    changed by the identity of its states and bookkeeping values: torchmetrics rebinds a state or counts
    an update whenever it changes one (the objects seen are kept alive, so their identities are not
    reused).

    Args:
        metrics: the torchmetrics ``Metric`` objects to guard.
    """

    def __init__(self, metrics: list[Any]) -> None:
        self.metrics = metrics
        self._seen: list[list[Any] | None] = [None] * len(metrics)  # each metric's objects at its copy
        self._copies: list[dict[str, Any]] = [{} for _ in metrics]
        self._depth = 0

    @staticmethod
    def _objects(metric: Any) -> list[Any]:
        """The metric's states, the elements of its list states ("cat") and its bookkeeping values."""
        states = metric._defaults
        objects = list(map(metric.__dict__.get, chain(states, _METRIC_BOOKKEEPING), repeat(_MISSING)))
        for value in objects[: len(states)]:
            if type(value) is list:
                objects += value
        return objects

    def _copy(self, index: int, metric: Any) -> None:
        """Copy the metric's states; keep its bookkeeping values as they are."""
        copies = {name: _clone_state(getattr(metric, name)) for name in metric._defaults}
        copies.update({name: getattr(metric, name) for name in _METRIC_BOOKKEEPING if hasattr(metric, name)})
        self._copies[index] = copies

    def __enter__(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        for index, metric in enumerate(self.metrics):
            objects = self._objects(metric)
            if not _same(objects, self._seen[index]):  # changed since the copy: copy it again
                self._copy(index, metric)
                self._seen[index] = objects

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        for index, metric in enumerate(self.metrics):
            if _same(self._objects(metric), self._seen[index]):
                continue
            for name, value in self._copies[index].items():
                # the states as clones of the copy (which stays as it was), the bookkeeping values as found
                object.__setattr__(metric, name, _clone_state(value) if name in metric._defaults else value)
            self._seen[index] = self._objects(metric)


def _same(objects: list[Any], seen: list[Any] | None) -> bool:
    return seen is not None and len(objects) == len(seen) and all(map(operator.is_, objects, seen))


def metric_guard(layout: ModuleLayout) -> MetricGuard:
    """The :class:`MetricGuard` of a module's torchmetrics metrics (one per module layout)."""
    if _GUARD not in layout.cache:
        layout.cache[_GUARD] = MetricGuard(_metrics(layout))
    guard: MetricGuard = layout.cache[_GUARD]
    return guard


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Turn ``self.log``/``self.log_dict`` into no-ops while the probe re-runs ``training_step``."""
    saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    try:
        for name in saved:
            object.__setattr__(pl_module, name, _silent)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del pl_module.__dict__[name]
            else:
                object.__setattr__(pl_module, name, value)


def loss_closure(
    pl_module: pl.LightningModule, batch: Any, batch_idx: int, layout: ModuleLayout | None = None
) -> Callable[[], Tensor]:
    """The training loss of ``batch`` as a zero-argument closure over ``pl_module``.

    ``pl_module.curvature_loss(batch)`` when the module defines it (the documented protocol), otherwise
    ``pl_module.training_step(batch, batch_idx)`` with ``self.log`` muted. Either way every torchmetrics
    ``Metric`` of the module is left exactly as it was (:class:`MetricGuard`).

    Args:
        pl_module: the module whose loss is evaluated (the training module or a copy of it).
        batch: the batch.
        batch_idx: its index, passed to ``training_step``.
        layout: ``ModuleLayout.of(pl_module)`` when the caller has it.

    Returns:
        The closure; it returns whatever the loss function returns (checked by the caller).
    """
    guard = metric_guard(layout or ModuleLayout.of(pl_module))
    curvature_loss = getattr(pl_module, "curvature_loss", None)
    if callable(curvature_loss):

        def compute() -> Tensor:
            with guard:
                return curvature_loss(batch)

        return compute

    def compute_training_step() -> Tensor:
        with muted_logging(pl_module), guard:
            # a dict or None is not a loss: FunctionalLoss checks the value and says so
            return cast(Tensor, pl_module.training_step(batch, batch_idx))

    return compute_training_step


def skipped_backward(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether Lightning skipped this step's backward pass because ``training_step`` returned ``None``.

    Lightning then still calls ``on_before_optimizer_step`` (and, without a loss scaler, ``optimizer.step``),
    but after zeroing the gradients and computing none: in automatic optimization without gradient
    accumulation no trainable parameter has a gradient. The optimizer changes nothing on such a step (an
    SGD update without gradient is the identity), so there is no step to probe.
    """
    return _skipped(trainer, pl_module, ModuleLayout.of(pl_module).trainable)


def _skipped(
    trainer: pl.Trainer, pl_module: pl.LightningModule, named: list[tuple[str, nn.Parameter]]
) -> bool:
    return (
        pl_module.automatic_optimization
        and trainer.accumulate_grad_batches == 1
        and all(p.grad is None for _, p in named)
    )


def _no_loss() -> Tensor:
    # a training_step that returned None: FunctionalLoss raises NoLossError on the None
    return cast(Tensor, None)


def _sub_batch(batch: Any, fraction: float) -> Any:
    def head(t: Tensor) -> Tensor:
        return t[: max(1, math.ceil(fraction * t.shape[0]))] if t.dim() > 0 else t

    return apply_to_collection(batch, Tensor, head)


def step_curvature(
    trainer: pl.Trainer, pl_module: pl.LightningModule, fraction: float = 1.0
) -> StepCurvature:
    """The curvature of the batch recorded at ``on_train_batch_start``, built once per step and fraction.

    ``g(θ)`` is reused from ``p.grad`` only when it is exactly the gradient of the probed loss: automatic
    optimization, no gradient accumulation (``p.grad`` would be the scaled sum over micro-batches; the
    probe then uses the last micro-batch and recomputes), the full batch, and a gradient present on every
    trainable parameter. The loss runs under the precision plugin's autocast; with a GradScaler its
    gradients are taken of the scaled loss and unscaled; with several processes they are averaged
    across ranks (``trainer.strategy.reduce``), like DDP averages the training gradient. On a step whose
    backward Lightning skipped (:func:`skipped_backward`) the loss is ``None`` even when the module defines
    ``curvature_loss``: every evaluation raises :class:`~lightning_chaos.core.functional_loss.NoLossError`.

    Args:
        trainer: the trainer.
        pl_module: the module.
        fraction: share of the batch (leading entries) the probe evaluates on, in ``(0, 1]``.

    Returns:
        The shared :class:`~lightning_chaos.core.step_curvature.StepCurvature`.
    """
    record = current_record(trainer)
    if fraction in record.curvatures:
        return record.curvatures[fraction]
    batch = record.batch if fraction >= 1.0 else _sub_batch(record.batch, fraction)
    layout = ModuleLayout.of(pl_module)
    named = layout.trainable
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    reduce = None
    if trainer.world_size > 1:

        def reduce(t: Tensor) -> Tensor:
            reduced: Tensor = trainer.strategy.reduce(t.clone(), reduce_op="mean")
            return reduced

    skipped = _skipped(trainer, pl_module, named)
    loss = FunctionalLoss(
        pl_module,
        _no_loss if skipped else loss_closure(pl_module, batch, record.batch_idx, layout),
        named,
        rng_state=record.rng,
        context=trainer.precision_plugin.forward_context,
        loss_scale=float(scaler.get_scale()) if scaler is not None else 1.0,
        reduce=reduce,
        vectorize=record.vectorize,
        layout=layout,
    )
    reusable = (
        pl_module.automatic_optimization
        and trainer.accumulate_grad_batches == 1
        and fraction >= 1.0
        and all(p.grad is not None for _, p in named)
    )
    curvature = StepCurvature(loss, [p for _, p in named] if reusable else None)
    record.curvatures[fraction] = curvature
    return curvature
