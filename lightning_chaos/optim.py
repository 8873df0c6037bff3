"""CGD: chaos-aware gradient descent as a wrapper around the update of any optimizer.

Herrmann, Granz and Landgraf, "Chaotic Dynamics are Intrinsic to Neural Network Training with SGD"
(NeurIPS 2022), appendix A.7. The optimizer imports only the numerical core: in Lightning the callback
:class:`~lightning_chaos.CGDCurvature` hands it each step's curvature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.params import flatten, unflatten
from lightning_chaos.core.pruning import METHODS, STRATEGIES, removal_basis
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.stability import EXACT_EDGE_TOLERANCE
from lightning_chaos.core.step_curvature import StepCurvature
from lightning_chaos.core.validation import check_choice, check_int, check_number

__all__ = ["CGD"]

_MISSING_CURVATURE = (
    "CGD.step() needs the Hessian of this step's batch and none was set. Lightning: add "
    "lightning_chaos.CGDCurvature() to the Trainer's callbacks. Plain PyTorch: call "
    "optimizer.set_curvature(FunctionalLoss(model, lambda: loss_fn(model(x), y))) before every "
    "optimizer.step() (see the CGD docstring)."
)


class CGD(Optimizer):
    r"""Chaos-aware gradient descent: the base optimizer's update with chosen Hessian eigendirections removed.

    Each step the base optimizer computes its update ``Δθ = θ' − θ`` as usual (its own rule, momentum,
    weight decay, state); CGD then replaces it by the projection

    .. math:: \Delta\tilde\theta = P\,\Delta\theta, \qquad P = I - V V^\top,

    where the orthonormal columns of ``V`` are the eigenvectors of the current batch's Hessian ``H(θ)``
    selected by ``strategy`` (:func:`~lightning_chaos.core.pruning.select_directions`):

    * ``"chaotic"``: positive local Lyapunov exponent, ``h̃ < 0`` or ``h̃ > u``;
    * ``"negative"``: negative curvature, ``h̃ < 0``;
    * ``"positive"``: curvature beyond the stability edge, ``h̃ > u``;
    * ``"positive_curvature"``: every direction of positive curvature, ``h̃ > 0`` (not a chaos criterion:
      ``0 < h̃ < u`` is stable). It is the reading of the paper's "pruning of the full positive spectrum"
      under which its claims can hold: in its own runs the count above ``2/γ`` is "effectively zero", so
      ``"positive"`` would leave them plain SGD (see ``examples/cgd_divergence.md``);

    with ``h̃ = h + wd`` and ``u = 2/γ`` for plain SGD (the momentum, dampening and Nesterov boundaries of
    :func:`~lightning_chaos.core.stability.stability_interval` otherwise). γ, μ, τ and wd are read from the
    base optimizer's param groups at every refresh (so LR schedulers are followed); for a base other than
    ``torch.optim.SGD`` the plain-SGD boundary ``2/lr`` is used (the LLE criterion is derived for SGD; with
    Adam & co. only ``"negative"`` keeps its exact meaning). Edge directions (within ``tolerance`` of 0 or
    u, e.g. the exact zeros of ReLU networks) are never removed.

    The update is written as ``θ_new = θ' − V (Vᵀ Δθ)`` (equal to ``θ + PΔθ``; when nothing is removed θ'
    is left exactly as the base optimizer wrote it).

    **Momentum buffer.** The parameter update is ``PΔθ`` in every case. What happens to the base's state:

    * ``project_momentum=True`` (default) and a ``torch.optim.SGD`` base with momentum: the buffer
      ``v' = μ v + (1 − τ)(g + wd θ)`` is projected too, ``v' ← P v'``, so it stays the velocity actually
      taken (heavy ball: ``θ_new − θ = −γ P v'`` and the stored buffer is ``P v'``). The removed directions
      are then removed from the dynamics: only the next gradients bring them back, as in plain CGD.
    * ``project_momentum=False``, and every other base optimizer (Adam's moments are gradient statistics,
      not a velocity): the state is left exactly as the base wrote it. With SGD momentum the components of
      the velocity along removed directions then stay in the buffer and re-enter the update on the next
      steps, whose batches select slightly different directions (the per-batch eigenvectors rotate): the
      pruning leaks (measured in ``examples/cgd_divergence.md``).

    **Methods.** ``"exact"``: dense Hessian and ``eigh`` (``O(N²)`` memory, ``O(N³)`` time: up to a few
    thousand parameters per step on a CPU); with ``k`` set, at most the ``k`` largest and the ``k`` most
    negative of the selected eigenvalues are removed, else all selected directions (the paper's
    "full spectrum" pruning). ``"lanczos"``: ``k`` extreme Ritz pairs from one Lanczos run on exact
    Hessian-vector products (``"chaotic"``: top-k and bottom-k; ``"positive"`` and ``"positive_curvature"``:
    top-k; ``"negative"``: bottom-k), of which only those meeting the criterion are removed; the start
    vector is drawn from CGD's own generator (``seed``), never from the global one.

    **Cost control.** ``every_n_steps``: the directions are recomputed on every n-th step and the last ones
    are reused (projected out again) on the steps in between.

    **Lightning** (two lines: the optimizer, and the callback that hands CGD each step's Hessian)::

        def configure_optimizers(self):
            return CGD(torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9), strategy="chaotic")

        trainer = Trainer(callbacks=[lightning_chaos.CGDCurvature()])

    ``CGD.step(closure)`` runs the closure first (forward, backward and the callbacks'
    ``on_before_optimizer_step``, where :class:`~lightning_chaos.CGDCurvature` sets the curvature), then the
    base step and the projection. The Hessian is the shared per-step curvature of the chaos callbacks
    (:class:`~lightning_chaos.core.step_curvature.StepCurvature`): DDP-averaged, and computed once per
    step even with a ``LyapunovSpectrumMonitor`` in the same Trainer. LR schedulers
    (``StepLR(cgd, ...)``), ``LearningRateMonitor`` (reads the base through :attr:`optimizer`), gradient
    clipping and checkpoints work as with the base optimizer. With
    LightningCLI pass the base as a callable (``optimizer: {class_path: lightning_chaos.CGD, init_args:
    {base: {class_path: torch.optim.SGD, init_args: {lr: 0.1}}, strategy: chaotic}}``).

    **Plain PyTorch**::

        opt = CGD(torch.optim.SGD(model.parameters(), lr=0.1), strategy="negative")
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.set_curvature(FunctionalLoss(model, lambda: loss_fn(model(x), y)))
            opt.step()

    (with dropout, capture the random state before the forward pass, ``rng = RNGState.capture()``, and
    pass ``rng_state=rng`` so the Hessian sees the step's dropout masks). A step without curvature raises
    a ``RuntimeError`` saying what to add. Closure-driven base optimizers (``LBFGS``) are not supported:
    the base is stepped without a closure.

    Args:
        params: the base optimizer whose update is projected (``CGD(torch.optim.SGD(...))``), or the
            parameters the ``base`` callable builds it on (the form LightningCLI's ``optimizer:`` key uses,
            which passes the model's parameters first).
        strategy: ``"chaotic"``, ``"negative"``, ``"positive"`` or ``"positive_curvature"``.
        method: ``"exact"`` or ``"lanczos"``.
        k: directions per end of the spectrum (required for ``"lanczos"``; ``None`` with ``"exact"``
            removes every selected direction).
        every_n_steps: recompute the directions on every n-th step, reuse them in between.
        tolerance: edge half-width relative to the spectral radius (see
            :func:`~lightning_chaos.core.stability.classify_eigenvalues`).
        seed: seed of CGD's own generator (Lanczos start vectors).
        base: factory ``params -> Optimizer``, used when ``params`` are parameters.
        project_momentum: also project a ``torch.optim.SGD`` momentum buffer (see above); no effect on
            other base optimizers.

    Attributes:
        optimizer: the base optimizer (``param_groups``, ``state`` and ``defaults`` are its own objects).
        num_steps: steps taken.
        last_removed: number of directions removed from the last update.
        last_update_ratio: ``‖PΔθ‖ / ‖Δθ‖`` of the last update (1.0 when nothing was removed).
        removed_eigenvalues: Hessian eigenvalues of the directions currently removed, ``(r,)``.

    Raises:
        TypeError: no base optimizer, or a base that is itself a CGD.
        ValueError: an argument outside its allowed values (the message names it).

    Example:
        >>> from lightning_chaos import CGD
        >>> from lightning_chaos.core.functional_loss import FunctionalLoss
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> opt = CGD(torch.optim.SGD(model.parameters(), lr=0.1), strategy="positive_curvature")
        >>> loss = lambda: ((model(x) - y) ** 2).mean()
        >>> opt.zero_grad(); loss().backward()
        >>> opt.set_curvature(FunctionalLoss(model, loss))
        >>> _ = opt.step()
        >>> opt.last_removed, round(opt.last_update_ratio, 4)  # least squares: all curvature is positive
        (4, 0.0)
    """

    def __init__(
        self,
        params: Optimizer | Iterable[Any],
        strategy: Literal["chaotic", "negative", "positive", "positive_curvature"] = "chaotic",
        method: Literal["exact", "lanczos"] = "exact",
        k: int | None = None,
        every_n_steps: int = 1,
        tolerance: float = EXACT_EDGE_TOLERANCE,
        seed: int = 0,
        base: Callable[[Iterable[Any]], Optimizer] | None = None,
        project_momentum: bool = True,
    ) -> None:
        if isinstance(params, Optimizer):
            if base is not None:
                raise ValueError("pass either a base optimizer or parameters with `base`, not both")
            optimizer = params
        elif base is not None:
            optimizer = base(params)
        else:
            raise TypeError(
                "CGD wraps a base optimizer: CGD(torch.optim.SGD(model.parameters(), lr=...)) or "
                "CGD(model.parameters(), base=functools.partial(torch.optim.SGD, lr=...)); "
                f"got {type(params).__name__}"
            )
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, CGD):
            raise TypeError(f"the base must be a torch.optim.Optimizer other than CGD, got {type(optimizer)}")
        self.strategy = check_choice("strategy", strategy, STRATEGIES)
        self.method = check_choice("method", method, METHODS)
        self.k = None if k is None else check_int("k", k)
        if method == "lanczos" and k is None:
            raise ValueError("method='lanczos' needs k (the number of extreme eigenpairs per end)")
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        self.tolerance = check_number("tolerance", tolerance, 0.0, high_open=True)
        self.optimizer = optimizer
        self.project_momentum = bool(project_momentum)
        self.num_steps = 0
        self.last_removed = 0
        self.last_update_ratio = 1.0
        self.removed_eigenvalues = torch.empty(0)
        self._basis: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._curvature: StepCurvature | None = None
        # The Optimizer machinery (step hooks, profiling) without creating param groups of its own: those are
        # the base's (properties below). __setstate__ is torch's own initialiser of exactly that machinery.
        Optimizer.__setstate__(self, {})

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's param groups (schedulers and callbacks that write ``lr`` act on the base)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        """The base optimizer's per-parameter state (e.g. SGD's momentum buffers)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The base optimizer's defaults."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def set_curvature(self, curvature: FunctionalLoss | StepCurvature) -> None:
        """Provide the loss of the coming step's batch at the current parameters (consumed by the next step).

        Cheap: nothing is computed until the step needs the directions (refresh steps only).

        Args:
            curvature: a :class:`~lightning_chaos.core.functional_loss.FunctionalLoss` of the batch (plain
                PyTorch), or the step's shared :class:`~lightning_chaos.core.step_curvature.StepCurvature`
                (what :class:`~lightning_chaos.CGDCurvature` passes, so the
                eigendecomposition is shared with the other chaos callbacks of the step).
        """
        if isinstance(curvature, FunctionalLoss):
            curvature = StepCurvature(curvature)
        if not isinstance(curvature, StepCurvature):
            raise TypeError(
                f"curvature must be a FunctionalLoss or a StepCurvature, got {type(curvature).__name__}"
            )
        self._curvature = curvature

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegate to the base optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Delegate to the base optimizer (the new parameters must be in the curvature's loss as well)."""
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (if any), the base step, and project its update.

        Args:
            closure: re-evaluates the loss and its gradient (Lightning passes one that also runs the
                callbacks' ``on_before_optimizer_step``); called with gradients enabled, before the base step.

        A closure that returns ``None`` and leaves no gradient is Lightning's skipped batch
        (``training_step`` returned ``None``: Lightning skips backward but still calls ``step``). There is
        no update to project then: nothing is stepped or projected (not even a momentum buffer), no
        curvature is needed, and the step is not counted.

        Returns:
            The closure's return value (``None`` without closure).

        Raises:
            RuntimeError: no curvature was set for this step (the message says what to add).
            FloatingPointError: the batch Hessian has NaN/inf entries (typically a diverged loss); the
                parameters are left as they were before the step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        curvature, self._curvature = self._curvature, None
        if closure is not None and loss is None and not self._has_gradients():
            return None  # a skipped batch: the base step would change nothing (no gradient)
        if curvature is None:
            raise RuntimeError(_MISSING_CURVATURE)
        params = curvature.loss.params
        self._check_parameters(params)
        if self.num_steps % self.every_n_steps == 0 or self._basis is None:
            self._basis, self.removed_eigenvalues = self._directions(curvature)
        basis = self._basis.to(device=params[0].device, dtype=params[0].dtype)
        if basis.shape[0] != curvature.loss.dim:
            raise RuntimeError(
                f"CGD's stored directions span {basis.shape[0]} parameters but the curvature has "
                f"{curvature.loss.dim}: the set of trainable parameters changed"
            )
        ratio = 1.0
        with torch.no_grad():
            before = [p.clone() for p in params] if basis.shape[1] else None
            self.optimizer.step()
            if before is not None:
                delta = flatten([p - b for p, b in zip(params, before, strict=True)])
                removed = basis @ (basis.T @ delta)
                for p, piece in zip(params, unflatten(removed, params), strict=True):
                    p.sub_(piece)
                if self.project_momentum and isinstance(self.optimizer, torch.optim.SGD):
                    self._project_buffers(params, basis)
                norm = torch.linalg.vector_norm(delta)
                ratio = float(torch.linalg.vector_norm(delta - removed) / norm) if norm > 0 else 1.0
        self.num_steps += 1
        self.last_removed = basis.shape[1]
        self.last_update_ratio = ratio
        return loss

    def hyperparameters(self) -> SGDHyperparameters:
        """γ, μ, τ, Nesterov and wd that define the chaos criterion, read from the base's param groups now.

        Returns:
            All five for a ``torch.optim.SGD`` base
            (:meth:`~lightning_chaos.core.sgd.SGDHyperparameters.from_optimizer`); for any other base its
            shared learning rate with μ = τ = wd = 0 (plain-SGD boundary ``2/lr``).

        Raises:
            ValueError: param groups with different values (SGD: any of the five; others: ``lr``), or values
                the SGD formulas do not cover (e.g. ``maximize=True``).
        """
        if isinstance(self.optimizer, torch.optim.SGD):
            return SGDHyperparameters.from_optimizer(self.optimizer)
        rates = {float(g["lr"]) for g in self.param_groups if g["params"]}
        if len(rates) != 1:
            raise ValueError(f"CGD needs one learning rate shared by all param groups, got {sorted(rates)}")
        return SGDHyperparameters(lr=rates.pop())

    def _has_gradients(self) -> bool:
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    def _project_buffers(self, params: list[Tensor], basis: Tensor) -> None:
        """``v ← v − V (Vᵀ v)`` for SGD's momentum buffers of ``params`` (a missing buffer counts as zero)."""
        owner = {p.data_ptr(): p for group in self.param_groups for p in group["params"]}
        buffers = [self.state.get(owner[q.data_ptr()], {}).get("momentum_buffer") for q in params]
        if all(b is None for b in buffers):
            return  # momentum 0: SGD keeps no buffer
        flat = flatten(
            [torch.zeros_like(q) if b is None else b for b, q in zip(buffers, params, strict=True)]
        )
        pieces = unflatten(basis @ (basis.T @ flat), params)
        for buffer, piece in zip(buffers, pieces, strict=True):
            if buffer is not None:
                buffer.sub_(piece)

    def _check_parameters(self, params: list[Tensor]) -> None:
        """The curvature's parameters must be parameters of the base optimizer (same storage)."""
        owned = {p.data_ptr() for group in self.param_groups for p in group["params"]}
        foreign = sum(1 for p in params if p.numel() and p.data_ptr() not in owned)
        if foreign:
            raise ValueError(
                f"{foreign} parameter tensor(s) of the curvature's loss are not in the base optimizer; "
                "build the FunctionalLoss over the optimizer's parameters (params=...)"
            )

    def _directions(self, curvature: StepCurvature) -> tuple[Tensor, Tensor]:
        """Orthonormal basis ``V`` ``(N, r)`` of the directions to remove, and their eigenvalues ``(r,)``."""
        try:
            return removal_basis(
                curvature,
                self.hyperparameters(),
                self.strategy,
                self.method,
                self.k,
                self.tolerance,
                self._generator,
            )
        except FloatingPointError as err:
            raise FloatingPointError(f"CGD step {self.num_steps}: {err}") from err

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus CGD's own entry ``"cgd"`` (counters, directions, generator).

        Returns:
            A standard optimizer state dict (``"state"``, ``"param_groups"``) with the extra key ``"cgd"``.
        """
        state = self.optimizer.state_dict()
        state["cgd"] = {
            "num_steps": self.num_steps,
            "basis": None if self._basis is None else self._basis.clone(),
            "removed_eigenvalues": self.removed_eigenvalues.clone(),
            "generator": self._generator.get_state(),
            "last_removed": self.last_removed,
            "last_update_ratio": self.last_update_ratio,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a base state dict without ``"cgd"`` restarts CGD's counters).

        Args:
            state_dict: the saved state.
        """
        state = dict(state_dict)
        own = state.pop("cgd", None)
        self.optimizer.load_state_dict(state)
        if own is None:
            return
        self.num_steps = int(own["num_steps"])
        self._basis = None if own["basis"] is None else own["basis"].clone()
        self.removed_eigenvalues = own["removed_eigenvalues"].clone()
        self._generator.set_state(own["generator"].cpu())
        self.last_removed = int(own["last_removed"])
        self.last_update_ratio = float(own["last_update_ratio"])

    def __getstate__(self) -> dict[str, Any]:
        """Everything but a pending curvature (which references a model and a batch)."""
        return {**self.__dict__, "_curvature": None}

    def __repr__(self) -> str:
        k = "" if self.k is None else f", k={self.k}"
        return (
            f"CGD(strategy={self.strategy!r}, method={self.method!r}{k}, every_n_steps={self.every_n_steps}) "
            f"over {self.optimizer!r}"
        )
