"""One-step tangent maps of the update ``torch.optim.SGD`` performs (:mod:`lightning_chaos.core.sgd`).

Differentiating the update with respect to ``(θ, v)`` with ``H̃ = H + wd·I`` gives the map on
perturbations ``(δθ, δv)``; the buffer is part of the state as soon as μ > 0::

    μ = 0:      J = I − γ H̃                                            (N × N; τ and the buffer unused)
    heavy ball: J = [[I − γ(1 − τ) H̃, −γ μ I], [(1 − τ) H̃, μ I]]       (2N × 2N)
    Nesterov:   J = [[I − γ(1 + μ) H̃, −γ μ² I], [H̃, μ I]]             (2N × 2N, τ = 0 as torch requires)

torch's first momentum step creates the buffer without dampening: its map is the one of
``sgd.at_first_step()``. Per Hessian eigenvalue the map reduces to the blocks whose exponents
:mod:`lightning_chaos.core.stability` computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_chaos.core.sgd import SGDHyperparameters

__all__ = ["apply_tangent_map", "sgd_tangent_map"]


def sgd_tangent_map(hessian: Tensor, sgd: SGDHyperparameters) -> Tensor:
    """Dense one-step tangent map of the ``torch.optim.SGD`` update (module docstring for the equations).

    Args:
        hessian: loss Hessian H, shape ``(N, N)`` (without weight decay; it is added here).
        sgd: the update (``sgd.at_first_step()`` for torch's first momentum step).

    Returns:
        ``(N, N)`` map ``I − γ H̃`` when μ = 0, else the ``(2N, 2N)`` map on ``(δθ, δv)``.

    Example:
        >>> sgd_tangent_map(torch.diag(torch.tensor([1.0, 4.0])), SGDHyperparameters(lr=0.5))
        tensor([[ 0.5000,  0.0000],
                [ 0.0000, -1.0000]])
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (N, N), got shape {tuple(hessian.shape)}")
    lr, mu = sgd.lr, sgd.momentum
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    h_eff = hessian + sgd.weight_decay * eye
    if mu == 0:
        return eye - lr * h_eff
    if sgd.nesterov:
        blocks = [[eye - lr * (1 + mu) * h_eff, -lr * mu**2 * eye], [h_eff, mu * eye]]
    else:
        keep = 1.0 - sgd.dampening
        blocks = [[eye - lr * keep * h_eff, -lr * mu * eye], [keep * h_eff, mu * eye]]
    return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)


def apply_tangent_map(hvp: Callable[[Tensor], Tensor], tangents: Tensor, sgd: SGDHyperparameters) -> Tensor:
    """Apply the one-step SGD tangent map to a block of tangent vectors without forming it.

    The perturbation ``(δθ, δv)`` is pushed through the linearised update itself::

        δg = (H + wd·I) δθ;  δv' = μ δv + (1 − τ) δg;  δθ' = δθ − γ δv'  (Nesterov: δθ − γ(δg + μ δv'))

    which equals ``sgd_tangent_map(H, sgd) @ tangents`` at the cost of one Hessian-matrix product.

    Args:
        hvp: Hessian-matrix product of the loss (without weight decay), ``(N, k) → (N, k)``, e.g.
            ``HessianOperator.matmat``. Pass weight decay either here or in the operator, not both.
        tangents: ``(N, k)`` or ``(N,)`` when μ = 0; with μ > 0, ``(2N, k)`` or ``(2N,)`` stacking
            ``(δθ, δv)``.
        sgd: the update (``sgd.at_first_step()`` for torch's first momentum step).

    Returns:
        The mapped tangents, same shape as ``tangents``.
    """
    vector = tangents.ndim == 1
    y = tangents.unsqueeze(1) if vector else tangents
    if sgd.momentum == 0:
        d_theta, d_buf = y, None
    else:
        if y.shape[0] % 2:
            raise ValueError(f"with momentum the tangents stack (δθ, δv) and need 2N rows, got {y.shape[0]}")
        d_theta, d_buf = y.chunk(2, dim=0)
    d_grad = hvp(d_theta)
    if sgd.weight_decay:
        d_grad = d_grad + sgd.weight_decay * d_theta
    if d_buf is None:
        out = d_theta - sgd.lr * d_grad
    else:
        d_buf_new = sgd.momentum * d_buf + (1.0 - sgd.dampening) * d_grad
        step = d_grad + sgd.momentum * d_buf_new if sgd.nesterov else d_buf_new
        out = torch.cat([d_theta - sgd.lr * step, d_buf_new], dim=0)
    return out.squeeze(1) if vector else out
