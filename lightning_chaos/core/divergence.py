"""Distances between training trajectories: perturbation directions, baselines, the random-walk bound, a fit.

Herrmann, Granz and Landgraf ("Chaotic Dynamics are Intrinsic to Neural Network Training with SGD",
NeurIPS 2022, appendix A.8–A.10) perturb a copy of a model along chosen Hessian eigendirections
(:func:`twin_directions`) and compare the distance ``d(t) = ‖θ_a(t) − θ_b(t)‖`` of the run and its twin
with

* the distance of two independent initialisations (their A.8), here computed for the module's actual
  layers: :func:`default_init_distance` (analytic, PyTorch's default initialisation) and
  :func:`sampled_init_distances` (re-drawing the initialisation);
* two independent Gaussian random walks with per-coordinate step deviation σ in D dimensions, whose
  expected distance after T steps is ``√(2TD) σ`` (A.9, :func:`random_walk_distance`);
* ``√(a²t² + bt)``, the distance of two runs whose drift separates linearly (``a``) under isotropic noise
  (``b = 2Dσ²``) (A.10, :func:`fit_divergence`).

The paper's A.8 gives ≈ 6.38 for two default 784-20-10 MLPs; the correct value is ≈ 4.51
(``E‖θ_a − θ_b‖²`` = 20.35). The paper takes ``θ_a − θ_b`` to be uniform on the doubled interval, whose
variance ``(4/√k)²/12 = 4/(3k)`` is twice the true ``2 Var U(−1/√k, 1/√k) = 2/(3k)`` (the difference of
two uniforms is triangular): its result is exactly √2 too large.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.stability import (
    EXACT_EDGE_TOLERANCE,
    classify_eigenvalues,
    local_lyapunov_exponents,
)

__all__ = [
    "DIRECTIONS",
    "TwinDirections",
    "default_init_distance",
    "fit_divergence",
    "random_walk_distance",
    "sampled_init_distances",
    "twin_directions",
]

DIRECTIONS = ("max_chaotic", "chaotic", "random", "non_chaotic", "max_non_chaotic")
"""Perturbation directions, from the most to the least chaotic."""

SPECTRAL_DIRECTIONS = frozenset(DIRECTIONS) - {"random"}
"""The directions that need the Hessian's eigendecomposition."""


@dataclass
class TwinDirections:
    """Unit perturbation directions of the twins and what is known about them.

    Attributes:
        vectors: ``{direction: u}``, flat unit vectors ``(N,)`` (float64).
        lle: ``{direction: LLE}`` of the single-eigenvector directions (``max_*``).
        empty: directions asked for whose eigenspace is empty (no twin).
    """

    vectors: dict[str, Tensor] = field(default_factory=dict)
    lle: dict[str, float] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)


def twin_directions(
    directions: Sequence[str],
    dim: int,
    generator: torch.Generator,
    sgd: SGDHyperparameters | None = None,
    eigenpairs: tuple[Tensor, Tensor] | None = None,
    tolerance: float = EXACT_EDGE_TOLERANCE,
) -> TwinDirections:
    """Unit directions of R^N, one per requested direction, from the Hessian's eigenpairs where needed.

    * ``max_chaotic`` / ``max_non_chaotic``: the eigenvector with the largest / smallest local Lyapunov
      exponent of the update (:func:`~lightning_chaos.core.stability.local_lyapunov_exponents`);
    * ``chaotic`` / ``non_chaotic``: a uniformly random unit vector in the span of the chaotic eigenvectors
      (positive LLE) / of all the others (stable and edge: the complement);
    * ``random``: a uniformly random unit vector of R^N.

    Random draws come from ``generator``, in the order of ``directions``.

    Args:
        directions: names from :data:`DIRECTIONS`.
        dim: N.
        generator: the random generator.
        sgd: the update (required for the spectral directions).
        eigenpairs: ``(eigenvalues (N,), eigenvectors (N, N))`` of the Hessian (required for the spectral
            directions).
        tolerance: edge half-width of the chaotic / non-chaotic classification.

    Returns:
        The :class:`TwinDirections`.
    """
    out = TwinDirections()
    lle = chaotic = vectors = None
    if SPECTRAL_DIRECTIONS.intersection(directions):
        if sgd is None or eigenpairs is None:
            raise ValueError(f"directions {sorted(SPECTRAL_DIRECTIONS)} need `sgd` and `eigenpairs`")
        values, vectors = eigenpairs[0], eigenpairs[1].double()
        lle = local_lyapunov_exponents(values, sgd).double()
        chaotic = classify_eigenvalues(values, sgd, tolerance)["chaotic"]
    for name in directions:
        if name == "random":
            out.vectors[name] = _unit(torch.randn(dim, generator=generator, dtype=torch.float64))
        elif name in ("max_chaotic", "max_non_chaotic"):
            assert lle is not None and vectors is not None
            index = int(lle.argmax() if name == "max_chaotic" else lle.argmin())
            out.vectors[name] = _unit(vectors[:, index])
            out.lle[name] = float(lle[index])
        elif name in ("chaotic", "non_chaotic"):
            assert chaotic is not None and vectors is not None
            span = vectors[:, chaotic if name == "chaotic" else ~chaotic]
            if span.shape[1] == 0:
                out.empty.append(name)
                continue
            out.vectors[name] = _unit(
                span @ torch.randn(span.shape[1], generator=generator, dtype=torch.float64)
            )
        else:
            raise ValueError(f"unknown direction {name!r}; allowed: {DIRECTIONS}")
    return out


def _unit(vector: Tensor) -> Tensor:
    return vector / torch.linalg.vector_norm(vector)


_CONSTANT_INIT = (_NormBase, nn.LayerNorm, nn.GroupNorm)
"""Layers whose default parameters are constants (weight 1, bias 0): two copies start equal."""


def _trainable(module: nn.Module) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    """``(module name, submodule, parameter name, parameter)`` for every trainable parameter."""
    return [
        (name, sub, pname, p)
        for name, sub in module.named_modules()
        for pname, p in sub.named_parameters(recurse=False)
        if p.requires_grad
    ]


def default_init_distance(module: nn.Module) -> float:
    """Root-mean-square distance ``√E‖θ_a − θ_b‖²`` of two independent default initialisations.

    Per entry, ``E(x_a − x_b)² = 2 Var x``. PyTorch's default ``reset_parameters`` of ``nn.Linear`` and the
    convolutions is ``kaiming_uniform_(a=√5)`` for the weight and ``U(−1/√k, 1/√k)`` for the bias, both
    ``U(−1/√k, 1/√k)`` with ``k = fan_in``, so ``Var = 1/(3k)``. Normalisation layers start at the
    constants 1 and 0 (no contribution); ``nn.Embedding`` is ``N(0, 1)``. Summing over the trainable
    parameters::

        E‖θ_a − θ_b‖² = Σ_layers (n_weight + n_bias) · 2/(3 k)   (+ 2 n for embeddings)

    For a 784-20-10 MLP this is ``(2/3)(20 + 20/784 + 10 + 10/20) = 20.35``, i.e. ≈ 4.51 (the paper's A.8
    reports 6.38, √2 too large: module docstring). The value assumes the module still has the default
    initialisation of each layer type; :func:`sampled_init_distances` checks any module by re-drawing it.

    Args:
        module: the model (only parameters with ``requires_grad`` count).

    Returns:
        The RMS distance.

    Raises:
        ValueError: a trainable parameter belongs to a layer type whose default initialisation is not
            known here (the message names it; use :func:`sampled_init_distances`).
    """
    total = 0.0
    for name, sub, pname, p in _trainable(module):
        if isinstance(sub, (nn.Linear, _ConvNd)):
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(sub.weight)
            total += p.numel() * 2.0 / (3.0 * fan_in) if fan_in > 0 else 0.0
        elif isinstance(sub, nn.Embedding):
            total += 2.0 * p.numel()
        elif not isinstance(sub, _CONSTANT_INIT):
            where = f"{name}.{pname}" if name else pname
            raise ValueError(
                f"no analytic default initialisation for parameter {where!r} of {type(sub).__name__}; "
                "known: Linear, Conv*, BatchNorm*/LayerNorm/GroupNorm, Embedding (use sampled_init_distances)"
            )
    return math.sqrt(total)


def sampled_init_distances(module: nn.Module, num_pairs: int = 32, seed: int = 0) -> Tensor:
    """Distances ``‖θ_a − θ_b‖`` of independently re-initialised copies of ``module``.

    A deep copy of ``module`` is re-initialised twice per pair by calling ``reset_parameters()`` on every
    submodule that has one, which re-draws PyTorch's default initialisation of each layer. The global
    random stream is forked, seeded with ``seed`` and restored, so sampling never changes the caller's
    random numbers.

    Args:
        module: the model (only parameters with ``requires_grad`` count).
        num_pairs: number of independent pairs.
        seed: seed of the draws.

    Returns:
        ``(num_pairs,)`` float64 distances; ``√mean(d²)`` estimates :func:`default_init_distance`.

    Raises:
        ValueError: ``num_pairs < 1``, or a trainable parameter belongs to a submodule without
            ``reset_parameters`` (it could not be re-drawn).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    for name, sub, pname, _ in _trainable(module):
        if not callable(getattr(sub, "reset_parameters", None)):
            where = f"{name}.{pname}" if name else pname
            raise ValueError(
                f"cannot re-draw parameter {where!r}: {type(sub).__name__} has no reset_parameters()"
            )
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    distances = torch.empty(num_pairs, dtype=torch.float64)
    clone = copy.deepcopy(module)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(num_pairs):
            a, b = (_redrawn(clone) for _ in range(2))
            distances[i] = float(torch.linalg.vector_norm(a - b))
    return distances


@torch.no_grad()
def _redrawn(module: nn.Module) -> Tensor:
    """Re-initialise ``module`` in place; return its trainable parameters as one float64 vector."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return torch.cat([p.detach().double().reshape(-1) for *_, p in _trainable(module)])


def random_walk_distance(num_steps: int, dim: int, sigma: float) -> float:
    """Expected distance ``√(2TD) σ`` of two independent Gaussian random walks after T steps (A.9).

    Each walk adds ``N(0, σ² I_D)`` per step, so ``x_1(T) − x_2(T) ~ N(0, 2Tσ² I_D)`` and
    ``E‖x_1 − x_2‖² = 2TDσ²`` (the value is the root of that mean square, as in the paper).

    Args:
        num_steps: T ≥ 0.
        dim: D ≥ 1.
        sigma: per-coordinate step deviation σ ≥ 0.

    Returns:
        ``√(2 T D) σ``.
    """
    if num_steps < 0 or dim < 1 or not sigma >= 0:
        raise ValueError(f"need num_steps >= 0, dim >= 1, sigma >= 0; got {num_steps}, {dim}, {sigma}")
    return math.sqrt(2.0 * num_steps * dim) * sigma


def fit_divergence(distances: Sequence[float] | Tensor) -> tuple[float, float]:
    """Least-squares fit of ``d(t) = √(a²t² + bt)`` (A.10) to distances at ``t = 0, 1, …, T``.

    Linear in the squares: ``d(t)² = A t² + b t`` with ``A = a² ≥ 0`` and ``b ≥ 0``, solved as
    non-negative least squares over the two coefficients (the unconstrained solution if it is feasible,
    else the better of the two one-coefficient fits). ``a`` is the rate of linear (drift) separation,
    ``b = 2Dσ²`` the diffusive part; ``d(0)`` (the perturbation ε) enters as an ordinary data point.

    Args:
        distances: ``d(t)`` for ``t = 0 … T`` (at least two finite values).

    Returns:
        ``(a, b)``.

    Raises:
        ValueError: fewer than two points, or non-finite distances.
    """
    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    if d.numel() < 2 or not torch.isfinite(d).all():
        raise ValueError(f"need at least two finite distances, got {d.numel()} values")
    t = torch.arange(d.numel(), dtype=torch.float64)
    y = d.pow(2)
    design = torch.stack([t.pow(2), t], dim=1)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.flatten()
    if (coef < 0).any():
        candidates = []
        for column in range(2):
            x = design[:, column]
            c = max(float(x @ y / (x @ x)), 0.0)
            candidates.append((float((y - c * x).pow(2).sum()), column, c))
        _, column, c = min(candidates)
        coef = torch.zeros(2, dtype=torch.float64)
        coef[column] = c
    return math.sqrt(float(coef[0])), float(coef[1])
