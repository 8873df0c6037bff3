"""Local Lyapunov exponents and the stability interval against the explicit tangent maps of SGD."""

import math

import pytest
import torch
from helpers import F64, planted, sgd_classes

from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.stability import (
    EDGE_TOLERANCE,
    EXACT_EDGE_TOLERANCE,
    classify_eigenvalues,
    local_lyapunov_exponents,
    log_tangent_map_norm,
    spectral_radius,
    stability_interval,
)
from lightning_chaos.core.tangent_map import sgd_tangent_map

MOMENTUM_CASES_FOR_NORM = [
    {"momentum": 0.9},
    {"momentum": 0.5, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.6, "dampening": 0.5, "weight_decay": 0.1},
]


def test_plain_sgd_lle_are_log_singular_values_of_the_tangent_map():
    h = torch.tensor([-3.0, -0.2, 0.0, 0.4, 1.0, 3.9, 4.1, 7.0], dtype=F64)
    a, _ = planted(h, seed=9)
    sgd = SGDHyperparameters(lr=0.5, weight_decay=0.05)
    jac = sgd_tangent_map(a, sgd)
    expected = torch.log(torch.linalg.svdvals(jac)).sort().values  # Λ = ½ log JᵀJ (seed 001, A.5)
    lle = local_lyapunov_exponents(h, sgd)
    torch.testing.assert_close(lle.sort().values, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.3}, *MOMENTUM_CASES_FOR_NORM])
def test_log_tangent_map_norm_is_the_spectral_norm_of_the_explicit_map(kwargs, first_step):
    h = torch.tensor([-2.0, -0.3, 0.0, 0.05, 0.5, 1.7, 3.0, 4.5, 9.0], dtype=F64)
    a, _ = planted(h, seed=12)
    sgd = SGDHyperparameters(lr=0.3, **kwargs)
    step = sgd.at_first_step() if first_step else sgd
    jac = sgd_tangent_map(a, step)
    expected = float(torch.log(torch.linalg.matrix_norm(jac, ord=2)))
    assert log_tangent_map_norm(h, step) == pytest.approx(expected, abs=1e-10)
    extremes = h[[0, -1]]  # the block norm is convex in h: the extremes decide
    assert log_tangent_map_norm(extremes, step) == pytest.approx(expected)
    lle_max = float(local_lyapunov_exponents(h, sgd).max())
    if not kwargs.get("momentum"):
        assert expected == pytest.approx(lle_max, abs=1e-12)  # normal map: norm = spectral radius
    else:
        assert expected > lle_max  # not normal: the largest LLE is no bound on one-step growth
    with pytest.raises(ValueError, match="at least one"):
        log_tangent_map_norm(h[:0], step)


def test_lle_is_minus_infinity_where_the_map_annihilates_the_direction():
    lle = local_lyapunov_exponents(torch.tensor([2.0, 1.0], dtype=F64), SGDHyperparameters(lr=0.5))
    assert lle[0] == -math.inf and lle[1] == pytest.approx(math.log(0.5))


def test_lle_keeps_the_floating_dtype_and_shape_of_the_input():
    sgd = SGDHyperparameters(lr=0.1, momentum=0.5)
    h = torch.tensor([[-1.0, 5.0], [30.0, 2.0]])
    lle = local_lyapunov_exponents(h, sgd)
    assert lle.dtype == torch.float32 and lle.shape == (2, 2)
    torch.testing.assert_close(lle.double(), local_lyapunov_exponents(h.double(), sgd), rtol=0, atol=1e-6)
    assert local_lyapunov_exponents(torch.tensor([1, 2]), sgd).dtype == torch.get_default_dtype()


MOMENTUM_CASES = [
    {"momentum": 0.9},
    {"momentum": 0.5, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.7, "weight_decay": 0.2},
    {"momentum": 0.6, "dampening": 0.5, "weight_decay": 0.1},
]


