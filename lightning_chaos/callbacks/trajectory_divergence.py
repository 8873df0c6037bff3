"""TrajectoryDivergence: perturbed twins trained on the main run's batches.

The experiment of Herrmann, Granz and Landgraf, "Chaotic Dynamics are Intrinsic to Neural Network Training
with SGD" (NeurIPS 2022), appendix A.8–A.10: how far a copy of the model perturbed along chosen Hessian
eigendirections drifts from the run.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_chaos.callbacks._base import ProbeCallback, log_values
from lightning_chaos.callbacks._batch import (
    BatchRecord,
    current_record,
    loss_closure,
    skipped_backward,
    step_curvature,
)
from lightning_chaos.callbacks._checks import choice_arg, int_arg, number_arg, sgd_of, single_optimizer
from lightning_chaos.core.divergence import (
    DIRECTIONS,
    SPECTRAL_DIRECTIONS,
    default_init_distance,
    fit_divergence,
    random_walk_distance,
    sampled_init_distances,
    twin_directions,
)
from lightning_chaos.core.functional_loss import FunctionalLoss, NoLossError
from lightning_chaos.core.params import flatten, trainable_parameters, unflatten
from lightning_chaos.core.stability import EXACT_EDGE_TOLERANCE
from lightning_chaos.core.step_curvature import StepCurvature
from lightning_chaos.optim import CGD


class TrajectoryDivergence(ProbeCallback):
    r"""Train perturbed twins of the model on exactly the main run's batches and log how far they drift.

    At the first optimizer step each twin is a copy of the LightningModule (and of its optimizer, state
    included) moved to ``θ_twin(0) = θ(0) + ε u`` with a unit direction u (``directions``):

    * ``max_chaotic`` / ``max_non_chaotic``: the Hessian eigenvector with the largest / smallest local
      Lyapunov exponent of the update (``log|1 − γh|`` for plain SGD; momentum, dampening, Nesterov and weight
      decay as in :func:`~lightning_chaos.core.stability.local_lyapunov_exponents`);
    * ``chaotic`` / ``non_chaotic``: a uniformly random unit vector in the span of the chaotic eigenvectors
      (positive LLE) / of all the others (stable and edge: the complement, as the paper counts them);
    * ``random``: a uniformly random unit vector of R^N.

    The eigendecomposition is the exact one of the first batch's Hessian at θ(0) (dense ``eigh``, shared
    with the other chaos callbacks of that step): ``O(N²)`` memory and ``O(N³)`` time, so directions other
    than ``random`` are limited to ``max_exact_params`` parameters. (The paper took the eigenspaces saved at
    the end of a previous run; the local ones at the start are what this callback can know.) The random
    draws use the callback's own generator (``seed``).

    Every step, in ``on_before_optimizer_step`` (after the main backward pass, before the main update), each
    twin takes the step the main run takes, on the same batch and with the same dropout masks: its loss is
    ``curvature_loss(batch)`` (or ``training_step`` with logging muted) evaluated on the twin with the
    random state of the main training step replayed (and the caller's state restored afterwards), its
    gradient comes from ``torch.autograd.grad`` on the twin (DDP-averaged like the main one), the
    Trainer's gradient clipping is applied, and its optimizer (a copy of the main one, whose current
    hyper-parameters are copied over first, so LR schedulers apply to the twins too) steps. A CGD main
    optimizer gives CGD twins, each projecting with its own batch Hessian. The main run is not changed by
    a single bit (no parameter, gradient, buffer, optimizer state or random number of it is touched).

    BatchNorm: a twin has its own buffers (running statistics), updated by its own forward passes.

    Logged (``log_prefix`` + key):

    - every step t (the number of updates taken so far, at Lightning's step of that batch):
      ``divergence/{direction}`` = ``‖θ_twin(t) − θ(t)‖`` (``t = 0`` gives ε) and
      ``divergence/random_walk_bound`` = ``√(2TD)σ`` with T = t (see below); after the last step the final
      distances at ``t = T``;
    - once at the start: ``divergence/init_distance`` (analytic,
      :func:`~lightning_chaos.core.divergence.default_init_distance`, when every layer's default
      initialisation is known) and
      ``divergence/init_distance_sampled`` (root mean square over ``init_samples`` re-initialised pairs):
      the distance of two independently initialised copies, the scale a perturbation must reach to be
      "as different as another seed" (the paper's A.8 reports ≈ 6.38 for a 784-20-10 MLP; the right value
      is ≈ 4.51, see :mod:`lightning_chaos.core.divergence`). A model with a parameter that no
      submodule's ``reset_parameters()`` re-draws gets no sampled baseline (warned), the run goes on;
    - at the end of training: ``divergence_fit/{direction}_a`` and ``_b`` of the least-squares fit
      ``d(t) = √(a²t² + bt)`` (A.10), ``divergence_fit/sigma`` and ``divergence_fit/random_walk_bound``.

    The random-walk bound (A.9) models the two runs as independent random walks with isotropic
    per-coordinate step deviation σ; σ is estimated from the main run's own updates,
    ``σ² = Σ_t ‖Δθ_t‖² / (T D)``, so the bound is ``√(2 Σ_t ‖Δθ_t‖²)``: the distance if the twins' steps
    were uncorrelated. :attr:`results` holds all end-of-training numbers.

    A twin whose distance turns NaN/inf (its loss diverged) or whose CGD meets a non-finite Hessian is
    marked in :attr:`diverged` and no longer stepped or logged (the main run goes on); its fit uses the
    distances before that point. A batch whose ``training_step`` returned ``None`` (Lightning skips it: the
    main run does not move) is skipped by the twins too: nothing is logged for it, it is counted in
    ``skipped_steps`` (warned once) and t counts the updates actually taken.

    Not supported (clear error): gradient accumulation, manual optimization, fp16 with a loss scaler,
    several optimizers, sharded strategies.

    Args:
        epsilon: perturbation size ε > 0 (the paper's 0.1).
        directions: any of ``"max_chaotic"``, ``"chaotic"``, ``"random"``, ``"non_chaotic"``,
            ``"max_non_chaotic"``; one twin each.
        seed: seed of the random directions and of the initialisation samples.
        tolerance: edge half-width of the chaotic/stable classification (``classify_eigenvalues``).
        init_samples: pairs of re-initialised copies for ``init_distance_sampled`` (0: skip).
        max_exact_params: largest N for which the exact eigendecomposition is attempted.
        log_prefix: prefix of the logged keys.

    Attributes:
        distances: ``{direction: [d(0), d(1), …]}``.
        perturbations: ``{direction: u}`` flat unit directions ``(N,)`` of this run's twins.
        direction_lle: ``{direction: LLE}`` of the eigenvector directions (``max_*``).
        diverged: directions whose twin diverged.
        init_distance: analytic baseline (``None`` when unknown or not computed yet).
        init_distance_sampled: sampled baseline (``None`` when not computed).
        results: end-of-training summary (``fit``: ``{direction: (a, b)}``, ``sigma``, ``random_walk_bound``,
            ``final``: ``{direction: d(T)}``, ``num_steps``: T, ``num_params``: D).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_chaos import TrajectoryDivergence
        >>> twins = TrajectoryDivergence(epsilon=0.1, directions=["random", "max_chaotic"])
        >>> trainer = pl.Trainer(callbacks=[twins], logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        directions: Sequence[str] = DIRECTIONS,
        seed: int = 0,
        tolerance: float = EXACT_EDGE_TOLERANCE,
        init_samples: int = 32,
        max_exact_params: int = 5000,
        log_prefix: str = "chaos/",
    ) -> None:
        self.epsilon = number_arg("epsilon", epsilon, 0.0, low_open=True, high_open=True)
        if isinstance(directions, str) or not directions:
            raise MisconfigurationException(f"`directions` must be a non-empty list of {DIRECTIONS}.")
        self.directions = tuple(dict.fromkeys(choice_arg("directions", d, DIRECTIONS) for d in directions))
        self.seed = int(seed)
        self.tolerance = number_arg("tolerance", tolerance, 0.0, high_open=True)
        self.init_samples = int_arg("init_samples", init_samples, minimum=0)
        self.max_exact_params = int_arg("max_exact_params", max_exact_params)
        self.log_prefix = log_prefix
        self.distances: dict[str, list[float]] = {}
        self.perturbations: dict[str, Tensor] = {}
        self.direction_lle: dict[str, float] = {}
        self.init_distance: float | None = None
        self.init_distance_sampled: float | None = None
        self.results: dict[str, Any] = {}
        self.diverged: set[str] = set()
        self._twins: dict[str, tuple[pl.LightningModule, Optimizer]] = {}
        self._stash: dict[str, Any] | None = None
        self._update_sq_sum = 0.0
        self._num_updates = 0
        self._theta_before: Tensor | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reject set-ups in which a twin cannot take exactly the main run's step."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        owner = type(self).__name__
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{owner} needs automatic optimization (the twins replay its step)."
            )
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"{owner} does not support gradient accumulation (accumulate_grad_batches)."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise MisconfigurationException(
                f"{owner} does not support fp16 with a loss scaler (skipped steps); use 32 or bf16 precision."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One optimizer only; write the TensorBoard layout."""
        single_optimizer(trainer, type(self).__name__)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Log ``d(t)``, then take this step with every twin (the main run's update follows)."""
        if skipped_backward(trainer, pl_module):  # training_step returned None: the run takes no step either
            self.skip(trainer, NoLossError("training_step returned None: Lightning skipped this batch"))
            return
        values: dict[str, float] = {}
        if not self._twins:
            values.update(self._start(trainer, pl_module, optimizer))
        theta = _flat_trainable(pl_module)
        self._theta_before = theta
        values.update(self._record_distances(theta))
        values["divergence/random_walk_bound"] = math.sqrt(2.0 * self._update_sq_sum)
        log_values(trainer, values, self.log_prefix)
        record = current_record(trainer)
        curvature = step_curvature(trainer, pl_module)
        for name, (module, twin_optimizer) in self._twins.items():
            if name in self.diverged:
                continue
            try:
                self._step_twin(trainer, module, twin_optimizer, optimizer, record, curvature)
            except (
                FloatingPointError
            ) as err:  # a CGD twin met a non-finite Hessian: the twin is lost, not the run
                rank_zero_warn(
                    f"TrajectoryDivergence: twin {name!r} diverged ({err}); it is no longer stepped."
                )
                self.diverged.add(name)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Accumulate the main update ``‖Δθ_t‖²`` for the random-walk bound."""
        if self._theta_before is None:
            return
        self._update_sq_sum += float((_flat_trainable(pl_module) - self._theta_before).double().pow(2).sum())
        self._num_updates += 1
        self._theta_before = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Final distances ``d(T)``, the fits ``√(a²t² + bt)`` and the random-walk bound."""
        if not self._twins:
            return
        theta = _flat_trainable(pl_module)
        values = self._record_distances(theta)
        dim = theta.numel()
        steps = self._num_updates
        sigma = math.sqrt(self._update_sq_sum / (steps * dim)) if steps else 0.0
        bound = (
            random_walk_distance(steps, dim, sigma) if math.isfinite(sigma) else math.nan
        )  # main run diverged
        candidates = {name: _fit_finite_prefix(d) for name, d in self.distances.items()}
        fits = {name: ab for name, ab in candidates.items() if ab is not None}
        self.results = {
            "fit": fits,
            "sigma": sigma,
            "random_walk_bound": bound,
            "final": {name: d[-1] for name, d in self.distances.items()},
            "num_steps": steps,
            "num_params": dim,
        }
        values["divergence/random_walk_bound"] = bound
        values["divergence_fit/sigma"] = sigma
        values["divergence_fit/random_walk_bound"] = bound
        for name, (a, b) in fits.items():
            values[f"divergence_fit/{name}_a"] = a
            values[f"divergence_fit/{name}_b"] = b
        log_values(trainer, values, self.log_prefix)

    # ------------------------------------------------------------------------------------------------------

    def _record_distances(self, theta: Tensor) -> dict[str, float]:
        values = {}
        for name, (module, _) in self._twins.items():
            d = math.nan
            if name not in self.diverged:
                d = float(torch.linalg.vector_norm((_flat_trainable(module) - theta).double()))
            if not math.isfinite(d):
                self.diverged.add(name)
            self.distances.setdefault(name, []).append(d)
            values[f"divergence/{name}"] = d
        return values

    def _start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> dict[str, float]:
        """Build the twins: perturbed copies at the first step, or the checkpointed ones after a resume."""
        if self._stash is not None:
            for name, saved in self._stash["twins"].items():
                module = _copy_module(pl_module)
                module.load_state_dict(saved["module"])
                twin_optimizer = _clone_optimizer(optimizer, pl_module, module)
                twin_optimizer.load_state_dict(saved["optimizer"])
                self._twins[name] = (module, twin_optimizer)
            self._stash = None
            return {}
        values: dict[str, float] = {}
        try:
            self.init_distance = default_init_distance(pl_module)
            values["divergence/init_distance"] = self.init_distance
        except ValueError as err:
            rank_zero_warn(f"TrajectoryDivergence: no analytic init distance ({err}).")
        if self.init_samples:
            try:
                samples = sampled_init_distances(pl_module, self.init_samples, self.seed)
            except ValueError as err:  # a parameter no reset_parameters() re-draws: the baseline is an extra
                rank_zero_warn(
                    f"TrajectoryDivergence: no sampled init distance ({err}); the twins run anyway."
                )
            else:
                self.init_distance_sampled = float(samples.pow(2).mean().sqrt())
                values["divergence/init_distance_sampled"] = self.init_distance_sampled
        theta = _flat_trainable(pl_module)
        for name, u in self._perturbations(trainer, pl_module, optimizer, theta.numel()).items():
            module = _copy_module(pl_module)
            with torch.no_grad():
                params = [p for _, p in trainable_parameters(module)]
                for p, piece in zip(
                    params, unflatten(theta + self.epsilon * u.to(theta), params), strict=True
                ):
                    p.copy_(piece)
            self._twins[name] = (module, _clone_optimizer(optimizer, pl_module, module))
            self.perturbations[name] = u
        return values

    def _perturbations(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, dim: int
    ) -> dict[str, Tensor]:
        """Unit directions ``(N,)`` (float64) per requested direction, from the first batch's spectrum."""
        sgd = eigenpairs = None
        spectral = sorted(SPECTRAL_DIRECTIONS.intersection(self.directions))
        if spectral:
            if dim > self.max_exact_params:
                raise MisconfigurationException(
                    f"TrajectoryDivergence: directions {spectral} need the exact Hessian eigendecomposition, "
                    f"limited to max_exact_params={self.max_exact_params} parameters (the model has {dim}); "
                    "use directions=['random'] or raise the limit."
                )
            sgd = (
                optimizer.hyperparameters()
                if isinstance(optimizer, CGD)
                else sgd_of(optimizer, "TrajectoryDivergence")
            )
            eigenpairs = step_curvature(trainer, pl_module).eigh()
        generator = torch.Generator().manual_seed(self.seed)
        found = twin_directions(self.directions, dim, generator, sgd, eigenpairs, self.tolerance)
        for name in found.empty:
            rank_zero_warn(
                f"TrajectoryDivergence: no {name} eigendirections at the first step; twin skipped."
            )
        self.direction_lle.update(found.lle)
        return found.vectors

    def _step_twin(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        twin_optimizer: Optimizer,
        optimizer: Optimizer,
        record: BatchRecord,
        curvature: StepCurvature,
    ) -> None:
        """One update of a twin on the recorded batch, with the main step's random state and settings."""
        for twin_group, group in zip(twin_optimizer.param_groups, optimizer.param_groups, strict=True):
            twin_group.update({k: v for k, v in group.items() if k != "params"})
        named = trainable_parameters(module)
        compute = loss_closure(module, record.batch, record.batch_idx)
        functional = functools.partial(
            FunctionalLoss,
            module,
            compute,
            named,
            rng_state=record.rng,
            context=curvature.loss.context,
            reduce=curvature.loss.reduce,
        )
        # the twin's own forward: its BatchNorm statistics update, as the main model's do in training_step
        gradient = functional(update_buffers=True).gradient()
        params = [p for _, p in named]
        for p, g in zip(params, unflatten(gradient, params), strict=True):
            p.grad = g.clone()
        if trainer.gradient_clip_val:
            algorithm = GradClipAlgorithmType(trainer.gradient_clip_algorithm or "norm")
            trainer.precision_plugin.clip_gradients(twin_optimizer, trainer.gradient_clip_val, algorithm)
        if isinstance(twin_optimizer, CGD):
            twin_optimizer.set_curvature(functional())
        twin_optimizer.step()
        twin_optimizer.zero_grad(set_to_none=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Twins (parameters, buffers, optimizer states), distances and accumulators: resume is exact."""
        if self._stash is not None:
            twins = self._stash["twins"]
        else:
            twins = {
                name: {
                    "module": {k: v.detach().clone() for k, v in module.state_dict().items()},
                    "optimizer": copy.deepcopy(twin_optimizer.state_dict()),
                }
                for name, (module, twin_optimizer) in self._twins.items()
            }
        return {
            "twins": twins,
            "distances": {name: list(d) for name, d in self.distances.items()},
            "perturbations": {name: u.clone() for name, u in self.perturbations.items()},
            "direction_lle": dict(self.direction_lle),
            "init_distance": self.init_distance,
            "init_distance_sampled": self.init_distance_sampled,
            "diverged": sorted(self.diverged),
            "update_sq_sum": self._update_sq_sum,
            "num_updates": self._num_updates,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the twins are rebuilt at the next optimizer step."""
        self._stash = {"twins": state_dict["twins"]} if state_dict["twins"] else None
        self._twins = {}
        self.distances = {name: list(d) for name, d in state_dict["distances"].items()}
        self.perturbations = dict(state_dict["perturbations"])
        self.direction_lle = dict(state_dict["direction_lle"])
        self.init_distance = state_dict["init_distance"]
        self.init_distance_sampled = state_dict["init_distance_sampled"]
        self.diverged = set(state_dict["diverged"])
        self._update_sq_sum = float(state_dict["update_sq_sum"])
        self._num_updates = int(state_dict["num_updates"])


def _fit_finite_prefix(distances: list[float]) -> tuple[float, float] | None:
    """:func:`fit_divergence` of the distances before the first non-finite one (``None`` below two)."""
    finite = []
    for d in distances:
        if not math.isfinite(d):
            break
        finite.append(d)
    return fit_divergence(finite) if len(finite) >= 2 else None


def _flat_trainable(module: nn.Module) -> Tensor:
    return flatten([p.detach() for _, p in trainable_parameters(module)]).clone()


def _copy_module(pl_module: pl.LightningModule) -> pl.LightningModule:
    """An independent copy of the module (parameters, buffers, submodules); the Trainer is not copied."""
    return copy.deepcopy(pl_module)


def _clone_optimizer(optimizer: Optimizer, source: nn.Module, target: nn.Module) -> Optimizer:
    """The same optimizer (class, hyper-parameters, deep-copied state) over ``target``'s parameters.

    Args:
        optimizer: the main optimizer (a CGD is cloned as a CGD over a clone of its base).
        source: the module whose parameters ``optimizer`` holds.
        target: a copy of ``source`` (parameters matched by position).

    Returns:
        The twin's optimizer.

    Raises:
        MisconfigurationException: the optimizer holds tensors that are not parameters of ``source``, or
            its class cannot be rebuilt from ``(param_groups, **defaults)``.
    """
    mapping = dict(zip(source.parameters(), target.parameters(), strict=True))
    if isinstance(optimizer, CGD):
        twin: Optimizer = CGD(
            _clone_optimizer(optimizer.optimizer, source, target),
            optimizer.strategy,
            optimizer.method,
            optimizer.k,
            optimizer.every_n_steps,
            optimizer.tolerance,
            project_momentum=optimizer.project_momentum,
        )
    else:
        try:
            groups = [{**g, "params": [mapping[p] for p in g["params"]]} for g in optimizer.param_groups]
        except KeyError:
            raise MisconfigurationException(
                "TrajectoryDivergence: the optimizer holds tensors that are not parameters of the module."
            ) from None
        try:
            twin = type(optimizer)(groups, **optimizer.defaults)
        except TypeError as err:
            raise MisconfigurationException(
                f"TrajectoryDivergence cannot copy {type(optimizer).__name__} for the twins: {err}"
            ) from err
    # deep copy: load_state_dict keeps tensors that already match, so the twin would share the buffers
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin
