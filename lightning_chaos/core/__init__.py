"""The numerical core of lightning_chaos: plain PyTorch, closures and tensors in, tensors out.

Nothing here imports Lightning, torchmetrics or TensorBoard. Dependencies point one way: the
parameter space and the functional loss, then linear algebra (operators, Lanczos, SLQ), then SGD theory
(the update, its stability and tangent maps), then the estimators built on them.

=============================  ==================================================================
module                         what is in it
=============================  ==================================================================
``params``                     the parameter space θ ∈ R^N: trainable parameters, flat views
``functional_loss``            ``FunctionalLoss``: L and g at θ + q on a fixed batch, model untouched
``operators``                  exact Hessian-vector products, ``HessianOperator``, dense Hessian
``lanczos``                    the Lanczos process: Ritz values and pairs, Gauss quadrature
``slq``                        stochastic Lanczos quadrature: counts and densities of an operator
``sgd``                        ``SGDHyperparameters``: the update ``torch.optim.SGD`` performs
``stability``                  local Lyapunov exponents, stability interval, chaos classes
``counts``                     chaotic / edge / stable counts, exact and by SLQ
``tangent_map``                one-step tangent maps of SGD (momentum, Nesterov, weight decay)
``benettin``                   finite-time Lyapunov exponents of a product of maps
``controlled_lyapunov``        **where h0 is computed**: the controlled Lyapunov iteration
``step_curvature``             the curvature of one step, computed once for all consumers
``projection``                 projections off eigenspaces, subspace and gradient overlaps
``pruning``                    which eigendirections CGD removes
``divergence``                 perturbed-twin directions, initialisation baselines, divergence fits
``validation``                 argument checks with errors that name the argument
=============================  ==================================================================

The names below are importable from ``lightning_chaos.core`` directly, except the two entry points that
share their module's name: ``from lightning_chaos.core.lanczos import lanczos`` and
``from lightning_chaos.core.slq import slq``.
"""

from lightning_chaos.core.benettin import FiniteTimeLyapunov, positive_qr
from lightning_chaos.core.controlled_lyapunov import (
    ControlledLyapunov,
    CurvatureEstimate,
    HessianEigenEstimator,
    LyapunovStep,
)
from lightning_chaos.core.counts import (
    COUNT_KEYS,
    exact_summary,
    slq_spectral_count_bounds,
    slq_spectral_counts,
    slq_summary,
    spectral_counts,
)
from lightning_chaos.core.divergence import (
    DIRECTIONS,
    TwinDirections,
    default_init_distance,
    fit_divergence,
    random_walk_distance,
    sampled_init_distances,
    twin_directions,
)
from lightning_chaos.core.functional_loss import FunctionalLoss, NoLossError, RNGState
from lightning_chaos.core.lanczos import LanczosRuns, random_block
from lightning_chaos.core.operators import (
    HessianOperator,
    LinearOperator,
    LossFn,
    SecondOrderError,
    as_matmat,
    dense_hessian,
    hessian_vector_product,
    second_order_context,
    symmetric_eigh,
)
from lightning_chaos.core.params import filled, flatten, num_params, trainable_parameters, unflatten
from lightning_chaos.core.projection import (
    gradient_overlaps,
    gradient_subspace_overlap,
    project_out,
    projector,
    random_subspace_overlap,
    subspace_overlap,
)
from lightning_chaos.core.pruning import STRATEGIES, removal_basis, select_directions
from lightning_chaos.core.sgd import SGDHyperparameters, sgd_first_step
from lightning_chaos.core.slq import SLQ_REORTHOGONALIZE_BYTES, slq_count, slq_count_bounds, slq_density
from lightning_chaos.core.stability import (
    EDGE_TOLERANCE,
    EXACT_EDGE_TOLERANCE,
    classify_eigenvalues,
    local_lyapunov_exponents,
    log_tangent_map_norm,
    spectral_radius,
    stability_interval,
)
from lightning_chaos.core.step_curvature import StepCurvature
from lightning_chaos.core.tangent_map import apply_tangent_map, sgd_tangent_map
from lightning_chaos.core.validation import check_choice, check_int, check_number

__all__ = [
    # parameter space and the fixed-batch loss
    "FunctionalLoss",
    "NoLossError",
    "RNGState",
    "filled",
    "flatten",
    "num_params",
    "trainable_parameters",
    "unflatten",
    # linear algebra
    "HessianOperator",
    "LanczosRuns",
    "LinearOperator",
    "LossFn",
    "SLQ_REORTHOGONALIZE_BYTES",
    "SecondOrderError",
    "as_matmat",
    "dense_hessian",
    "hessian_vector_product",
    "random_block",
    "second_order_context",
    "slq_count",
    "slq_count_bounds",
    "slq_density",
    "symmetric_eigh",
    # SGD theory
    "COUNT_KEYS",
    "EDGE_TOLERANCE",
    "EXACT_EDGE_TOLERANCE",
    "FiniteTimeLyapunov",
    "SGDHyperparameters",
    "apply_tangent_map",
    "classify_eigenvalues",
    "exact_summary",
    "local_lyapunov_exponents",
    "log_tangent_map_norm",
    "positive_qr",
    "sgd_first_step",
    "sgd_tangent_map",
    "slq_spectral_count_bounds",
    "slq_spectral_counts",
    "slq_summary",
    "spectral_counts",
    "spectral_radius",
    "stability_interval",
    # estimators
    "ControlledLyapunov",
    "CurvatureEstimate",
    "HessianEigenEstimator",
    "LyapunovStep",
    "StepCurvature",
    # projections, CGD and divergence
    "DIRECTIONS",
    "STRATEGIES",
    "TwinDirections",
    "default_init_distance",
    "fit_divergence",
    "gradient_overlaps",
    "gradient_subspace_overlap",
    "project_out",
    "projector",
    "random_subspace_overlap",
    "random_walk_distance",
    "removal_basis",
    "sampled_init_distances",
    "select_directions",
    "subspace_overlap",
    "twin_directions",
    # argument checks
    "check_choice",
    "check_int",
    "check_number",
]
