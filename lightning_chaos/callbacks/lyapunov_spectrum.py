"""LyapunovSpectrumMonitor: local Lyapunov exponents of SGD from the Hessian spectrum of the step's batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_chaos.callbacks._args import choice, positive_float, positive_int
from lightning_chaos.callbacks._step import (
    ProbeCallback,
    StepProbe,
    check_sgd,
    check_supported,
    log_values,
    sgd_of,
)
from lightning_chaos.core.projection import gradient_overlaps, random_subspace_overlap, subspace_overlap
from lightning_chaos.core.spectrum import (
    DEFAULT_TOLERANCE,
    SLQ_TOLERANCE,
    classify_eigenvalues,
    lanczos_eigenpairs,
    local_lyapunov_exponents,
    slq,
    slq_spectral_count_bounds,
    slq_spectral_counts,
    spectral_counts,
    stability_interval,
)
from lightning_chaos.core.tangent import SGDHyperparameters, sgd_first_step


class LyapunovSpectrumMonitor(ProbeCallback):
    r"""Count chaotic / edge / stable Hessian eigenvalues of SGD and log the local Lyapunov exponents.

    Seed 001 (A.1–A.5): one SGD step has the tangent map :math:`J = I - \gamma(H + \mathrm{wd}\,I)`, so
    each Hessian eigenpair :math:`(h_i, v_i)` of the step's batch gives a local Lyapunov exponent (LLE)
    :math:`\mathrm{LLE}_i = \log|1 - \gamma \tilde h_i|`, :math:`\tilde h_i = h_i + \mathrm{wd}`. With
    momentum μ (dampening τ, Nesterov) the map is :math:`2N \times 2N` and each eigenvalue has a 2 × 2
    block with characteristic polynomial :math:`z^2 - (1 + \mu - (1-\tau)\gamma\tilde h) z + \mu` (heavy
    ball) and :math:`\mathrm{LLE}_i = \log\max|z|`
    (:func:`~lightning_chaos.core.spectrum.local_lyapunov_exponents`). A direction is *chaotic* when its
    LLE is positive (:math:`\tilde h < 0` or :math:`\tilde h > u`, :math:`u = 2/\gamma` without
    momentum), *stable* when it is negative, *edge* within ``edge_tolerance`` · spectral radius of 0 or
    u (the exact zeros of ReLU networks; SLQ needs a wider band than the exact spectrum, see below).
    γ, μ, τ, Nesterov and wd are read from the ``torch.optim.SGD`` param groups right before the step, so
    schedulers are followed. On torch's first momentum step the buffer is created without dampening: that
    step is classified with τ = 0.

    Each computed step (``global_step % every_n_steps == 0``), in ``on_before_optimizer_step`` (after the
    backward pass, before clipping and before the update), the spectrum of the Hessian of the step's batch
    at the current θ (shared with the other callbacks of the step, DDP-averaged) is obtained by

    - ``"exact"``: dense Hessian (N exact Hessian-vector products, batched) and ``eigh``:
      O(N²) memory, O(N³) time. Measured per computed step for ReLU MLPs on one core of a busy 2-core
      CPU (dense Hessian + ``eigh``): 0.1 s at N = 235, 1.5 s at N = 1,210, 40 s at N = 3,460, where
      ``eigh`` dominates; ``overlaps=False`` needs only ``eigvalsh`` (about half of that);
    - ``"lanczos"``: matrix-free, exact Hessian-vector products: one Lanczos run (``lanczos_steps``
      products) for the ``num_eigenpairs`` largest and smallest eigenpairs and stochastic Lanczos
      quadrature (``slq_probes`` × ``slq_steps`` products, batched) for the counts: 0.5 s per computed
      step at N = 3,466 and 46–48 s at N = 1.1M (about 5,000 training steps) on one CPU core;
    - ``"auto"``: exact for N ≤ ``max_exact_params``, Lanczos beyond.

    Logged under ``log_prefix`` (default ``chaos/``) on every computed step; ``spectrum_exact`` (1 or 0)
    says which method produced the numbers of that step:

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
      gradient), and the eigenvector of the largest / smallest (most negative) eigenvalue (seed 001,
      B.2.4); ``grad_overlap_positive`` / ``grad_overlap_negative``: the mean :math:`|\cos|` over all
      eigenvectors with :math:`\tilde h > \varepsilon` / :math:`\tilde h < -\varepsilon` (B.2.3).
    - ``chaotic_overlap``: the A.11 subspace overlap :math:`\lVert V_\text{ref}^\top V_t\rVert_F^2 /
      \min(d_\text{ref}, d_t)` of the current chaotic subspace with the one stored at the first computed
      step at or after ``reference_step`` (C.2); ``chaotic_overlap_random`` is the expected overlap of
      random subspaces of the same dimensions, :math:`\max(d_\text{ref}, d_t) / N`.

    What the Lanczos numbers are worth: the extreme Ritz values converge from inside the spectrum,
    within their residual after enough steps, and ``lle_max`` is decided by the extremes (the LLE is
    quasi-convex in h), so it is reliable once they converged. ``lle_min`` is attained inside the
    spectrum (near :math:`\tilde h = 1/\gamma` without momentum); the Lanczos value is the minimum over the
    Ritz values and SLQ nodes, an estimate, not a bound. SLQ resolves the spectral distribution only to
    about ``‖H‖ / slq_steps`` inside the dense bulk of tiny eigenvalues (both signs, and for ReLU networks
    an atom of exact zeros) that network Hessians have around 0, so counts split at 0 need an edge band
    at least that wide: with the SLQ default ``edge_tolerance = 2e-2`` the counts were within 1.2 % of N
    of the exact counts at the same tolerance (median 0.2 %; digits MLPs and a CNN, N = 1.9–3.5k, from
    the initialisation to 600 steps), whereas at the exact default ``1e-5`` they are off by 28–66 % of N
    (``benchmarks/README.md``, table d). Boundaries in a gap or in the sparse tail (curvature beyond 2/γ)
    are accurate at any tolerance. The ``_low``/``_high`` bracket of each count
    (Chebyshev–Markov–Stieltjes) is rigorous for the quadrature when the Lanczos runs are
    reorthogonalised (SLQ bases up to 256 MiB, see ``core.spectrum.slq``); probe noise of about
    :math:`\sqrt{2c/P}` comes on top. The chaotic subspace in Lanczos mode is only the chaotic part of
    the ``2 · num_eigenpairs`` extreme Ritz vectors.

    The loss is ``pl_module.curvature_loss(batch)`` when defined, otherwise ``training_step`` with
    ``self.log`` muted (see :class:`~lightning_chaos.HessianEigenvalueMonitor`). Training is not changed
    by a single bit. With gradient accumulation the Hessian is that of the last micro-batch. Steps whose
    Hessian is not finite (or whose eigensolver fails) are skipped and counted; nothing else is logged
    for them. Requires one ``torch.optim.SGD`` optimizer whose param groups share their hyper-parameters
    (another update rule has another tangent map: ``MisconfigurationException`` at fit start).

    Args:
        every_n_steps: compute on optimizer steps whose ``global_step`` is a multiple of this.
        method: ``"auto"``, ``"exact"`` or ``"lanczos"``.
        max_exact_params: largest N for which ``"auto"`` uses the exact spectrum (default 3,000: tens of
            seconds per computed step on a CPU core; on a GPU ~10⁴ is practical).
        tolerance: half-width of the edge bands around 0 and u, relative to the spectral radius. ``None``
            (default): ``1e-5`` for the exact spectrum (it puts the exact zeros of ReLU networks in edge) and
            ``2e-2`` for SLQ, the narrowest band it resolves at ``slq_steps=80`` (counts within 1.2 % of
            N of the exact ones at the same tolerance, measured; at ``1e-5`` they are off by 28–66 % of N).
            Logged as ``edge_tolerance``.
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
        log_prefix: prefix of the logged keys (use distinct prefixes for several monitors).

    Attributes:
        latest: the values logged at the last computed step (without the prefix), ``{}`` before it.
        skipped_steps: number of computed steps skipped for a non-finite Hessian.
        reference_basis: ``(N, d)`` orthonormal basis of the reference chaotic subspace (``None`` before).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        method: str = "auto",
        max_exact_params: int = 3000,
        tolerance: float | None = None,
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
        self.every_n_steps = positive_int("every_n_steps", every_n_steps)
        self.method = choice("method", method, ("auto", "exact", "lanczos"))
        self.max_exact_params = positive_int("max_exact_params", max_exact_params)
        if tolerance is not None and (
            isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 0.5
        ):
            raise MisconfigurationException(f"`tolerance` must be None or in [0, 0.5), got {tolerance!r}.")
        self.tolerance = None if tolerance is None else float(tolerance)
        self.num_eigenpairs = positive_int("num_eigenpairs", num_eigenpairs)
        self.lanczos_steps = (
            6 * self.num_eigenpairs + 30
            if lanczos_steps is None
            else positive_int("lanczos_steps", lanczos_steps, minimum=2 * self.num_eigenpairs)
        )
        self.slq_probes = positive_int("slq_probes", slq_probes)
        self.slq_steps = positive_int("slq_steps", slq_steps)
        self.reference_step = positive_int("reference_step", reference_step, minimum=0)
        self.overlaps = bool(overlaps)
        self.probe_fraction = positive_float("probe_fraction", probe_fraction, upper=1.0)
        self.seed = int(seed)
        self.log_prefix = log_prefix
        self.generator = torch.Generator().manual_seed(self.seed)
        self.latest: dict[str, float] = {}
        self.skipped_steps = 0
        self.reference_basis: Tensor | None = None

    @property
    def state_key(self) -> str:
        """Unique per configuration, so two monitors in one Trainer keep separate checkpoint state."""
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, method=self.method, seed=self.seed, log_prefix=self.log_prefix
        )

    def exact_for(self, num_params: int) -> bool:
        """Whether a model with ``num_params`` trainable entries gets the exact spectrum."""
        return self.method == "exact" or (self.method == "auto" and num_params <= self.max_exact_params)

    def tolerance_for(self, exact: bool) -> float:
        """The edge tolerance of the exact spectrum or of SLQ (``tolerance``, or the method's default)."""
        if self.tolerance is not None:
            return self.tolerance
        return DEFAULT_TOLERANCE if exact else SLQ_TOLERANCE

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reject set-ups the probe cannot handle, before any training happens."""
        if stage == "fit":
            check_supported(trainer, pl_module, type(self).__name__)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer (one ``torch.optim.SGD``) and write the TensorBoard layout."""
        check_sgd(trainer, type(self).__name__)
        self._hyperparameters(trainer.optimizers[0])
        super().on_fit_start(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Compute and log the spectrum of this step before the optimizer moves θ."""
        if trainer.global_step % self.every_n_steps != 0:
            return
        hp = self._hyperparameters(optimizer)
        probe = StepProbe.current(trainer, pl_module, fraction=self.probe_fraction)
        try:
            values = self._measure(trainer, probe, hp)
        except (FloatingPointError, torch.linalg.LinAlgError):
            values = None
        if values is None:
            self.skipped_steps += 1
            values = {}
        values["spectrum_skipped"] = self.skipped_steps
        self.latest = values
        log_values(trainer, values, self.log_prefix)

    def _hyperparameters(self, optimizer: Optimizer) -> dict[str, Any]:
        """``lr`` and the map keyword arguments of the coming update, first momentum step undampened."""
        hp: SGDHyperparameters = sgd_of(optimizer, type(self).__name__)
        kwargs = {"lr": hp.lr, **hp.map_kwargs()}
        if sgd_first_step(optimizer):
            kwargs["dampening"] = 0.0
        try:
            stability_interval(hp.lr, hp.momentum, kwargs["dampening"], hp.nesterov)
        except ValueError as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}.") from err
        return kwargs

    def _measure(self, trainer: pl.Trainer, probe: StepProbe, hp: dict[str, Any]) -> dict[str, float] | None:
        """All values of one step; ``None`` when the Hessian is not finite."""
        dim = probe.loss.dim
        if self.exact_for(dim):
            if not torch.isfinite(probe.dense()).all():
                return None
            values, chaotic = self._exact(probe, hp)
        else:
            result = self._lanczos(probe, hp)
            if result is None:
                return None
            values, chaotic = result
        if chaotic is not None:  # overlaps=True
            values.update(self._subspace(trainer, chaotic, dim))
        return values

    def _gradient(self, probe: StepProbe, weight_decay: float) -> Tensor:
        """The direction SGD follows: ``g̃ = g + wd·θ`` (the gradient of ``L + wd/2 ‖θ‖²``)."""
        gradient = probe.g0()
        return gradient + weight_decay * probe.loss.theta() if weight_decay else gradient

    def _exact(self, probe: StepProbe, hp: dict[str, Any]) -> tuple[dict[str, float], Tensor | None]:
        eigenvalues = probe.eigh()[0] if self.overlaps else probe.eigvalsh()
        tolerance = self.tolerance_for(exact=True)
        values: dict[str, float] = {"spectrum_exact": 1.0, "edge_tolerance": tolerance}
        values.update(spectral_counts(eigenvalues, tolerance=tolerance, **hp))
        lles = local_lyapunov_exponents(eigenvalues, **hp)
        values.update(lle_max=float(lles.max()), lle_min=float(lles.min()))
        if not self.overlaps:
            return values, None
        vectors = probe.eigh()[1]
        masks = classify_eigenvalues(eigenvalues, tolerance=tolerance, **hp)
        cosines = gradient_overlaps(self._gradient(probe, hp["weight_decay"]), vectors)
        values.update(grad_overlap_top=float(cosines[-1]), grad_overlap_min=float(cosines[0]))
        for name in ("positive", "negative"):
            if masks[name].any():
                values[f"grad_overlap_{name}"] = float(cosines[masks[name]].mean())
        return values, vectors[:, masks["chaotic"]]

    def _lanczos(self, probe: StepProbe, hp: dict[str, Any]) -> tuple[dict[str, float], Tensor | None] | None:
        operator = probe.hessian()
        dim = operator.shape[0]
        k = min(self.num_eigenpairs, dim // 2)
        ritz_values, ritz_vectors = lanczos_eigenpairs(
            operator, max(k, 1), "both", num_steps=min(self.lanczos_steps, dim), generator=self.generator
        )  # descending
        nodes, weights = slq(operator, dim, self.slq_probes, self.slq_steps, self.generator)
        if not (torch.isfinite(ritz_values).all() and torch.isfinite(nodes).all()):
            return None
        support = nodes[weights > 0]
        scale = max(float(ritz_values.abs().max()), float(support.abs().max()) if support.numel() else 0.0)
        tolerance = self.tolerance_for(exact=False)
        values: dict[str, float] = {"spectrum_exact": 0.0, "edge_tolerance": tolerance}
        values.update(slq_spectral_counts(nodes, weights, dim, tolerance=tolerance, scale=scale, **hp))
        bounds = slq_spectral_count_bounds(nodes, weights, dim, tolerance=tolerance, scale=scale, **hp)
        for name, (low, high) in bounds.items():
            values.update({f"{name}_low": low, f"{name}_high": high})
        lle_max = local_lyapunov_exponents(ritz_values.double(), **hp).max()
        candidates = torch.cat([ritz_values.double().cpu(), support])
        values.update(lle_max=float(lle_max), lle_min=float(local_lyapunov_exponents(candidates, **hp).min()))
        if not self.overlaps:
            return values, None
        cosines = gradient_overlaps(self._gradient(probe, hp["weight_decay"]), ritz_vectors)
        values.update(grad_overlap_top=float(cosines[0]), grad_overlap_min=float(cosines[-1]))
        chaotic = classify_eigenvalues(ritz_values, tolerance=tolerance, scale=scale, **hp)["chaotic"]
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

    def state_dict(self) -> dict[str, Any]:
        """Generator, reference subspace and counters: a resumed run logs what the uninterrupted one would."""
        return {
            "generator": self.generator.get_state(),
            "reference_basis": None if self.reference_basis is None else self.reference_basis.cpu().clone(),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the reference basis moves to the model's device when used)."""
        self.generator.set_state(state_dict["generator"])
        self.reference_basis = state_dict["reference_basis"]
        self.skipped_steps = int(state_dict["skipped_steps"])
