"""Flat views of parameter lists: the vector space θ ∈ R^N that every core routine works in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


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
    """
    trailing = tuple(vector.shape[1:])
    pieces = torch.split(vector, [t.numel() for t in like])
    return [p.reshape(*t.shape, *trailing).to(t.dtype) for p, t in zip(pieces, like, strict=True)]


def num_params(tensors: Iterable[Tensor]) -> int:
    """Total number of entries ``N`` of a list of tensors."""
    return sum(t.numel() for t in tensors)
