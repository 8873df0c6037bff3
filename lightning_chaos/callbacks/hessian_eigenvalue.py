"""HessianEigenvalueMonitor: the largest Hessian eigenvalue of every training step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer
from typing_extensions import override

from lightning_chaos.callbacks._base import SKIPPED, ProbeCallback, log_values
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.callbacks._checks import int_arg, number_arg
from lightning_chaos.core.controlled_lyapunov import CurvatureEstimate, HessianEigenEstimator
from lightning_chaos.core.step_curvature import StepCurvature


class HessianEigenvalueMonitor(ProbeCallback):
    r"""Log the top Hessian eigenvalue(s) of every training step from the controlled Lyapunov iteration.

    At each computed step, in ``on_before_optimizer_step`` (after the backward pass, before clipping and
    before ``optimizer.step``), the monitor runs ``n_iter`` iterations of the controlled Lyapunov iteration
    at the current parameters θ on the current batch, warm-started from the previous step's
    direction. With gradient reuse one iteration costs one extra gradient (``top_k`` for top-k, plus one
    for ``most_negative``). The first computed step also runs a bounded warm-up at that point, because a
    random direction needs tens of iterations to align with the top eigenvector.

    The loss probed is ``pl_module.curvature_loss(batch)`` when the module defines it (it must return the
    same scalar loss that ``training_step`` optimises, without logging or metric updates), otherwise
    ``pl_module.training_step(batch, batch_idx)`` with ``self.log`` muted (metric objects updated inside
    ``training_step`` would then count the batch twice: define ``curvature_loss`` to avoid that).

    Training is not changed by a single bit: parameters are swapped functionally, buffers (BatchNorm
    statistics) are cloned, gradients come from ``torch.autograd.grad`` (``p.grad`` untouched), and the
    random state of the training step is replayed for the probe (same dropout masks) and restored.

    Logged per computed step to every logger of the trainer, at Lightning's logging step, under
    ``log_prefix`` (default ``chaos/``), and put in ``trainer.callback_metrics``:

    - ``h0``: largest eigenvalue from the Lyapunov exponent, :math:`(e^{\lambda} - 1)/\beta`;
    - ``h0_rayleigh``: Rayleigh quotient :math:`q^\top (g(\theta+q) - g(\theta)) / \lVert q\rVert^2`;
    - ``h0_residual``: Ritz residual :math:`\lVert Hu - \rho u\rVert`: an exact eigenvalue lies within it;
    - ``lyapunov_exponent`` (λ, controlled to ≈ 1), ``beta`` (β; the paper's ``1/β`` is ``h0/(e−1)``),
      ``inv_h0`` (``1/h0``), ``lyapunov_fluctuation`` (recent mean ``|λ − 1|``: small once settled);
    - ``h_top{i}`` for ``i < top_k`` (Rayleigh–Ritz values, descending);
    - ``h_min``, ``h_min_rayleigh`` with ``most_negative=True``;
    - ``skipped_steps`` (steps whose probe gave NaN/inf or ``λ ≤ 0``: nothing else is logged for them);
    - ``warmup_iters`` once, at the warm-up step.

    Finite size: ``g(θ + q) − g(θ)`` is ``Hq`` only up to ``O(Δq²)`` (exact for quadratic losses); for ReLU
    networks ``delta_q = 5e-2`` biases h0 by a few to tens of percent (see ``benchmarks/README.md``).

    Args:
        every_n_steps: compute on optimizer steps whose ``global_step`` is a multiple of this; the
            direction and β carry over unchanged across the steps in between.
        n_iter: iterations per computed step (each ``top_k`` (+1) gradients).
        top_k: number of top eigenvalues (Benettin block with Rayleigh–Ritz).
        most_negative: also estimate the most negative eigenvalue (shifted iteration, +1 gradient).
        delta_q: probe separation Δq > 0.
        relative_delta_q: use ``delta_q · ‖θ‖`` as the separation.
        warmup_iters: bound on the warm-up iterations at the first computed step (0 disables it).
        warmup_tol: warm-up stops once ``|λ − 1|`` and the relative change of h0 stay below this.
        probe_fraction: share of the batch the probe uses, in ``(0, 1]``; below 1 the gradient at θ is
            recomputed on that share (cheaper iterations, noisier estimate of the full-batch Hessian).
        reuse_gradient: use the training gradient ``p.grad`` as ``g(θ)`` when it is exactly that
            (automatic optimization, no accumulation, full batch). Set False if another callback placed
            before this one edits ``p.grad``.
        seed: seed of the probe's own random directions (never the global generator).
        window: steps averaged in ``lyapunov_fluctuation``.
        log_prefix: prefix of the logged keys (use distinct prefixes for several monitors).

    Attributes:
        latest: the :class:`~lightning_chaos.core.lyapunov.CurvatureEstimate` of the last computed step
            (``None`` before it); other callbacks read it.
        skipped_steps: number of computed steps whose estimate was invalid.
        warmup_iterations: iterations spent in the warm-up (``None`` until it ran).
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        n_iter: int = 1,
        top_k: int = 1,
        most_negative: bool = False,
        delta_q: float = 5e-2,
        relative_delta_q: bool = False,
        warmup_iters: int = 100,
        warmup_tol: float = 1e-2,
        probe_fraction: float = 1.0,
        reuse_gradient: bool = True,
        seed: int = 0,
        window: int = 20,
        log_prefix: str = "chaos/",
    ) -> None:
        self.every_n_steps = int_arg("every_n_steps", every_n_steps)
        self.n_iter = int_arg("n_iter", n_iter)
        self.top_k = int_arg("top_k", top_k)
        self.window = int_arg("window", window)
        self.delta_q = number_arg("delta_q", delta_q, 0.0, low_open=True, high_open=True)
        self.warmup_tol = number_arg("warmup_tol", warmup_tol, 0.0, low_open=True, high_open=True)
        self.probe_fraction = number_arg("probe_fraction", probe_fraction, 0.0, 1.0, low_open=True)
        self.warmup_iters = int_arg("warmup_iters", warmup_iters, minimum=0)
        self.most_negative = bool(most_negative)
        self.relative_delta_q = bool(relative_delta_q)
        self.reuse_gradient = bool(reuse_gradient)
        self.seed = int(seed)
        self.log_prefix = log_prefix
        self._estimator = HessianEigenEstimator(
            top_k=self.top_k,
            most_negative=self.most_negative,
            delta_q=self.delta_q,
            relative_delta_q=self.relative_delta_q,
            seed=self.seed,
            window=self.window,
        )
        self.latest: CurvatureEstimate | None = None
        self.skipped_steps = 0
        self.warmup_iterations: int | None = None
        self._last_curvature: StepCurvature | None = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Estimate (and log) the curvature of this step before the optimizer moves θ."""
        self.estimate(trainer, pl_module)

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CurvatureEstimate | None:
        """The estimate of the current optimizer step, computed and logged at most once per step.

        Other callbacks (e.g. :class:`InverseCurvatureLR`) call this from their own
        ``on_before_optimizer_step``: whichever runs first pays for the probe.

        Returns:
            The step's estimate (``valid=False`` for a skipped step), or ``None`` on a step that
            ``every_n_steps`` leaves out.
        """
        if trainer.global_step % self.every_n_steps != 0:
            return None
        curvature = step_curvature(trainer, pl_module, fraction=self.probe_fraction)
        if curvature is self._last_curvature:
            return self.latest
        self._last_curvature = curvature
        values: dict[str, float | None] = {}
        try:
            estimate = self._estimate(curvature, values)
        except SKIPPED as err:
            self.skip(trainer, err)
            estimate = CurvatureEstimate(valid=False)
        else:
            if not estimate.valid:
                self.skipped_steps += 1
        self.latest = estimate
        if estimate.valid:
            values.update(self._loggable(estimate))
        values["skipped_steps"] = self.skipped_steps
        log_values(trainer, values, self.log_prefix)
        return estimate

    def _estimate(self, curvature: StepCurvature, values: dict[str, float | None]) -> CurvatureEstimate:
        loss = curvature.loss
        spent = loss.num_gradients
        reuse = self.reuse_gradient or not curvature.reuses_gradient
        g0 = curvature.g0() if reuse else loss.gradient()
        spent = loss.num_gradients - spent  # g(θ), when it is not the training gradient
        if self.warmup_iterations is None and self.warmup_iters > 0:
            self.warmup_iterations, _ = self._estimator.warmup(
                loss, g0=g0, max_iters=self.warmup_iters, tol=self.warmup_tol
            )
            values["warmup_iters"] = self.warmup_iterations
        estimate = self._estimator.step(loss, g0=g0, n_iter=self.n_iter)
        estimate.num_gradients += spent
        return estimate

    def _loggable(self, estimate: CurvatureEstimate) -> dict[str, float | None]:
        values: dict[str, float | None] = {
            "h0": estimate.h0,
            "h0_rayleigh": estimate.h0_rayleigh,
            "h0_residual": estimate.h0_residual,
            "lyapunov_exponent": estimate.lyapunov_exponent,
            "beta": estimate.beta,
            "inv_h0": 1.0 / estimate.h0,
            "lyapunov_fluctuation": estimate.fluctuation,
        }
        values.update({f"h_top{i}": h for i, h in enumerate(estimate.top)})
        if self.most_negative:
            values.update(h_min=estimate.h_min, h_min_rayleigh=estimate.h_min_rayleigh)
        return values

    @override
    def state_dict(self) -> dict[str, Any]:
        """Directions, β, generator and counters: a resumed run logs what the uninterrupted one would."""
        return {
            "estimator": self._estimator.state_dict(),
            "skipped_steps": self.skipped_steps,
            "warmup_iterations": self.warmup_iterations,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._estimator.load_state_dict(state_dict["estimator"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.warmup_iterations = state_dict["warmup_iterations"]
