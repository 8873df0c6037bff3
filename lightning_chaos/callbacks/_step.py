"""Lightning wiring shared by every curvature callback: which batch, which loss, which gradient.

A curvature callback records the batch and the random state at ``on_train_batch_start`` and builds its
probe in ``on_before_optimizer_step``. In Lightning 2.x that hook runs after the closure (forward and
backward) and after the AMP scaler's ``unscale_``, but before gradient clipping and before the module's
own ``on_before_optimizer_step``: ``p.grad`` is then the unscaled, unclipped gradient of this batch, so it
can serve as ``g(θ)`` when nothing else has touched it (see :func:`StepProbe.current`).

The record and the probe live on the trainer, so several callbacks in one Trainer share one batch
record, one ``g(θ)`` and one cache (e.g. a dense Hessian) per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_chaos.core.params import flatten
from lightning_chaos.core.probe import FunctionalLoss, RNGState
from lightning_chaos.core.spectrum import HessianOperator, symmetric_eigh
from lightning_chaos.core.tangent import SGDHyperparameters, sgd_hyperparameters
from lightning_chaos.dashboards import write_layout

_RECORD = "_lightning_chaos_record"


def check_supported(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> None:
    """Raise a clear error for set-ups the probe cannot handle.

    Args:
        trainer: the trainer.
        pl_module: the module.
        owner: name of the callback, for the message.

    Raises:
        MisconfigurationException: sharded strategies (FSDP, DeepSpeed, model parallel), no trainable
            parameters, or manual optimization without ``curvature_loss``.
    """
    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise MisconfigurationException(
            f"{owner} does not support the {type(trainer.strategy).__name__} (sharded parameters); "
            "use a single device or strategy='ddp'/'ddp_spawn'."
        )
    if not any(p.requires_grad for p in pl_module.parameters()):
        raise MisconfigurationException(
            f"{owner}: the LightningModule has no parameters with requires_grad=True."
        )
    if not pl_module.automatic_optimization and not callable(getattr(pl_module, "curvature_loss", None)):
        raise MisconfigurationException(
            f"{owner} under manual optimization needs `curvature_loss(batch)` on the LightningModule: its "
            "`training_step` steps the optimizer itself and cannot be re-evaluated as a loss."
        )


def sgd_of(optimizer: torch.optim.Optimizer, owner: str) -> SGDHyperparameters:
    """γ, μ, τ, Nesterov and weight decay of the coming update (see ``core.tangent.sgd_hyperparameters``).

    Call from ``on_before_optimizer_step`` for the rate of this step's update (schedulers step after it;
    a callback that writes ``lr`` in the same hook must come earlier in the callback list).

    Args:
        optimizer: the optimizer Lightning is about to step.
        owner: name of the callback, for the message.

    Returns:
        The hyper-parameters shared by all param groups.

    Raises:
        MisconfigurationException: not a ``torch.optim.SGD``, ``maximize=True``, param groups with
            different hyper-parameters, or values the SGD tangent-map formulas do not cover.
    """
    try:
        return sgd_hyperparameters(optimizer)
    except (TypeError, ValueError) as err:
        raise MisconfigurationException(f"{owner} models the torch.optim.SGD update: {err}.") from err


def check_sgd(trainer: pl.Trainer, owner: str) -> None:
    """Raise at fit start unless the Trainer has exactly one optimizer, a ``torch.optim.SGD`` (see sgd_of).

    Args:
        trainer: the trainer (call from ``on_fit_start``, when the optimizers exist).
        owner: name of the callback, for the message.

    Raises:
        MisconfigurationException: as :func:`sgd_of`, or several optimizers.
    """
    if len(trainer.optimizers) != 1:
        raise MisconfigurationException(
            f"{owner} needs exactly one optimizer (a torch.optim.SGD), got {len(trainer.optimizers)}."
        )
    sgd_of(trainer.optimizers[0], owner)


@dataclass
class BatchRecord:
    """The batch of the current (last micro-)step and the random state its training step started from."""

    batch: Any
    batch_idx: int
    rng: RNGState
    vectorize: bool = True
    probes: dict[float, StepProbe] = field(default_factory=dict)


def record_batch(trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
    """Remember the batch and the random state (call from ``on_train_batch_start``; idempotent per batch)."""
    record = getattr(trainer, _RECORD, None)
    if record is None or record.batch is not batch or record.batch_idx != batch_idx:
        # a model that could not be vmapped once is not tried again on every step
        vectorize = record is None or (
            record.vectorize and all(p.loss.vectorize for p in record.probes.values())
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


class ProbeCallback(Callback):
    """Base of the callbacks that probe the training batch: records it and writes the TensorBoard layout.

    Subclasses set ``log_prefix`` and call ``super().on_fit_start`` when they extend that hook.
    """

    log_prefix: str = "chaos/"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the TensorBoard custom-scalars layout (once per run)."""
        write_layout(trainer, self.log_prefix)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Record the batch and the random state its training step starts from."""
        record_batch(trainer, batch, batch_idx)


@contextlib.contextmanager
def muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Turn ``self.log``/``self.log_dict`` into no-ops while the probe re-runs ``training_step``."""

    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    try:
        for name in saved:
            object.__setattr__(pl_module, name, silent)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del pl_module.__dict__[name]
            else:
                object.__setattr__(pl_module, name, value)


