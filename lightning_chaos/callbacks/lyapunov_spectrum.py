"""LyapunovSpectrumMonitor: local Lyapunov exponents of SGD from the Hessian spectrum of the step's batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_chaos.callbacks._base import SKIPPED, ProbeCallback, log_values
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.callbacks._checks import choice_arg, int_arg, number_arg, sgd_of, single_optimizer
from lightning_chaos.core.counts import exact_summary, slq_summary
from lightning_chaos.core.lanczos import lanczos
from lightning_chaos.core.projection import gradient_overlaps, random_subspace_overlap, subspace_overlap
from lightning_chaos.core.sgd import SGDHyperparameters, sgd_first_step
from lightning_chaos.core.slq import slq
from lightning_chaos.core.stability import (
    EDGE_TOLERANCE,
    classify_eigenvalues,
    spectral_radius,
    stability_interval,
)
from lightning_chaos.core.step_curvature import StepCurvature


class LyapunovSpectrumMonitor(ProbeCallback):
    r"""Count chaotic / edge / stable Hessian eigenvalues of SGD and log the local Lyapunov exponents.

    One SGD step has the tangent map :math:`J = I - \gamma(H + \mathrm{wd}\,I)`, so each Hessian eigenpair
    :math:`(h_i, v_i)` of the step's batch gives a local Lyapunov exponent (LLE)
    :math:`\mathrm{LLE}_i = \log|1 - \gamma \tilde h_i|`, :math:`\tilde h_i = h_i + \mathrm{wd}` (Herrmann,
    Granz and Landgraf, "Chaotic Dynamics are Intrinsic to Neural Network Training with SGD", NeurIPS
    2022). With momentum μ (dampening τ, Nesterov) each eigenvalue has a 2 × 2 block and
    :math:`\mathrm{LLE}_i = \log\max|z|` over its roots
    (:func:`~lightning_chaos.core.stability.local_lyapunov_exponents`). A direction is *chaotic* when its
    LLE is positive (:math:`\tilde h < 0` or :math:`\tilde h > u`, :math:`u = 2/\gamma` without
    momentum), *stable* when it is negative, *edge* within ``tolerance`` · spectral radius of 0 or u.
    γ, μ, τ, Nesterov and wd are read from the ``torch.optim.SGD`` param groups right before the step, so
    schedulers are followed. On torch's first momentum step the buffer is created without dampening: that
    step is classified with τ = 0.

    Each computed step (``global_step % every_n_steps == 0``), in ``on_before_optimizer_step`` (after the
    backward pass, before clipping and before the update), the spectrum of the Hessian of the step's batch
    at the current θ (shared with the other callbacks of the step, DDP-averaged) is obtained by

    - ``"exact"``: dense Hessian (N batched exact Hessian-vector products) and ``eigh``: O(N²) memory,
      O(N³) time; ``overlaps=False`` needs only ``eigvalsh``;
    - ``"lanczos"``: matrix-free: one Lanczos run (``lanczos_steps`` exact Hessian-vector products) for the
      ``num_eigenpairs`` largest and smallest eigenpairs, and stochastic Lanczos quadrature
      (``slq_probes`` × ``slq_steps`` products, batched) for the counts;
    - ``"auto"``: exact for N ≤ ``max_exact_params``, Lanczos beyond.

    The cost of both per computed step, and the agreement of the SLQ counts with the exact ones, are
    measured in ``benchmarks/README.md``.

    Logged under ``log_prefix`` on every computed step; ``spectrum_exact`` (1 or 0) says which method
    produced the numbers of that step:

    - ``n_chaotic``, ``n_edge``, ``n_stable``, ``n_negative``, ``n_positive``, ``n_zero``: exact counts
      (exact) or SLQ point estimates (Lanczos), each partition summing to N;
    - ``edge_tolerance``: the relative half-width of the edge bands these counts used;
    - ``<count>_low``, ``<count>_high`` (Lanczos only): the quadrature bracket of each count;
    - ``lle_max``, ``lle_min``: largest and smallest LLE (Lanczos: ``lle_max`` from the extreme Ritz
      values, ``lle_min`` an estimate, see below);
    - ``grad_overlap_top``, ``grad_overlap_min``: from the exact eigenvectors or the extreme Ritz vectors;
    - ``grad_overlap_positive``, ``grad_overlap_negative`` (exact only: they need whole eigenspaces);
    - ``chaotic_dim``, ``chaotic_overlap``, ``chaotic_overlap_random``: the chaotic subspace (exact: the
      whole chaotic eigenspace; Lanczos: the chaotic ones among the extreme Ritz vectors);
    - ``spectrum_skipped``: running count of skipped steps.

    Definitions of the overlaps:

    - ``grad_overlap_top`` / ``grad_overlap_min``: :math:`|\cos(\tilde g, v)|` between the gradient of
      the step, :math:`\tilde g = g + \mathrm{wd}\,\theta` (the direction SGD follows, g the batch
      gradient), and the eigenvector of the largest / smallest (most negative) eigenvalue;
      ``grad_overlap_positive`` / ``grad_overlap_negative``: the mean :math:`|\cos|` over all
      eigenvectors with :math:`\tilde h > \varepsilon` / :math:`\tilde h < -\varepsilon`.
    - ``chaotic_overlap``: the subspace overlap :math:`\lVert V_\text{ref}^\top V_t\rVert_F^2 /
      \min(d_\text{ref}, d_t)` (:func:`~lightning_chaos.core.projection.subspace_overlap`) of the current
      chaotic subspace with the one stored at the first computed step at or after ``reference_step``;
      ``chaotic_overlap_random`` is the expected overlap of random subspaces of the same dimensions,
      :math:`\max(d_\text{ref}, d_t) / N`.

    What the Lanczos numbers are worth: the extreme Ritz values converge from inside the spectrum, and
    ``lle_max`` is decided by the extremes (the LLE is quasi-convex in h), so it is reliable once they
    converged. ``lle_min`` is attained inside the spectrum (near :math:`\tilde h = 1/\gamma` without
    momentum); the Lanczos value is the minimum over the Ritz values and SLQ nodes, an estimate, not a
    bound. SLQ resolves the spectral distribution only to about ``‖H‖ / slq_steps`` inside the dense bulk
    of tiny eigenvalues (both signs, and for ReLU networks an atom of exact zeros) that network Hessians
    have around 0, so counts split at 0 need an edge band at least that wide: the default ``tolerance``
    (:data:`~lightning_chaos.core.stability.EDGE_TOLERANCE`) is one that SLQ resolves, and it is the same
    for both methods, so a model that grows past ``max_exact_params`` keeps counts of the same meaning.
    A finer band (e.g. :data:`~lightning_chaos.core.stability.EXACT_EDGE_TOLERANCE`, which separates the
    exact zeros of ReLU networks) is meaningful with the exact method only. The ``_low``/``_high`` bracket
    of each count (Chebyshev–Markov–Stieltjes) is rigorous for the quadrature when the Lanczos runs are
    reorthogonalised (:func:`~lightning_chaos.core.slq.slq`); probe noise of about :math:`\sqrt{2c/P}`
    comes on top. When the bands of 0 and u meet (a large spectral radius at a large learning rate),
    stable is empty and both methods count the whole band as edge.

    The loss is ``pl_module.curvature_loss(batch)`` when defined, otherwise ``training_step`` with
    ``self.log`` muted (see :class:`~lightning_chaos.HessianEigenvalueMonitor`). Training is not changed
    by a single bit. With gradient accumulation the Hessian is that of the last micro-batch. Steps whose
    Hessian is not finite, whose eigensolver fails, whose ``training_step`` returned ``None`` or whose
    model has no second-order derivative are skipped and counted (the reason warned once); nothing else
    is logged for them. Requires one ``torch.optim.SGD`` optimizer whose param groups share their
    hyper-parameters (another update rule has another tangent map: ``MisconfigurationException`` at fit
    start).

    Args:
        every_n_steps: compute on optimizer steps whose ``global_step`` is a multiple of this.
        method: ``"auto"``, ``"exact"`` or ``"lanczos"``.
        max_exact_params: largest N for which ``"auto"`` uses the exact spectrum.
        tolerance: half-width of the edge bands around 0 and u, relative to the spectral radius, in
            ``[0, 0.5)``. Logged as ``edge_tolerance``.
        num_eigenpairs: Lanczos: eigenpairs computed at each end of the spectrum.
        lanczos_steps: Lanczos: steps of the eigenpair run (default ``6 · num_eigenpairs + 30``).
        slq_probes: Lanczos: number of SLQ probe vectors.
        slq_steps: Lanczos: Lanczos steps per SLQ probe.
        reference_step: the chaotic subspace of the first computed step with ``global_step`` at or after
            this is the reference of ``chaotic_overlap``.
        overlaps: compute the gradient overlaps and the chaotic subspace (they need eigenvectors). With
            False only counts and LLEs are logged and the exact method uses ``eigvalsh``.
        probe_fraction: share of the batch the Hessian is taken on, in ``(0, 1]``.
        seed: seed of the private generator of the Lanczos/SLQ start vectors (never the global one).
        log_prefix: prefix of the logged keys (two instances need different prefixes).

    Attributes:
        latest: the values logged at the last computed step (without the prefix), ``{}`` before it.
        skipped_steps: number of computed steps skipped.
        reference_basis: ``(N, d)`` orthonormal basis of the reference chaotic subspace (``None`` before).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_chaos import LyapunovSpectrumMonitor
        >>> monitor = LyapunovSpectrumMonitor(every_n_steps=50, method="lanczos")
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        method: str = "auto",
        max_exact_params: int = 3000,
        tolerance: float = EDGE_TOLERANCE,
        num_eigenpairs: int = 10,
        lanczos_steps: int | None = None,
        slq_probes: int = 10,
        slq_steps: int = 80,
        reference_step: int = 0,
        overlaps: bool = True,
        probe_fraction: float = 1.0,
        seed: int = 0,
        log_prefix: str = "chaos/",
    ) -> None:
        self.every_n_steps = int_arg("every_n_steps", every_n_steps)
        self.method = choice_arg("method", method, ("auto", "exact", "lanczos"))
        self.max_exact_params = int_arg("max_exact_params", max_exact_params)
        self.tolerance = number_arg("tolerance", tolerance, 0.0, 0.5, high_open=True)
        self.num_eigenpairs = int_arg("num_eigenpairs", num_eigenpairs)
        self.lanczos_steps = (
            6 * self.num_eigenpairs + 30
            if lanczos_steps is None
            else int_arg("lanczos_steps", lanczos_steps, minimum=2 * self.num_eigenpairs)
        )
        self.slq_probes = int_arg("slq_probes", slq_probes)
        self.slq_steps = int_arg("slq_steps", slq_steps)
        self.reference_step = int_arg("reference_step", reference_step, minimum=0)
        self.overlaps = bool(overlaps)
        self.probe_fraction = number_arg("probe_fraction", probe_fraction, 0.0, 1.0, low_open=True)
        self.seed = int(seed)
        self.log_prefix = log_prefix
        self.generator = torch.Generator().manual_seed(self.seed)
        self.latest: dict[str, float | None] = {}
        self.skipped_steps = 0
        self.reference_basis: Tensor | None = None

    def exact_for(self, num_params: int) -> bool:
        """Whether a model with ``num_params`` trainable entries gets the exact spectrum."""
        return self.method == "exact" or (self.method == "auto" and num_params <= self.max_exact_params)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer (one ``torch.optim.SGD``) and write the TensorBoard layout."""
        self._hyperparameters(single_optimizer(trainer, type(self).__name__))
        super().on_fit_start(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Compute and log the spectrum of this step before the optimizer moves θ."""
        if trainer.global_step % self.every_n_steps != 0:
            return
        sgd = self._hyperparameters(optimizer)
        curvature = step_curvature(trainer, pl_module, fraction=self.probe_fraction)
        values: dict[str, float | None]
        try:
            values = self._measure(trainer, curvature, sgd)
        except SKIPPED as err:
            self.skip(trainer, err)
            values = {}
        values["spectrum_skipped"] = self.skipped_steps
        self.latest = values
        log_values(trainer, values, self.log_prefix)

    def _hyperparameters(self, optimizer: Optimizer) -> SGDHyperparameters:
        """The coming update (torch's first momentum step creates the buffer without dampening)."""
        owner = type(self).__name__
        sgd = sgd_of(optimizer, owner)
        if sgd_first_step(optimizer):
            sgd = sgd.at_first_step()
        try:
            stability_interval(sgd)
        except ValueError as err:
            raise MisconfigurationException(f"{owner}: {err}.") from err
        return sgd

    def _measure(
        self, trainer: pl.Trainer, curvature: StepCurvature, sgd: SGDHyperparameters
    ) -> dict[str, float | None]:
        """All values of one step (raises one of the skipping errors when the Hessian is not finite)."""
        dim = curvature.loss.dim
        if self.exact_for(dim):
            if not torch.isfinite(curvature.dense()).all():
                raise FloatingPointError("the batch Hessian is not finite")
            values, chaotic = self._exact(curvature, sgd)
        else:
            values, chaotic = self._lanczos(curvature, sgd)
        if chaotic is not None:  # overlaps=True
            values.update(self._subspace(trainer, chaotic, dim))
        return values

    def _gradient(self, curvature: StepCurvature, weight_decay: float) -> Tensor:
        """The direction SGD follows: ``g̃ = g + wd·θ`` (the gradient of ``L + wd/2 ‖θ‖²``)."""
        gradient = curvature.g0()
        return gradient + weight_decay * curvature.loss.theta() if weight_decay else gradient

    def _exact(
        self, curvature: StepCurvature, sgd: SGDHyperparameters
    ) -> tuple[dict[str, float | None], Tensor | None]:
        eigenvalues = curvature.eigh()[0] if self.overlaps else curvature.eigvalsh()
        values: dict[str, float | None] = {"spectrum_exact": 1.0}
        values.update(exact_summary(eigenvalues, sgd, self.tolerance))
        if not self.overlaps:
            return values, None
        vectors = curvature.eigh()[1]
        masks = classify_eigenvalues(eigenvalues, sgd, self.tolerance)
        cosines = gradient_overlaps(self._gradient(curvature, sgd.weight_decay), vectors)
        values.update(grad_overlap_top=float(cosines[-1]), grad_overlap_min=float(cosines[0]))
        for name in ("positive", "negative"):
            if masks[name].any():
                values[f"grad_overlap_{name}"] = float(cosines[masks[name]].mean())
        return values, vectors[:, masks["chaotic"]]

    def _lanczos(
        self, curvature: StepCurvature, sgd: SGDHyperparameters
    ) -> tuple[dict[str, float | None], Tensor | None]:
        operator = curvature.hessian()
        dim = operator.shape[0]
        k = max(1, min(self.num_eigenpairs, dim // 2))
        runs = lanczos(operator, min(self.lanczos_steps, dim), generator=self.generator)
        ritz_values, ritz_vectors = runs.ritz_pairs(k, "both")  # descending
        nodes, weights = slq(operator, dim, self.slq_probes, self.slq_steps, self.generator)
        if not (torch.isfinite(ritz_values).all() and torch.isfinite(nodes).all()):
            raise FloatingPointError("the batch Hessian is not finite")
        values: dict[str, float | None] = {"spectrum_exact": 0.0}
        values.update(slq_summary(nodes, weights, dim, ritz_values, sgd, self.tolerance))
        if not self.overlaps:
            return values, None
        cosines = gradient_overlaps(self._gradient(curvature, sgd.weight_decay), ritz_vectors)
        values.update(grad_overlap_top=float(cosines[0]), grad_overlap_min=float(cosines[-1]))
        scale = max(spectral_radius(ritz_values), spectral_radius(nodes[weights > 0]))
        chaotic = classify_eigenvalues(ritz_values, sgd, self.tolerance, scale=scale)["chaotic"]
        return values, ritz_vectors[:, chaotic]

    def _subspace(self, trainer: pl.Trainer, chaotic: Tensor, dim: int) -> dict[str, float]:
        """A.11 overlap of the chaotic subspace with the reference one (stored on first reaching it)."""
        values = {"chaotic_dim": float(chaotic.shape[1])}
        if self.reference_basis is None:
            if trainer.global_step < self.reference_step:
                return values
            self.reference_basis = chaotic.detach().clone()
        reference = self.reference_basis.to(device=chaotic.device, dtype=chaotic.dtype)
        if reference.shape[0] != dim:
            raise MisconfigurationException(
                f"{type(self).__name__}: the reference chaotic subspace has {reference.shape[0]} entries but "
                f"the model has {dim} trainable parameters."
            )
        if reference.shape[1] and chaotic.shape[1]:
            values["chaotic_overlap"] = subspace_overlap(reference, chaotic)
            baseline = random_subspace_overlap(reference.shape[1], chaotic.shape[1], dim)
            values["chaotic_overlap_random"] = baseline
        return values

    @override
    def state_dict(self) -> dict[str, Any]:
        """Generator, reference subspace and counters: a resumed run logs what the uninterrupted one would."""
        return {
            "generator": self.generator.get_state(),
            "reference_basis": None if self.reference_basis is None else self.reference_basis.cpu().clone(),
            "skipped_steps": self.skipped_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the reference basis moves to the model's device when used)."""
        self.generator.set_state(state_dict["generator"])
        self.reference_basis = state_dict["reference_basis"]
        self.skipped_steps = int(state_dict["skipped_steps"])
