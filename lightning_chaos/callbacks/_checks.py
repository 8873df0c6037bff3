"""Checks shared by the callbacks: arguments, supported Trainer set-ups, the optimizer they model.

Every error is a ``MisconfigurationException`` that names the callback or the argument and what is
allowed, raised before any training happens where possible.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.validation import check_choice, check_int, check_number

int_arg = functools.partial(check_int, error=MisconfigurationException)
""":func:`~lightning_chaos.core.validation.check_int` raising ``MisconfigurationException``."""

number_arg = functools.partial(check_number, error=MisconfigurationException)
""":func:`~lightning_chaos.core.validation.check_number` raising ``MisconfigurationException``."""

choice_arg = functools.partial(check_choice, error=MisconfigurationException)
""":func:`~lightning_chaos.core.validation.check_choice` raising ``MisconfigurationException``."""


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


def single_optimizer(trainer: pl.Trainer, owner: str) -> torch.optim.Optimizer:
    """The Trainer's only optimizer (call from ``on_fit_start``, when the optimizers exist).

    Raises:
        MisconfigurationException: zero or several optimizers.
    """
    if len(trainer.optimizers) != 1:
        raise MisconfigurationException(
            f"{owner} needs exactly one optimizer, got {len(trainer.optimizers)}."
        )
    return trainer.optimizers[0]


def sgd_of(optimizer: torch.optim.Optimizer, owner: str) -> SGDHyperparameters:
    """γ, μ, τ, Nesterov and weight decay of the coming update (:meth:`SGDHyperparameters.from_optimizer`).

    Call from ``on_before_optimizer_step`` for the rate of this step's update (schedulers step after it;
    a callback that writes ``lr`` in the same hook must come earlier in the callback list).

    Args:
        optimizer: the optimizer Lightning is about to step.
        owner: name of the callback, for the message.

    Returns:
        The hyper-parameters shared by all param groups.

    Raises:
        MisconfigurationException: not a ``torch.optim.SGD`` (Adam and other adaptive optimizers
            precondition the update, whose tangent map is then not ``I − γH``), ``maximize=True``, param
            groups with different hyper-parameters, or values the SGD formulas do not cover.
    """
    try:
        return SGDHyperparameters.from_optimizer(optimizer)
    except (TypeError, ValueError) as err:
        raise MisconfigurationException(f"{owner} models the torch.optim.SGD update: {err}.") from err


def check_sgd(trainer: pl.Trainer, owner: str) -> SGDHyperparameters:
    """The hyper-parameters of the Trainer's one ``torch.optim.SGD`` (see :func:`sgd_of`), at fit start.

    Raises:
        MisconfigurationException: as :func:`sgd_of` or :func:`single_optimizer`.
    """
    return sgd_of(single_optimizer(trainer, owner), owner)
