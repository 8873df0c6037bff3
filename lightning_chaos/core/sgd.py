"""The update ``torch.optim.SGD`` performs, as the hyper-parameters every SGD formula of the core takes.

With ``g̃ = ∇L(θ) + wd·θ`` and momentum buffer ``v`` (``maximize=False``)::

    v' = μ v + (1 − τ) g̃                     (first step: v' = g̃, see below)
    θ' = θ − γ v'                             (heavy ball)
    θ' = θ − γ (g̃ + μ v')                     (Nesterov)

with learning rate γ, momentum μ, dampening τ and weight decay wd. torch creates the buffer on a
parameter's first update as ``v' = g̃`` itself, *without* dampening: that step is the update above with
``v = 0`` and ``τ = 0`` (:meth:`SGDHyperparameters.at_first_step`).

:class:`SGDHyperparameters` is what the stability theory (:mod:`lightning_chaos.core.stability`), the
tangent maps (:mod:`lightning_chaos.core.tangent_map`) and CGD take instead of five loose arguments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SGDHyperparameters", "sgd_first_step"]

_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")


@dataclass(frozen=True)
class SGDHyperparameters:
    """The hyper-parameters of the ``torch.optim.SGD`` update (module docstring) and of its tangent map.

    Validated on construction as ``torch.optim.SGD`` validates them (non-negative momentum and weight
    decay, Nesterov only with momentum > 0 and zero dampening), and additionally ``lr > 0``,
    ``momentum < 1`` (a buffer that does not decay has no stable curvature) and ``0 ≤ dampening ≤ 1``.

    Attributes:
        lr: learning rate γ.
        momentum: momentum μ.
        dampening: dampening τ (torch ignores it when μ = 0).
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient wd folded into the gradient (the maps use ``H + wd·I``).

    Raises:
        ValueError: naming the offending hyper-parameter.

    Example:
        >>> sgd = SGDHyperparameters(lr=0.1, momentum=0.9)
        >>> sgd.at_first_step() == sgd
        True
        >>> SGDHyperparameters(lr=0.1, momentum=0.9, dampening=0.5).at_first_step().dampening
        0.0
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must satisfy 0 <= momentum < 1, got {self.momentum!r}")
        if not 0.0 <= self.dampening <= 1.0:
            raise ValueError(f"dampening must satisfy 0 <= dampening <= 1, got {self.dampening!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative finite number, got {self.weight_decay!r}")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0 (as in torch.optim.SGD)")

    def at_first_step(self) -> SGDHyperparameters:
        """The update of torch's first momentum step: the buffer is created without dampening (τ = 0)."""
        return dataclasses.replace(self, dampening=0.0) if self.momentum else self

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> SGDHyperparameters:
        """Read γ, μ, τ, Nesterov and weight decay from a ``torch.optim.SGD`` as they are now.

        Call it right before ``optimizer.step()`` (e.g. in a callback's ``on_before_optimizer_step``) to
        get the rate of the coming update, after any scheduler or callback changed it.

        Args:
            optimizer: the optimizer.

        Returns:
            The hyper-parameters shared by all param groups.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.SGD`` (another optimizer, or a wrapper that
                changes the update, performs another update with another tangent map).
            ValueError: ``maximize=True``; param groups with different hyper-parameters (the map is then
                ``I − ΓH`` with a non-scalar Γ, for which the per-eigenvalue formulas do not hold); values
                outside the ranges above.
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
            different = [k for k in _KEYS if float(group[k]) != float(first[k])]
            if different:
                raise ValueError(
                    f"param group {index} differs from group 0 in {', '.join(different)}: the tangent map "
                    "of per-group hyper-parameters is not I − γH; use one set of SGD hyper-parameters"
                )
        lr = first["lr"]
        return cls(
            lr=float(lr.item()) if isinstance(lr, Tensor) else float(lr),
            momentum=float(first["momentum"]),
            dampening=float(first["dampening"]),
            nesterov=bool(first["nesterov"]),
            weight_decay=float(first["weight_decay"]),
        )


def sgd_first_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the coming ``step()`` of a ``torch.optim.SGD`` with momentum creates the buffer.

    torch creates ``state[p]["momentum_buffer"]`` on a parameter's first update with ``v' = g̃`` (no
    dampening): that step's map is the one of :meth:`SGDHyperparameters.at_first_step`. Without momentum
    there is no buffer and the answer is False.

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
