"""HessianEigenvalueMonitor: the largest Hessian eigenvalue of every training step, and if it converged."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer
from typing_extensions import override

from lightning_chaos.callbacks._base import SKIPPED, ProbeCallback, log_values
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.callbacks._checks import int_arg, number_arg
from lightning_chaos.core.controlled_lyapunov import CurvatureEstimate, HessianEigenEstimator, Products
from lightning_chaos.core.step_curvature import StepCurvature

UNCONVERGED_WARNING_SHARE = 0.25
"""Share of unconverged computed steps (after at least 20) above which the monitor warns, once."""


class HessianEigenvalueMonitor(ProbeCallback):
    r"""Log the largest Hessian eigenvalue of every training step, and whether the estimate converged.

    At each computed step, in ``on_before_optimizer_step`` (after the backward pass, before clipping and
    before ``optimizer.step``), the monitor estimates the top eigenvalue h0 of the Hessian of the current
    batch's loss at the current parameters θ with the controlled Lyapunov iteration of "A Chaos Theory
    Approach to Understand Neural Network Optimization" (ICLR 2021 submission), warm-started from the
    previous step's direction and accelerated by Rayleigh–Ritz on the Krylov space its iterates span
    (:mod:`lightning_chaos.core.controlled_lyapunov`): it stops as soon as the relative Ritz residual is
    below ``tol``, after at most ``n_iter`` Hessian products, and spends ``budget`` gradient-equivalents
    per computed step on average (a step may use what earlier, quickly converged steps saved). When the
    batches' top eigenvectors persist (consecutive steps share them) one product per step mostly
    suffices; when they do not, each step needs a Krylov solve of its own and the budget decides how many
    steps converge: ``chaos/h0_converged`` says which. The first computed step runs a warm-up
    instead (up to ``warmup_iters`` products from a random direction), because a random direction needs
    tens of products to align with the top eigenvector; so does the first step after a lost direction.

    Products: by default (``products="auto"``) the warm-up runs on exact Hessian-vector products and then
    compares finite differences ``(g(θ + Δq u) − g(θ))/Δq`` (one gradient each) with exact products
    along its top direction and random ones. Where some Δq keeps their error below ``delta_q_tol`` (in
    units of h0) the steps use finite differences at it, re-checked after ``check_every`` computed steps
    (an interval that doubles, up to four times, while the checks keep the setting); otherwise — ReLU,
    max-pool and BatchNorm kinks crossed within Δq, attention softmax saturating, float32 rounding
    below — they use exact products (double backward, counted as
    :data:`~lightning_chaos.core.controlled_lyapunov.HVP_COST` gradients each) until a check passes. A
    model with no second derivatives (e.g. a custom ``autograd.Function``) keeps finite differences at
    ``delta_q``, unchecked (warned once). ``products="finite_difference"`` with ``n_iter=1`` is the paper's
    method: one gradient per step at a fixed Δq. Measured accuracy and cost of each mode:
    ``benchmarks/README.md``.

    Logged per computed step to every logger of the trainer, at Lightning's logging step, under
    ``log_prefix``, and put in ``trainer.callback_metrics``:

    - ``h0``: the top Ritz value of the step (a lower bound of h0 for exact products);
    - ``h0_converged``: 1 when the relative Ritz residual was below ``tol`` (the warm-up: ``warmup_tol``),
      0 when the step ended at ``n_iter`` products without it. An unconverged h0 is typically low;
    - ``h0_residual``: ``‖Hx − h0 x‖`` of the unit Ritz vector x. An eigenvalue lies within it of h0 —
      the nearest one, not necessarily the largest: it is no error bar of h0;
    - ``h0_lyapunov``: :math:`(e^{\lambda} - 1)/\beta` of the step's first iteration (the paper's estimate;
      the paper itself reported :math:`1/\beta`, which is :math:`h_0/(e - 1)` at the controlled point);
    - ``lyapunov_exponent`` (λ, controlled to ≈ 1), ``beta`` (β), ``inv_h0`` (``1/h0``),
      ``lyapunov_fluctuation`` (recent mean ``|λ − 1|``);
    - ``probe_gradients``: gradients spent on this step (finite differences, ``g(θ)`` when not reused,
      Δq checks, warm-up); ``probe_hvps``: exact Hessian-vector products spent on it; ``probe_cost``:
      both in gradient-equivalents, with the step's gradient graph (what ``budget`` limits);
    - ``delta_q``: the finite-difference separation used (not logged for exact products);
      ``delta_q_error``: the measured relative error of a finite difference at it (check steps only);
    - ``h_top{i}`` for ``i < top_k`` (Ritz values, descending); ``h_min`` with ``most_negative=True``;
    - ``unconverged_steps``, ``skipped_steps`` (running counts; nothing else is logged for a skipped
      step: NaN/inf gradients, a ``training_step`` that returned ``None``);
    - ``warmup_iters``: the products of the warm-up, at the step it ran.

    It warns once per run when more than a quarter of the computed steps did not converge (raise
    ``budget`` and ``n_iter``, or read h0 where it converged), when Δq had to shrink or finite differences
    were abandoned, and when the model has no second derivatives.

    The loss probed is ``pl_module.curvature_loss(batch)`` when the module defines it (it must return the
    same scalar loss that ``training_step`` optimises, without logging), otherwise
    ``pl_module.training_step(batch, batch_idx)`` with ``self.log`` muted; torchmetrics updated inside
    either are restored after every evaluation.

    Training is not changed by a single bit: parameters are swapped functionally, buffers (BatchNorm
    statistics) are cloned, gradients come from ``torch.autograd.grad`` (``p.grad`` untouched), and the
    random state of the training step is replayed for the probe (same dropout masks) and restored.

    Args:
        every_n_steps: compute on optimizer steps whose ``global_step`` is a multiple of this; the
            direction, β and Δq carry over unchanged across the steps in between.
        n_iter: Hessian products per computed step at most, per end of the spectrum (beyond the warm
            directions; 1: the paper's one product per step, no adaptive extension).
        tol: convergence tolerance on the relative Ritz residual ``‖Hx − ρx‖ / |ρ|``.
        budget: mean gradient-equivalents per computed step after the warm-up (``math.inf``: only
            ``n_iter`` bounds a step).
        top_k: number of top eigenvalues (block iteration with Rayleigh–Ritz).
        most_negative: also estimate the most negative eigenvalue (the same iteration on ``−H``; up to
            ``n_iter`` more products).
        products: ``"auto"``, ``"finite_difference"`` or ``"exact"`` (see above).
        delta_q: finite-difference separation Δq > 0 (with ``"auto"``: the largest one tried).
        delta_q_tol: tolerance on the relative error of a finite difference (``"auto"``).
        relative_delta_q: use ``delta_q · ‖θ‖`` as the separation.
        check_every: computed steps between Δq checks (``"auto"``); doubled after each check that kept
            Δq and the choice of products, up to four times, and reset when one changes them.
        warmup_iters: products of the warm-up at most (0 disables it).
        warmup_tol: convergence tolerance of the warm-up.
        block: warm directions carried between steps (default ``top_k``; one more carries the top
            residual, i.e. a Lanczos step of the previous batch, at one more product per step).
        gradient_start: check each converged step against the Krylov space of the batch gradient
            (three finite-difference products, when the step affords them): a warm direction that is an
            eigenvector of a lower eigenvalue of the new batch no longer passes as converged.
        probe_fraction: share of the batch the probe uses, in ``(0, 1]``; below 1 the gradient at θ is
            recomputed on that share (cheaper products, noisier estimate of the full-batch Hessian).
        reuse_gradient: use the training gradient ``p.grad`` as ``g(θ)`` when it is exactly that
            (automatic optimization, no accumulation, full batch). Set False if another callback placed
            before this one edits ``p.grad``.
        seed: seed of the probe's own random directions (never the global generator).
        window: steps averaged in ``lyapunov_fluctuation``.
        log_prefix: prefix of the logged keys (two monitors need different prefixes).

    Attributes:
        latest: the :class:`~lightning_chaos.core.controlled_lyapunov.CurvatureEstimate` of the last
            computed step (``None`` before it); other callbacks read it.
        skipped_steps: number of computed steps skipped.
        unconverged_steps: number of computed steps whose estimate did not converge.
        computed_steps: number of computed steps.
        warmup_iterations: products of the last warm-up (``None`` until it ran).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_chaos import HessianEigenvalueMonitor
        >>> trainer = pl.Trainer(callbacks=[HessianEigenvalueMonitor()], logger=False)
        >>> paper = HessianEigenvalueMonitor(n_iter=1, products="finite_difference", log_prefix="paper/")
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        n_iter: int = 8,
        tol: float = 0.05,
        budget: float = 4.0,
        top_k: int = 1,
        most_negative: bool = False,
        products: Products = "auto",
        delta_q: float = 5e-2,
        delta_q_tol: float = 2e-2,
        relative_delta_q: bool = False,
        check_every: int = 50,
        warmup_iters: int = 100,
        warmup_tol: float = 1e-2,
        probe_fraction: float = 1.0,
        reuse_gradient: bool = True,
        seed: int = 0,
        window: int = 20,
        block: int | None = None,
        gradient_start: bool = True,
        log_prefix: str = "chaos/",
    ) -> None:
        self.every_n_steps = int_arg("every_n_steps", every_n_steps)
        self.probe_fraction = number_arg("probe_fraction", probe_fraction, 0.0, 1.0, low_open=True)
        self.top_k = int_arg("top_k", top_k)
        self.most_negative = bool(most_negative)
        self.reuse_gradient = bool(reuse_gradient)
        self.seed = int(seed)
        self.log_prefix = log_prefix
        try:
            self._estimator = HessianEigenEstimator(
                top_k=self.top_k,
                most_negative=self.most_negative,
                n_iter=n_iter,
                tol=tol,
                budget=budget,
                products=products,
                delta_q=delta_q,
                delta_q_tol=delta_q_tol,
                relative_delta_q=relative_delta_q,
                check_every=check_every,
                warmup_iters=warmup_iters,
                warmup_tol=warmup_tol,
                seed=self.seed,
                window=window,
                block=block,
                gradient_start=gradient_start,
            )
        except ValueError as err:  # the estimator validates the numerical arguments
            raise MisconfigurationException(str(err)) from err
        self.latest: CurvatureEstimate | None = None
        self.skipped_steps = 0
        self.unconverged_steps = 0
        self.computed_steps = 0
        self.warmup_iterations: int | None = None
        self._notices: set[str] = set()
        self._last_curvature: StepCurvature | None = None

    @property
    def warmup_iters(self) -> int:
        """The bound on the warm-up's products (``0`` disables the warm-up)."""
        return self._estimator.warmup_iters

    @property
    def n_iter(self) -> int:
        """The bound on the Hessian products of a computed step."""
        return self._estimator.n_iter

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Estimate (and log) the curvature of this step before the optimizer moves θ."""
        self.estimate(trainer, pl_module)

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CurvatureEstimate | None:
        """The estimate of the current optimizer step, computed and logged at most once per step.

        Other callbacks (e.g. :class:`~lightning_chaos.InverseCurvatureLR`) call this from their own
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
        self.computed_steps += 1
        try:
            estimate = self._estimate(curvature)
        except SKIPPED as err:
            self.skip(trainer, err)
            estimate = CurvatureEstimate(valid=False)
        else:
            if not estimate.valid:
                self.skipped_steps += 1
            elif not estimate.converged:
                self.unconverged_steps += 1
        self.latest = estimate
        values = self._loggable(estimate) if estimate.valid else {}
        values.update(skipped_steps=self.skipped_steps, unconverged_steps=self.unconverged_steps)
        log_values(trainer, values, self.log_prefix)
        self._warn(trainer)
        return estimate

    def _estimate(self, curvature: StepCurvature) -> CurvatureEstimate:
        loss = curvature.loss
        before = loss.num_gradients
        reuse = self.reuse_gradient or not curvature.reuses_gradient
        if reuse:
            curvature.g0_tensors()  # g(θ): the training gradient, or computed here (once per step)
        g0 = None if reuse else loss.gradient()
        extra = loss.num_gradients - before  # g(θ), when this step computed it
        estimate = self._estimator.step(curvature, g0=g0)
        estimate.num_gradients += extra
        estimate.cost += extra
        if estimate.warmup_products:
            self.warmup_iterations = estimate.warmup_products
        return estimate

    def _loggable(self, estimate: CurvatureEstimate) -> dict[str, float | None]:
        values: dict[str, float | None] = {
            "h0": estimate.h0,
            "h0_converged": float(estimate.converged),
            "h0_residual": estimate.h0_residual,
            "h0_lyapunov": estimate.h0_lyapunov,
            "lyapunov_exponent": estimate.lyapunov_exponent,
            "beta": estimate.beta,
            "inv_h0": 1.0 / estimate.h0 if estimate.h0 else None,
            "lyapunov_fluctuation": estimate.fluctuation,
            "probe_gradients": estimate.num_gradients,
            "probe_hvps": estimate.num_hvps,
            "probe_cost": estimate.cost,
            "delta_q": estimate.delta_q,
            "delta_q_error": estimate.delta_q_error,
        }
        if self.top_k > 1:
            values.update({f"h_top{i}": h for i, h in enumerate(estimate.top)})
        if self.most_negative:
            values["h_min"] = estimate.h_min
        if estimate.warmup_products:
            values["warmup_iters"] = estimate.warmup_products
        return values

    def _warn(self, trainer: pl.Trainer) -> None:
        """Say once per run what makes the numbers less than they seem, and which setting helps."""
        scale, auto = self._estimator.scale, self._estimator.products == "auto"
        conditions = {
            "unconverged": self.computed_steps >= 20
            and self.unconverged_steps > UNCONVERGED_WARNING_SHARE * self.computed_steps,
            "delta_q": auto and scale.num_checks > 0 and not scale.exact and scale.delta_q < scale.delta_max,
            "exact": auto and scale.exact,
            "second_order": auto and not self._estimator.second_order,
        }
        for key, condition in conditions.items():
            if condition and key not in self._notices:
                self._notices.add(key)
                rank_zero_warn(self._message(key))

    def _message(self, key: str) -> str:
        """The warning of :meth:`_warn` for ``key`` (formatted only when it is given)."""
        name = type(self).__name__
        scale = self._estimator.scale
        messages = {
            "unconverged": (
                f"{name}: {self.unconverged_steps} of {self.computed_steps} computed steps did not converge "
                f"within budget={self._estimator.budget:g} gradient-equivalents per step (n_iter="
                f"{self.n_iter}); their h0 (chaos/h0_converged = 0) is typically low. The batches' top "
                "eigenvectors change from step to step, so each step needs a Krylov solve. The same cost "
                "per training step converges more of them when spent on fewer steps "
                f"(every_n_steps={2 * self.every_n_steps}, budget={2 * self._estimator.budget:g}, "
                f"n_iter={2 * self.n_iter}); or raise `budget` and `n_iter`, or read h0 where "
                "h0_converged = 1."
            ),
            "delta_q": (
                f"{name}: finite differences at delta_q={scale.delta_max:g} were more than "
                f"delta_q_tol={scale.tol:g} off an exact Hessian-vector product along the top direction; "
                f"using delta_q={scale.delta_q:g} (measured error {scale.error:.2g}). Pass "
                f"delta_q={scale.delta_q:g} to start there."
            ),
            "exact": (
                f"{name}: no finite-difference separation met delta_q_tol={scale.tol:g} on this model "
                "(rounding below, nonlinearity above); the products are exact Hessian-vector products "
                "(about twice the cost of a gradient each). Pass products='exact' to skip the checks."
            ),
            "second_order": (
                f"{name}: the model has no second derivatives (an operation without double backward), so "
                f"finite differences at delta_q={scale.delta_max:g} are not checked against exact products."
            ),
        }
        return messages[key]

    @override
    def state_dict(self) -> dict[str, Any]:
        """Directions, β, Δq, generators and counters: a resumed run logs what the uninterrupted one would."""
        return {
            "estimator": self._estimator.state_dict(),
            "skipped_steps": self.skipped_steps,
            "unconverged_steps": self.unconverged_steps,
            "computed_steps": self.computed_steps,
            "warmup_iterations": self.warmup_iterations,
            "warned": sorted(self._notices),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._estimator.load_state_dict(state_dict["estimator"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.unconverged_steps = int(state_dict["unconverged_steps"])
        self.computed_steps = int(state_dict["computed_steps"])
        self.warmup_iterations = state_dict["warmup_iterations"]
        self._notices = set(state_dict["warned"])
