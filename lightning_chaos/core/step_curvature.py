"""The curvature of one training step, computed at most once however many consumers ask for it.

Several consumers may need the Hessian of the same batch at the same θ in one optimizer step: the
spectrum monitor, CGD, the tangent-map monitor, the divergence twins' directions. :class:`StepCurvature`
holds the step's :class:`~lightning_chaos.core.functional_loss.FunctionalLoss` and caches what is derived
from it (the gradient at θ, the Hessian operator, the dense Hessian and its eigendecomposition), so that
the first consumer pays and the others reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.operators import HessianOperator, symmetric_eigh
from lightning_chaos.core.params import flatten, unflatten

__all__ = ["StepCurvature"]


class StepCurvature:
    """The fixed-batch loss of one step and the curvature derived from it, each computed once.

    Args:
        loss: the fixed-batch functional loss at the current θ.
        gradient_source: the parameters whose ``.grad`` is exactly ``g(θ)`` of ``loss`` (the training
            gradient of this batch, e.g. after Lightning's backward pass), or ``None`` to compute
            ``g(θ)`` on demand. Must be the parameters of ``loss`` in the same order.

    Attributes:
        loss: the :class:`~lightning_chaos.core.functional_loss.FunctionalLoss`.
        reuses_gradient: whether :meth:`g0` reads the training gradient (no extra pass).
        cache: scratch space for results several consumers need (keys are the consumers' own).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> step = StepCurvature(FunctionalLoss(model, lambda: ((model(x) - y) ** 2).mean()))
        >>> step.dense().shape
        torch.Size([4, 4])
        >>> step.eigvalsh() is step.eigvalsh()  # computed once
        True
    """

    def __init__(self, loss: FunctionalLoss, gradient_source: Sequence[torch.nn.Parameter] | None = None):
        self.loss = loss
        self.reuses_gradient = gradient_source is not None
        self.cache: dict[str, Any] = {}
        self._gradient_source = list(gradient_source or ())
        self._g0: Tensor | None = None

    def g0(self) -> Tensor:
        """Gradient ``g(θ)`` of the loss, ``(N,)``: the training gradient when reusable."""
        if self._g0 is None:
            if self.reuses_gradient:
                self._g0 = flatten([_grad(p) for p in self._gradient_source]).detach()  # torch.cat: a copy
            else:
                self._g0 = self.loss.gradient()
        return self._g0

    def g0_tensors(self) -> list[Tensor]:
        """``g(θ)`` tensor by tensor, shaped like the parameters (no flat copy).

        The training gradients ``p.grad`` themselves when reusable (valid until something edits
        ``p.grad``, e.g. clipping after ``on_before_optimizer_step``), else views of :meth:`g0`.
        """
        if self.reuses_gradient:
            return [_grad(p) for p in self._gradient_source]
        return unflatten(self.g0(), self.loss.params)

    def hessian(self) -> HessianOperator:
        """Matrix-free Hessian ``H`` of the loss at θ (exact HVPs, reduced like the gradients), shared."""
        if "hessian" not in self.cache:
            self.cache["hessian"] = HessianOperator(self.loss, self.loss.params, reduce=self.loss.reduce)
        operator: HessianOperator = self.cache["hessian"]
        return operator

    def dense(self) -> Tensor:
        """Exact dense symmetric Hessian ``(N, N)`` of the loss at θ: N batched exact HVPs, symmetrised.

        O(N²) memory: small models only.
        """
        if "dense" not in self.cache:
            dense = self.hessian().to_dense()
            self.cache["dense"] = 0.5 * (dense + dense.T)
        matrix: Tensor = self.cache["dense"]
        return matrix

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Exact ``(eigenvalues ascending (N,), eigenvectors (N, N))`` of ``H`` (O(N³) time)."""
        if "eigh" not in self.cache:
            self.cache["eigh"] = symmetric_eigh(self.dense())
        pairs: tuple[Tensor, Tensor] = self.cache["eigh"]
        return pairs

    def eigvalsh(self) -> Tensor:
        """Exact eigenvalues of ``H``, ascending ``(N,)``; from :meth:`eigh` when that already ran."""
        if "eigh" in self.cache:
            return self.eigh()[0]
        if "eigvalsh" not in self.cache:
            self.cache["eigvalsh"] = symmetric_eigh(self.dense(), eigenvectors=False)
        values: Tensor = self.cache["eigvalsh"]
        return values


def _grad(p: Tensor) -> Tensor:
    if p.grad is None:
        raise ValueError(
            "gradient_source: a parameter has no .grad (reuse gradients after the backward pass)"
        )
    return p.grad
