"""Which eigendirections CGD removes: the selection rules and the removal basis of a planted Hessian."""

import math

import pytest
import torch
from helpers import F64, Quadratic, orthonormal

from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.projection import project_out, projector
from lightning_chaos.core.pruning import STRATEGIES, removal_basis, select_directions
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.step_curvature import StepCurvature
from lightning_chaos.core.tangent_map import sgd_tangent_map

# planted spectrum for lr = 0.5 (2/γ = 4): indices 0-2 negative, 3-4 exact-zero noise, 5-7 stable,
# 8 on the edge 2/γ, 9-10 beyond it
H = torch.tensor([-3.0, -1.0, -0.1, -1e-8, 1e-8, 0.5, 2.0, 3.5, 4.0, 4.5, 6.0], dtype=F64)
SGD = SGDHyperparameters(lr=0.5)


@pytest.mark.parametrize(
    ("strategy", "removed"),
    [
        ("chaotic", [0, 1, 2, 9, 10]),
        ("negative", [0, 1, 2]),
        ("positive", [9, 10]),
        ("positive_curvature", [5, 6, 7, 8, 9, 10]),
    ],
)
def test_select_directions_by_strategy(strategy, removed):
    mask = select_directions(H, SGD, strategy)
    assert mask.dtype == torch.bool
    assert mask.nonzero().flatten().tolist() == removed
    # edge directions near 0 (3, 4) are never removed; the chaos criteria keep the edge 2/γ (8) too
    assert not mask[[3, 4]].any()
    if strategy != "positive_curvature":  # every direction a chaos criterion removes has |1 − γh| > 1
        assert ((1 - 0.5 * H[mask]).abs() > 1).all()
        assert not mask[8]


def test_select_directions_with_momentum_moves_the_upper_boundary():
    # heavy ball μ = 0.5: stable for 0 < h < 2(1 + μ)/γ = 6
    heavy = SGDHyperparameters(lr=0.5, momentum=0.5)
    mask = select_directions(H, heavy, "positive")
    assert mask.nonzero().flatten().tolist() == []
    mask = select_directions(torch.tensor([5.9, 6.1], dtype=F64), heavy, "chaotic")
    assert mask.tolist() == [False, True]


def test_select_directions_rejects_unknown_strategy():
    assert STRATEGIES == ("chaotic", "negative", "positive", "positive_curvature")
    with pytest.raises(ValueError, match=r"strategy.*'chaotic', 'negative', 'positive'.*'everything'"):
        select_directions(H, SGD, "everything")


def test_cgd_projection_removes_every_chaotic_lle():
    # seed 001, A.7: with P projecting out the chaotic eigenvectors, the modified map I − γ P H has the
    # removed directions at multiplier 1 (LLE 0) and keeps the others' 1 − γ h.
    lr = 0.5
    u = orthonormal(H.numel(), H.numel(), seed=2)
    hessian = (u * H) @ u.T
    removed = select_directions(H, SGD, "chaotic")
    p = projector(u[:, removed])
    modified = torch.eye(H.numel(), dtype=F64) - lr * p @ hessian
    multipliers = torch.linalg.eigvals(modified)
    assert float(multipliers.abs().max()) <= 1 + lr * 1e-8 + 1e-12  # the edge direction h = -1e-8 is kept
    expected = torch.where(removed, torch.ones_like(H), 1 - lr * H).sort().values
    torch.testing.assert_close(multipliers.real.sort().values, expected, rtol=0, atol=1e-10)
    # the projected SGD update has no component along removed eigenvectors
    gradient = torch.randn(H.numel(), generator=torch.Generator().manual_seed(3), dtype=F64)
    update = project_out(-lr * gradient, u[:, removed])
    assert float((u[:, removed].T @ update).abs().max()) < 1e-14
    assert torch.allclose(u[:, ~removed].T @ update, u[:, ~removed].T @ (-lr * gradient), rtol=0, atol=1e-14)
    assert not torch.allclose(sgd_tangent_map(hessian, SGD), modified)


# ------------------------------------------------------------------ removal_basis

SPECTRUM = torch.tensor([-5.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 9.0, 12.0, 20.0], dtype=F64)  # 2/γ = 4


def curvature_of(spectrum, seed=0):
    model = Quadratic(spectrum, seed=seed)
    return model, StepCurvature(FunctionalLoss(model, model.forward))


def eigenvectors_of(model, values):
    """The planted eigenvectors (columns of U, in the order of SPECTRUM) of the given distinct eigenvalues."""
    return torch.stack([model.eigenvectors[:, SPECTRUM.tolist().index(v)] for v in values], dim=1)


@pytest.mark.parametrize(
    ("strategy", "k", "expected"),
    [
        ("chaotic", None, [-5.0, -2.0, -1.0, 9.0, 12.0, 20.0]),
        ("chaotic", 1, [-5.0, 20.0]),
        ("negative", 2, [-5.0, -2.0]),
        ("positive", None, [9.0, 12.0, 20.0]),
        ("positive_curvature", 2, [20.0, 12.0]),
    ],
)
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_removal_basis_spans_the_selected_planted_eigenvectors(strategy, k, expected, method):
    if method == "lanczos" and k is None:
        k = 3  # Lanczos needs k: the three extremes per end contain every selected direction here
    model, curvature = curvature_of(SPECTRUM)
    basis, values = removal_basis(
        curvature, SGD, strategy, method, k, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        values.sort().values, torch.tensor(sorted(expected), dtype=F64), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(basis.T @ basis, torch.eye(len(expected), dtype=F64), rtol=0, atol=1e-10)
    planted = eigenvectors_of(model, expected)
    torch.testing.assert_close(basis @ basis.T, planted @ planted.T, rtol=0, atol=1e-8)
    assert not basis.requires_grad and not values.requires_grad


def test_removal_basis_shares_the_steps_eigendecomposition():
    _, curvature = curvature_of(SPECTRUM)
    removal_basis(curvature, SGD, "negative")
    eigh = curvature.cache["eigh"]
    removal_basis(curvature, SGD, "chaotic")
    assert curvature.cache["eigh"] is eigh and curvature.loss.num_gradients == 0


def test_removal_basis_refuses_lanczos_without_k_and_non_finite_hessians():
    _, curvature = curvature_of(SPECTRUM)
    with pytest.raises(ValueError, match="needs k"):
        removal_basis(curvature, SGD, "chaotic", "lanczos")
    model, curvature = curvature_of(SPECTRUM)
    with torch.no_grad():
        model.A[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        removal_basis(curvature, SGD, "chaotic")
