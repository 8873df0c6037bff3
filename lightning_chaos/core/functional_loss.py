"""The loss of one fixed batch as a function of the parameters, evaluated without touching the model.

Every curvature routine needs ``L(θ + q; B)`` and ``g(θ + q; B)`` for perturbations ``q`` while the model
keeps training. :class:`FunctionalLoss` provides them with three guarantees:

* the model is never mutated: parameters are swapped into the slots they are registered in (what
  :func:`torch.func.functional_call` does, with the slots found once per model:
  :class:`~lightning_chaos.core.params.ModuleLayout`) and buffers (BatchNorm running statistics) are
  replaced by clones, so in-place buffer updates hit copies;
* the random stream of the training step is replayed (dropout masks of the probe equal those of the step)
  and the caller's random stream is restored afterwards;
* gradients come from :func:`torch.autograd.grad` with respect to fresh leaf tensors, so ``p.grad`` and
  any gradient hooks (DDP's all-reduce) are never touched; a ``reduce`` callable averages them instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import Tensor, nn

from lightning_chaos.core.params import ModuleLayout, Slot, filled, flatten, unflatten

__all__ = ["FunctionalLoss", "NoLossError", "RNGState"]


class NoLossError(Exception):
    """The loss closure returned ``None``: there is no loss of this batch (Lightning's skipped batch).

    A ``training_step`` that returns ``None`` tells Lightning to skip the batch; a curvature callback
    that probes it skips the step as well (and counts it) instead of failing.
    """


@dataclass(frozen=True)
class RNGState:
    """Snapshot of the torch CPU generator and of every initialised CUDA generator.

    Example:
        >>> state = RNGState.capture()
        >>> first = torch.rand(2)
        >>> with state.replay():
        ...     again = torch.rand(2)
        >>> torch.equal(first, again)
        True
    """

    cpu: Tensor
    cuda: tuple[Tensor, ...] = ()

    @classmethod
    def capture(cls) -> RNGState:
        """Snapshot the current global generators (CUDA only where CUDA is initialised)."""
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def replay(self) -> contextlib.AbstractContextManager[None]:
        """Run a block from this snapshot's random state, then restore the state found on entry."""
        return _Replay(self)


_NO_REPLAY = contextlib.nullcontext()


class _Replay:
    """The context manager of :meth:`RNGState.replay` (plain ``get``/``set`` of the generators' states)."""

    __slots__ = ("cpu", "cuda", "snapshot")

    def __init__(self, snapshot: RNGState) -> None:
        self.snapshot = snapshot
        self.cpu = snapshot.cpu
        self.cuda: list[Tensor] = []

    def __enter__(self) -> None:
        self.cuda = [torch.cuda.get_rng_state(index) for index in range(len(self.snapshot.cuda))]
        self.cpu = torch.get_rng_state()
        torch.set_rng_state(self.snapshot.cpu)
        for index, state in enumerate(self.snapshot.cuda):
            torch.cuda.set_rng_state(state, index)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in enumerate(self.cuda):
            torch.cuda.set_rng_state(state, index)


def _slots(module: nn.Module, layout: ModuleLayout, name: str, tensor: Tensor) -> list[Slot]:
    """Where a parameter of θ is registered in ``module``: by identity (all its tied names), else by name."""
    try:
        return layout.slots(tensor)
    except KeyError:
        owner, _, key = name.rpartition(".")
        submodule = module.get_submodule(owner)
        mapping = submodule._parameters if key in submodule._parameters else submodule._buffers
        if key not in mapping:
            raise ValueError(f"FunctionalLoss: {name!r} is no parameter or buffer of the module") from None
        return [(mapping, key)]


class FunctionalLoss:
    """``L(θ; B)`` on a fixed batch as a pure function of the trainable parameters.

    ``compute`` is a zero-argument closure that evaluates the scalar loss of the batch by calling
    ``module`` (for example ``lambda: model.curvature_loss(batch)``). While it runs, the module's
    trainable parameters are replaced by the tensors passed in and its buffers by clones.

    Args:
        module: the model whose parameters define θ.
        compute: closure returning the scalar loss; it must use ``module`` (not a copy of it).
        params: the parameters that span θ, in order. Default: every parameter with ``requires_grad``.
        rng_state: random state to replay before every evaluation (so dropout masks match the step that
            captured it). ``None`` leaves the random stream alone.
        context: factory of a context manager entered around every evaluation (e.g. autocast).
        loss_scale: gradients are taken of ``loss_scale · L`` and divided by it again (fp16 loss scaling:
            keeps small gradients from underflowing in half-precision backward passes).
        reduce: applied to every flat gradient (e.g. an all-reduce mean across data-parallel ranks), so
            ``g`` is the gradient of the global batch.
        vectorize: batch the ``k`` gradients of :meth:`gradients` with :func:`torch.func.vmap`. Falls back
            to a loop (and sets ``vectorize=False``) when the model cannot be vmapped, e.g. BatchNorm in
            training mode, or a loss that calls ``.item()``.
        update_buffers: let the evaluations update the module's own buffers in place (BatchNorm running
            statistics), as a training forward pass does, instead of working on clones. For stepping a
            copy of a model (a perturbed twin), never for probing the model being trained.
        layout: ``ModuleLayout.of(module)`` when the caller has it (saves checking it again).

    Raises:
        ValueError: if there are no trainable parameters.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> x, y = torch.ones(4, 2), torch.zeros(4, 1)
        >>> loss = FunctionalLoss(model, lambda: ((model(x) - y) ** 2).mean())
        >>> g = loss.gradient()  # g(θ) as a flat vector; the model and its .grad are untouched
        >>> loss.dim, tuple(g.shape), model.weight.grad is None
        (3, (3,), True)
    """

    def __init__(
        self,
        module: nn.Module,
        compute: Callable[[], Tensor],
        params: Sequence[tuple[str, nn.Parameter]] | None = None,
        *,
        rng_state: RNGState | None = None,
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        loss_scale: float = 1.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        vectorize: bool = True,
        update_buffers: bool = False,
        layout: ModuleLayout | None = None,
    ) -> None:
        layout = layout or ModuleLayout.of(module)
        named = list(params) if params is not None else layout.trainable
        if not named:
            raise ValueError("FunctionalLoss: the module has no parameters with requires_grad=True.")
        self.names = [name for name, _ in named]
        self.params = [p.detach() for _, p in named]
        self._compute = compute
        # every slot a parameter is registered in (tied weights: several), then every buffer's slots: an
        # evaluation swaps its tensors into them and puts the originals back
        slots = [_slots(module, layout, name, p) for name, p in named]
        self._owners = [index for index, these in enumerate(slots) for _ in these]
        self._buffers = [] if update_buffers else layout.buffers
        self._targets = [slot for these in slots for slot in these]
        self._targets += [slot for these, _ in self._buffers for slot in these]
        self._sizes = [p.numel() for p in self.params]
        self._dim = sum(self._sizes)
        self.rng_state = rng_state
        self.context = context or contextlib.nullcontext
        self.loss_scale = float(loss_scale)
        self.reduce = reduce
        self.vectorize = vectorize
        self.num_gradients = 0

    @property
    def dim(self) -> int:
        """Number ``N`` of trainable parameter entries."""
        return self._dim

    def theta(self) -> Tensor:
        """Return the current point θ as a flat vector ``(N,)``."""
        return flatten(self.params)

    def __call__(self, params: Sequence[Tensor]) -> Tensor:
        """Evaluate ``L`` at the given parameter tensors.

        Args:
            params: tensors shaped like ``self.params`` (may require grad or carry vmap/jvp levels).

        Returns:
            The scalar loss, a 0-dim tensor.

        Raises:
            NoLossError: the closure returned ``None`` (or a dict without a loss).
            ValueError: if the closure does not return a scalar tensor.
        """
        tensors = [params[i] for i in self._owners]
        for slots, buffer in self._buffers:
            copy = buffer.clone()  # in-place updates (BatchNorm running stats) hit the copy
            tensors += [copy] * len(slots)
        originals = [mapping[key] for mapping, key in self._targets]
        replay = self.rng_state.replay() if self.rng_state is not None else _NO_REPLAY
        try:
            for (mapping, key), tensor in zip(self._targets, tensors):
                mapping[key] = tensor
            with replay, self.context():
                loss = self._compute()
        finally:
            for (mapping, key), original in zip(self._targets, originals):
                mapping[key] = original
        if isinstance(loss, dict):
            loss = loss.get("loss")
        if loss is None:
            raise NoLossError("the loss closure returned None (a training_step that skips its batch)")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"The curvature loss must be a scalar tensor, got {shape}.")
        return loss if loss.ndim == 0 else loss.reshape(())

    def _grad(self, q: Tensor | None) -> list[Tensor]:
        """``g(θ + q)`` of the scaled loss, tensor by tensor (not yet divided by ``loss_scale``)."""
        if q is None:
            leaves = [p.detach().requires_grad_() for p in self.params]
        else:
            leaves = [leaf.requires_grad_() for leaf in torch._foreach_add(self.params, self._pieces(q))]
        with torch.enable_grad():
            loss = self(leaves)
            if self.loss_scale != 1.0:
                loss = loss * self.loss_scale
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return filled(grads, leaves)

    def _pieces(self, vector: Tensor) -> list[Tensor]:
        """Views of a flat ``(N,)`` vector shaped like the parameters."""
        return [
            piece.view(p.shape) if piece.dtype == p.dtype else piece.reshape(p.shape).to(p.dtype)
            for piece, p in zip(vector.detach().split_with_sizes(self._sizes), self.params, strict=True)
        ]

    def gradient(self, q: Tensor | None = None, relative_to: Sequence[Tensor] | None = None) -> Tensor:
        """Gradient ``g(θ + q)`` of the fixed batch, or its difference ``g(θ + q) − g_ref`` from a reference.

        Args:
            q: perturbation ``(N,)``; ``None`` means ``q = 0``.
            relative_to: ``g_ref`` as tensors shaped like ``self.params`` (e.g. the training gradients
                ``p.grad``, which are ``g(θ)``), subtracted tensor by tensor: the numerator of a finite
                difference without a flat copy of ``g_ref``.

        Returns:
            Flat ``(N,)``, reduced across ranks when ``reduce`` is set (before ``g_ref`` is subtracted), a
            new tensor the caller may modify in place. Counts one gradient.
        """
        grads: list[Tensor] | tuple[Tensor, ...] = self._grad(q)
        self.num_gradients += 1
        if self.loss_scale != 1.0:
            grads = torch._foreach_div(grads, self.loss_scale)
        if self.reduce is not None:
            flat = self.reduce(flatten(grads))
            return flat if relative_to is None else flat - flatten(relative_to)
        if relative_to is not None:
            grads = torch._foreach_sub(grads, list(relative_to))
        return flatten(grads)

    def gradients(self, perturbations: Tensor) -> Tensor:
        """Gradients at ``k`` perturbed points, ``G[:, j] = g(θ + Q[:, j])``.

        Args:
            perturbations: ``Q`` of shape ``(N, k)``.

        Returns:
            ``G`` of shape ``(N, k)``. Counts ``k`` gradients (vmap batches them into one pass).
        """
        perturbations = perturbations.detach()
        k = perturbations.shape[1]
        if self.vectorize and k > 1:
            try:
                flat = self._vmapped(perturbations)
            except Exception:  # noqa: BLE001 - any vmap limitation of user code means: use the loop
                self.vectorize = False
            else:
                return self._finish(flat, k)
        columns = [flatten(self._grad(perturbations[:, j])) for j in range(k)]
        return self._finish(torch.stack(columns, dim=1), k)

    def _finish(self, flat: Tensor, count: int) -> Tensor:
        self.num_gradients += count
        if self.loss_scale != 1.0:
            flat = flat / self.loss_scale
        return self.reduce(flat) if self.reduce is not None else flat

    def _vmapped(self, perturbations: Tensor) -> Tensor:
        def grad_at(column: Tensor) -> Tensor:
            def scaled_loss(pieces: list[Tensor]) -> Tensor:
                loss = self([p + dq for p, dq in zip(self.params, pieces)])
                return loss * self.loss_scale if self.loss_scale != 1.0 else loss

            return flatten(torch.func.grad(scaled_loss)(unflatten(column, self.params)))

        # randomness="same": each vmapped column draws the dropout mask of the unbatched call, which the
        # replayed random state makes identical to the training step's.
        return torch.func.vmap(grad_at, in_dims=1, out_dims=1, randomness="same")(perturbations)