def loss_closure(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Callable[[], Tensor]:
    """The training loss of ``batch`` as a zero-argument closure over ``pl_module``.

    ``pl_module.curvature_loss(batch)`` when the module defines it (the documented protocol), otherwise
    ``pl_module.training_step(batch, batch_idx)`` with ``self.log`` muted (metric objects updated inside
    ``training_step`` then see the batch again: that is what ``curvature_loss`` is for).

    Args:
        pl_module: the module whose loss is evaluated (the training module or a copy of it).
        batch: the batch.
        batch_idx: its index, passed to ``training_step``.

    Returns:
        The closure; it returns whatever the loss function returns (checked by the caller).
    """
    curvature_loss = getattr(pl_module, "curvature_loss", None)
    if callable(curvature_loss):
        return lambda: curvature_loss(batch)

    def compute() -> Tensor:
        with muted_logging(pl_module):
            return pl_module.training_step(batch, batch_idx)

    return compute


def _sub_batch(batch: Any, fraction: float) -> Any:
    def head(t: Tensor) -> Tensor:
        return t[: max(1, math.ceil(fraction * t.shape[0]))] if t.dim() > 0 else t

    return apply_to_collection(batch, Tensor, head)


class StepProbe:
    """The curvature probe of one optimizer step, shared by all callbacks of the trainer.

    Attributes:
        loss: the fixed-batch :class:`~lightning_chaos.core.probe.FunctionalLoss` at the current θ.
        reuses_gradient: whether :meth:`g0` is the training gradient ``p.grad`` (no extra pass).
        cache: per-step scratch space for results several callbacks need (dense Hessian, eigenpairs).
    """

    def __init__(self, loss: FunctionalLoss, params: list[torch.nn.Parameter], reuses_gradient: bool) -> None:
        self.loss = loss
        self.reuses_gradient = reuses_gradient
        self.cache: dict[str, Any] = {}
        self._params = params
        self._g0: Tensor | None = None

    def hessian(self) -> HessianOperator:
        """Matrix-free Hessian ``H`` of the probe's loss at θ (exact HVPs, DDP-averaged), shared per step."""
        if "hessian" not in self.cache:
            self.cache["hessian"] = HessianOperator(self.loss, self.loss.params, reduce=self.loss.reduce)
        return self.cache["hessian"]

    def dense(self) -> Tensor:
        """Exact dense symmetric Hessian ``(N, N)`` of the probe's loss at θ (DDP-averaged), once per step.

        N exact Hessian-vector products of :meth:`hessian` in batched blocks (double backward through the
        step's gradient graph, several times faster than ``torch.func.hessian`` for MLPs on CPU),
        symmetrised: O(N²) memory, small models.
        """
        if "dense" not in self.cache:
            dense = self.hessian().to_dense()
            self.cache["dense"] = 0.5 * (dense + dense.T)
        return self.cache["dense"]

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Exact ``(eigenvalues ascending (N,), eigenvectors (N, N))`` of ``H``, computed once per step.

        Dense (:meth:`dense` + ``eigh``): O(N²) memory and O(N³) time, for small models only.
        """
        if "eigh" not in self.cache:
            self.cache["eigh"] = symmetric_eigh(self.dense())
        return self.cache["eigh"]

    def eigvalsh(self) -> Tensor:
        """Exact eigenvalues of ``H``, ascending ``(N,)``, once per step.

        Taken from :meth:`eigh` when a callback earlier in the list needed the eigenvectors this step, else
        from ``eigvalsh`` (cheaper: no eigenvectors).
        """
        if "eigh" in self.cache:
            return self.cache["eigh"][0]
        if "eigvalsh" not in self.cache:
            self.cache["eigvalsh"] = symmetric_eigh(self.dense(), eigenvectors=False)
        return self.cache["eigvalsh"]

    def g0(self) -> Tensor:
        """Gradient ``g(θ)`` of the probe's loss, ``(N,)``: the training gradient when reusable."""
        if self._g0 is None:
            if self.reuses_gradient:
                self._g0 = flatten([p.grad for p in self._params]).detach()  # torch.cat: already a copy
            else:
                self._g0 = self.loss.gradient()
        return self._g0

    @classmethod
    def current(cls, trainer: pl.Trainer, pl_module: pl.LightningModule, fraction: float = 1.0) -> StepProbe:
        """The probe of the batch recorded at ``on_train_batch_start``, built once per step and fraction.

        ``g(θ)`` is reused from ``p.grad`` only when it is exactly the gradient of the probe's loss:
        automatic optimization, no gradient accumulation (``p.grad`` would be the scaled sum over
        micro-batches; the probe then uses the last micro-batch and recomputes), the full batch, and a
        gradient present on every trainable parameter.

        Args:
            trainer: the trainer.
            pl_module: the module.
            fraction: share of the batch (leading entries) the probe evaluates on, in ``(0, 1]``.

        Returns:
            The shared :class:`StepProbe`.
        """
        record = current_record(trainer)
        if fraction in record.probes:
            return record.probes[fraction]
        batch = record.batch if fraction >= 1.0 else _sub_batch(record.batch, fraction)
        compute = loss_closure(pl_module, batch, record.batch_idx)
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        reduce = None
        if trainer.world_size > 1:

            def reduce(t: Tensor) -> Tensor:
                return trainer.strategy.reduce(t.clone(), reduce_op="mean")

        loss = FunctionalLoss(
            pl_module,
            compute,
            named,
            rng_state=record.rng,
            context=trainer.precision_plugin.forward_context,
            loss_scale=float(scaler.get_scale()) if scaler is not None else 1.0,
            reduce=reduce,
            vectorize=record.vectorize,
        )
        reusable = (
            pl_module.automatic_optimization
            and trainer.accumulate_grad_batches == 1
            and fraction >= 1.0
            and all(p.grad is not None for _, p in named)
        )
        probe = cls(loss, [p for _, p in named], reusable)
        record.probes[fraction] = probe
        return probe


def _callback_metrics(trainer: pl.Trainer) -> dict[str, Tensor]:
    """The dict that ``trainer.callback_metrics`` returns, without the property's recomputation.

    The public property first re-reduces every value the module logged with ``self.log`` in this step and
    merges it into this dict (about 0.1 ms per access for a small classifier, paid on every monitored step);
    the logger connector's dict is the very object the property returns, so updating it is equivalent.
    """
    store = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    return store if isinstance(store, dict) else trainer.callback_metrics


def log_values(trainer: pl.Trainer, values: dict[str, float], prefix: str) -> None:
    """Send the finite ``values`` of this step to every logger and to ``trainer.callback_metrics``.

    Not through ``pl_module.log``: Lightning re-emits an ``on_step`` value at every later step of the
    epoch until it is logged again, so a key computed only on some steps (``every_n_steps``, skipped
    NaN steps, the warm-up count) would be logged as stale numbers. NaN/inf are never logged.
    The step is Lightning's own logging step, so the values line up with ``train/loss``.
    """
    finite = {f"{prefix}{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return
    # one tensor, unbound into 0-dim views: a tenth of the cost of one torch.tensor() per key
    _callback_metrics(trainer).update(zip(finite, torch.tensor(list(finite.values())).unbind()))
    if trainer.is_global_zero:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=step)
