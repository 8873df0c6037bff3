"""The loss of one fixed batch as a function of the parameters, evaluated without touching the model.

Every curvature routine needs ``L(θ + q; B)`` and ``g(θ + q; B)`` for perturbations ``q`` while the model
keeps training. :class:`FunctionalLoss` provides them with three guarantees:

* the model is never mutated: parameters are swapped in with :func:`torch.func.functional_call` and
  buffers (BatchNorm running statistics) are replaced by clones, so in-place buffer updates hit copies;
* the random stream of the training step is replayed (dropout masks of the probe equal those of the step)
  and the caller's random stream is restored afterwards;
* gradients come from :func:`torch.autograd.grad` with respect to fresh leaf tensors, so ``p.grad`` and
  any gradient hooks (DDP's all-reduce) are never touched; a ``reduce`` callable averages them instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_chaos.core.params import filled, flatten, num_params, trainable_parameters, unflatten

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

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run a block from this snapshot's random state, then restore the state found on entry."""
        with torch.random.fork_rng(devices=list(range(len(self.cuda)))):
            torch.set_rng_state(self.cpu)
            for index, state in enumerate(self.cuda):
                torch.cuda.set_rng_state(state, index)
            yield


class _Call(nn.Module):
    """Wraps ``module`` so that :func:`functional_call` can reparametrise it around an arbitrary closure."""

    def __init__(self, module: nn.Module, compute: Callable[[], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.compute = compute

    def forward(self) -> Tensor:
        return self.compute()


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
    ) -> None:
        named = list(params) if params is not None else trainable_parameters(module)
        if not named:
            raise ValueError("FunctionalLoss: the module has no parameters with requires_grad=True.")
        self.names = [name for name, _ in named]
        self.params = [p.detach() for _, p in named]
        self._wrapper = _Call(module, compute)
        # Every name under which a tensor is reachable (tied weights share one tensor under several names),
        # resolved once here so that each evaluation can call functional_call with tie_weights=False: its
        # own tie resolution walks the whole module on every call, the dominant overhead for small models.
        aliases: dict[int, list[str]] = {}
        for name, tensor in module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(tensor), []).append(f"module.{name}")
        self._param_keys = [aliases.get(id(p), [f"module.{n}"]) for n, p in named]
        buffer_aliases: dict[int, tuple[list[str], Tensor]] = {}
        for name, tensor in module.named_buffers(remove_duplicate=False):
            buffer_aliases.setdefault(id(tensor), ([], tensor))[0].append(f"module.{name}")
        self._buffers = [] if update_buffers else list(buffer_aliases.values())
        self.rng_state = rng_state
        self.context = context or contextlib.nullcontext
        self.loss_scale = float(loss_scale)
        self.reduce = reduce
        self.vectorize = vectorize
        self.num_gradients = 0

    @property
    def dim(self) -> int:
        """Number ``N`` of trainable parameter entries."""
        return num_params(self.params)

    def theta(self) -> Tensor:
        """Return the current point θ as a flat vector ``(N,)``."""
        return flatten(self.params)

    def __call__(self, params: Sequence[Tensor]) -> Tensor:
        """Evaluate ``L`` at the given parameter tensors.

        Args:
            params: tensors shaped like :attr:`params` (may require grad or carry vmap/jvp levels).

        Returns:
            The scalar loss, a 0-dim tensor.

        Raises:
            NoLossError: the closure returned ``None`` (or a dict without a loss).
            ValueError: if the closure does not return a scalar tensor.
        """
        mapping = {key: t for keys, t in zip(self._param_keys, params) for key in keys}
        for keys, buffer in self._buffers:
            copy = buffer.clone()  # in-place updates (BatchNorm running stats) hit the copy
            mapping.update(dict.fromkeys(keys, copy))
        replay = self.rng_state.replay() if self.rng_state is not None else contextlib.nullcontext()
        with replay, self.context():
            loss = torch.func.functional_call(self._wrapper, mapping, (), tie_weights=False)
        if isinstance(loss, dict):
            loss = loss.get("loss")
        if loss is None:
            raise NoLossError("the loss closure returned None (a training_step that skips its batch)")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"The curvature loss must be a scalar tensor, got {shape}.")
        return loss.reshape(())

    def _grad(self, perturbation: Sequence[Tensor] | None) -> list[Tensor]:
        if perturbation is None:
            leaves = [p.detach().requires_grad_() for p in self.params]
        else:
            leaves = [(p + dq).requires_grad_() for p, dq in zip(self.params, perturbation)]
        with torch.enable_grad():
            loss = self(leaves)
            if self.loss_scale != 1.0:
                loss = loss * self.loss_scale
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return filled(grads, leaves)

    def _finish(self, flat: Tensor, count: int) -> Tensor:
        self.num_gradients += count
        if self.loss_scale != 1.0:
            flat = flat / self.loss_scale
        return self.reduce(flat) if self.reduce is not None else flat

    def gradient(self, q: Tensor | None = None) -> Tensor:
        """Gradient ``g(θ + q)`` of the fixed batch.

        Args:
            q: perturbation ``(N,)``; ``None`` means ``q = 0``.

        Returns:
            Flat gradient ``(N,)``, reduced across ranks when ``reduce`` is set. Counts one gradient.
        """
        pieces = None if q is None else unflatten(q.detach(), self.params)
        return self._finish(flatten(self._grad(pieces)).detach(), 1)

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
                return self._finish(self._vmapped(perturbations), k)
            except Exception:  # noqa: BLE001 - any vmap limitation of user code means: use the loop
                self.vectorize = False
        columns = [flatten(self._grad(unflatten(perturbations[:, j], self.params))) for j in range(k)]
        return self._finish(torch.stack(columns, dim=1).detach(), k)

    def _vmapped(self, perturbations: Tensor) -> Tensor:
        def grad_at(column: Tensor) -> Tensor:
            def scaled_loss(pieces: list[Tensor]) -> Tensor:
                loss = self([p + dq for p, dq in zip(self.params, pieces)])
                return loss * self.loss_scale if self.loss_scale != 1.0 else loss

            return flatten(torch.func.grad(scaled_loss)(unflatten(column, self.params)))

        # randomness="same": each vmapped column draws the dropout mask of the unbatched call, which the
        # replayed random state makes identical to the training step's.
        return torch.func.vmap(grad_at, in_dims=1, out_dims=1, randomness="same")(perturbations)
