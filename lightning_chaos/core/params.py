"""The parameter space θ ∈ R^N that every core routine works in: trainable parameters and flat views.

A model's trainable parameters are the tensors with ``requires_grad`` (frozen ones are not part of θ);
vectors of R^N are their entries concatenated in ``named_parameters()`` order (:func:`flatten`), and a
flat vector splits back into tensors shaped like the parameters (:func:`unflatten`).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModuleLayout", "Slot", "filled", "flatten", "num_params", "trainable_parameters", "unflatten"]

_REQUIRES_GRAD = operator.attrgetter("requires_grad")

Slot = tuple[dict[str, Any], str]
"""Where a tensor is registered (the ``_parameters`` or ``_buffers`` dict of a submodule, and its key)."""


class ModuleLayout:
    """Where every parameter and buffer of a module is registered, found by one walk and then cached.

    What a probe needs to evaluate a module at other parameters — the names and order of the trainable
    parameters, every name under which a tied tensor is registered, the buffers and their aliases, the
    submodules — does not change from one training step to the next, but walking ``named_parameters()``,
    ``named_buffers()`` and ``modules()`` again costs, on a small model, a good part of a gradient.
    :meth:`of` builds the layout once per module and afterwards checks, without walking, that nothing it
    was built from changed: every submodule's ``_parameters``, ``_buffers`` and ``_modules`` dicts hold the
    same entries in the same order, and every parameter has the same ``requires_grad``. Any change (a
    layer frozen or unfrozen, a module replaced, a weight tied, a buffer reassigned, the model moved with
    parameters replaced) builds a new layout, so a layout is always what a fresh walk would give.

    Args:
        module: the model.

    Attributes:
        parameters: ``module.named_parameters()`` (tied parameters once, under their first name).
        trainable: those of them with ``requires_grad``: the parameters that span θ.
        buffers: every distinct buffer with the slots it is registered in (several when shared).
        cache: what consumers derive from the layout (keys are the consumers' own); a new layout starts
            empty, so nothing derived from an outdated layout survives it.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> net[1].weight = net[0].weight
        >>> layout = ModuleLayout.of(net)
        >>> [name for name, _ in layout.trainable], len(layout.slots(net[0].weight))
        (['0.weight', '0.bias', '1.bias'], 2)
        >>> ModuleLayout.of(net) is layout  # nothing changed: the cached layout
        True
    """

    _cache: weakref.WeakKeyDictionary[nn.Module, ModuleLayout] = weakref.WeakKeyDictionary()

    def __init__(self, module: nn.Module) -> None:
        self.parameters: list[tuple[str, nn.Parameter]] = []
        self.cache: dict[str, Any] = {}
        self._root = weakref.ref(module)  # the cache's value must not keep its key alive
        self._submodules: list[nn.Module] = []
        self._slots: dict[int, list[Slot]] = {}
        buffers: dict[int, tuple[list[Slot], Tensor]] = {}
        visited: set[int] = set()
        self._dicts: list[dict[str, Any]] = []
        # named_modules(remove_duplicate=False) reaches a shared submodule under each of its names, and
        # its first visits come in the order of modules(): names, ties and order as the module reports them
        for prefix, submodule in module.named_modules(remove_duplicate=False):
            first_visit = id(submodule) not in visited
            visited.add(id(submodule))
            if first_visit:
                if submodule is not module:
                    self._submodules.append(submodule)
                self._dicts += [submodule._parameters, submodule._buffers, submodule._modules]
            dot = f"{prefix}." if prefix else ""
            for key, parameter in submodule._parameters.items():
                if parameter is None:
                    continue
                if id(parameter) not in self._slots:
                    self._slots[id(parameter)] = []
                    self.parameters.append((dot + key, parameter))
                if first_visit:
                    self._slots[id(parameter)].append((submodule._parameters, key))
            for key, buffer in submodule._buffers.items():
                if buffer is not None and first_visit:
                    buffers.setdefault(id(buffer), ([], buffer))[0].append((submodule._buffers, key))
        self.trainable = [(name, p) for name, p in self.parameters if p.requires_grad]
        self.buffers = list(buffers.values())
        self._all = [p for _, p in self.parameters]
        self._values = list(chain.from_iterable(map(dict.values, self._dicts)))  # alive: ids stay theirs
        self._signature = self._current()

    def _current(self) -> tuple[list[int], list[str], list[int], list[bool]]:
        """Sizes, keys and entries (by identity) of every dict the layout was built from; the flags."""
        return (
            list(map(len, self._dicts)),
            list(chain.from_iterable(self._dicts)),
            list(map(id, chain.from_iterable(map(dict.values, self._dicts)))),
            list(map(_REQUIRES_GRAD, self._all)),
        )

    @classmethod
    def of(cls, module: nn.Module) -> ModuleLayout:
        """The layout of ``module``: the cached one while nothing it was built from changed, else anew."""
        layout = cls._cache.get(module)
        if layout is None or not layout._unchanged():
            layout = cls._cache[module] = cls(module)
        return layout

    def _unchanged(self) -> bool:
        # entries compared by id: the layout holds every entry it was built from, so no other object can
        # have taken one of their ids
        return self._current() == self._signature

    @property
    def modules(self) -> list[nn.Module]:
        """Every submodule, the module first, each once (what ``module.modules()`` yields)."""
        root = self._root()
        return ([] if root is None else [root]) + self._submodules

    def slots(self, parameter: Tensor) -> list[Slot]:
        """Every slot the parameter is registered in (one per name of a tied parameter).

        Raises:
            KeyError: the tensor is not a parameter of the module.
        """
        return self._slots[id(parameter)]


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs that span θ: every parameter with ``requires_grad``, in order.

    Args:
        module: the model.

    Returns:
        The pairs of ``module.named_parameters()`` (tied parameters once) that require a gradient.
    """
    return list(ModuleLayout.of(module).trainable)


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