@pytest.mark.parametrize("kwargs", MOMENTUM_CASES)
def test_momentum_lle_matches_eigenvalues_of_the_explicit_2n_map(kwargs):
    h = torch.tensor([-2.0, -0.3, 0.0, 0.05, 0.5, 1.7, 3.0, 4.5, 9.0, 30.0], dtype=F64)
    n = h.numel()
    sgd = SGDHyperparameters(lr=0.4, **kwargs)
    a, u = planted(h, seed=10)
    jac = sgd_tangent_map(a, sgd)
    # In the eigenbasis of H the 2N x 2N map decouples into 2 x 2 blocks acting on (δθ_i, δv_i).
    basis = torch.block_diag(u, u)
    rotated = basis.T @ jac @ basis
    block_radius = torch.stack(
        [torch.linalg.eigvals(rotated[[i, n + i]][:, [i, n + i]]).abs().max() for i in range(n)]
    )
    lle = local_lyapunov_exponents(h, sgd)
    torch.testing.assert_close(lle, torch.log(block_radius), rtol=0, atol=1e-9)
    assert float(lle.max()) == pytest.approx(float(torch.linalg.eigvals(jac).abs().max().log()), abs=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.8, "nesterov": True}],
)
def test_stability_interval_bounds_the_negative_lle_region(kwargs):
    lr = 0.25
    sgd = SGDHyperparameters(lr=lr, **kwargs)
    lower, upper = stability_interval(sgd)
    expected_upper = {
        (): 2 / lr,
        ("momentum",): 2 * (1 + 0.9) / lr,
        ("dampening", "momentum"): 2 * 1.5 / (0.7 * lr),
        ("momentum", "nesterov"): 2 * 1.8 / (2.6 * lr),
    }[tuple(sorted(kwargs))]
    assert lower == 0.0 and upper == pytest.approx(expected_upper)

    def radius(curvature):  # from the explicit tangent map of a 1-parameter problem
        jac = sgd_tangent_map(torch.tensor([[curvature]], dtype=F64), sgd)
        return float(torch.linalg.eigvals(jac).abs().max())

    assert radius(0.0) == pytest.approx(1.0, abs=1e-12)
    assert radius(upper) == pytest.approx(1.0, abs=1e-7)
    inside = torch.linspace(lower, upper, 203, dtype=F64)[1:-1]
    outside = torch.cat(
        [torch.linspace(-5, lower, 50, dtype=F64)[:-1], torch.linspace(upper, 4 * upper, 50, dtype=F64)[1:]]
    )
    assert all(radius(float(c)) < 1 for c in inside)
    assert all(radius(float(c)) > 1 for c in outside)
    assert (local_lyapunov_exponents(inside, sgd) < 0).all()
    assert (local_lyapunov_exponents(outside, sgd) > 0).all()


def test_dampening_one_has_no_stability_interval():
    sgd = SGDHyperparameters(lr=0.1, momentum=0.9, dampening=1.0)
    with pytest.raises(ValueError, match="dampening=1"):
        stability_interval(sgd)
    lle = local_lyapunov_exponents(torch.tensor([-1.0, 0.0, 5.0], dtype=F64), sgd)
    torch.testing.assert_close(lle, torch.zeros(3, dtype=F64))


CLASSIFY_CASES = [
    {"lr": 0.5},
    {"lr": 0.5, "weight_decay": 0.3},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.05},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True},
]


@pytest.mark.parametrize("kwargs", CLASSIFY_CASES)
@pytest.mark.parametrize("tolerance", [0.0, EXACT_EDGE_TOLERANCE, EDGE_TOLERANCE, 0.3])
def test_classes_follow_their_definitions_and_partition_the_spectrum(kwargs, tolerance):
    gen = torch.Generator().manual_seed(0)
    h = torch.cat([torch.randn(200, generator=gen, dtype=F64) * 20, torch.zeros(5, dtype=F64)])
    sgd = SGDHyperparameters(**kwargs)
    masks = classify_eigenvalues(h, sgd, tolerance)
    expected = sgd_classes(h, **kwargs, eps=tolerance * float(h.abs().max()))
    assert list(masks) == ["chaotic", "edge", "stable", "negative", "positive", "zero"]
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
    assert ((masks["chaotic"].int() + masks["edge"].int() + masks["stable"].int()) == 1).all()
    assert ((masks["negative"].int() + masks["zero"].int() + masks["positive"].int()) == 1).all()
    lle = local_lyapunov_exponents(h, sgd)
    assert (lle[masks["chaotic"]] > 0).all() and (lle[masks["stable"]] < 0).all()


def test_default_band_is_the_edge_tolerance_relative_to_the_spectral_radius():
    assert (EDGE_TOLERANCE, EXACT_EDGE_TOLERANCE) == (2e-2, 1e-5)
    h = torch.tensor([-10.0, -0.2, -0.19, 0.19, 0.2, 0.21, 1.0, 4.0, 4.19, 4.21], dtype=F64)  # ε = 0.2
    sgd = SGDHyperparameters(lr=0.5)  # u = 4
    masks = classify_eigenvalues(h, sgd)
    assert masks["edge"].tolist() == [False, True, True, True, True, False, False, True, True, False]
    assert masks["zero"].tolist() == [False, True, True, True, True, False, False, False, False, False]
    # scale overrides the spectral radius (e.g. for a subset of the spectrum): ε = 2e-2 · 100 = 2
    assert int(classify_eigenvalues(h, sgd, scale=100.0)["edge"].sum()) == 9
    assert spectral_radius(h) == 10.0 and spectral_radius(h[:0]) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        classify_eigenvalues(h, sgd, -1e-3)
