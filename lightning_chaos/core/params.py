"""The parameter space θ ∈ R^N that every core routine works in: trainable parameters and flat views.

A model's trainable parameters are the tensors with ``requires_grad`` (frozen ones are not part of θ);
vectors of R^N are their entries concatenated in ``named_parameters()`` order (:func:`flatten`), and a
flat vector splits back into tensors shaped like the parameters (:func:`unflatten`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["filled", "flatten", "num_params", "trainable_parameters", "unflatten"]


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs that span θ: every parameter with ``requires_grad``, in order.

    Args:
        module: the model.

    Returns:
        The pairs of ``module.named_parameters()`` (tied parameters once) that require a gradient.
    """
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def filled(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    """Replace missing entries by zeros shaped like their counterpart.

    ``torch.autograd.grad(..., allow_unused=True)`` returns ``None`` for a parameter the loss does not
    depend on; its gradient (and Hessian block) is zero.

    Args:
        tensors: gradients (or any per-parameter tensors), ``None`` where absent.
        like: the parameters, one per entry of ``tensors``.

    Returns:
        The tensors with every ``None`` replaced by ``torch.zeros_like`` of its parameter.
    """
    return [torch.zeros_like(p) if t is None else t for t, p in zip(tensors, like, strict=True)]


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector.

    Args:
        tensors: tensors of any shapes, on one device and of one dtype.

    Returns:
        Tensor of shape ``(N,)`` with ``N = Σ t.numel()``.
    """
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector (or a batch of them) into tensors shaped like ``like``.

    Args:
        vector: shape ``(N,)`` or ``(N, k)``; with a trailing ``k`` each piece keeps it as its last dim.
        like: reference tensors that fix the shapes (and dtypes) of the pieces.

    Returns:
        Views (casts where dtypes differ) of ``vector``; piece ``i`` has shape ``like[i].shape``
        (or ``like[i].shape + (k,)``).

    Example:
        >>> pieces = unflatten(torch.arange(5.0), [torch.zeros(2), torch.zeros(1, 3)])
        >>> [tuple(p.shape) for p in pieces]
        [(2,), (1, 3)]
    """
    trailing = tuple(vector.shape[1:])
    pieces = torch.split(vector, [t.numel() for t in like])
    return [p.reshape(*t.shape, *trailing).to(t.dtype) for p, t in zip(pieces, like, strict=True)]


def num_params(tensors: Iterable[Tensor]) -> int:
    """Total number of entries ``N`` of a list of tensors."""
    return sum(t.numel() for t in tensors)
