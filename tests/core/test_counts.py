"""Chaotic / edge / stable counts: exact ones of planted spectra, SLQ estimates against exact probe masses."""

import math

import pytest
import torch
from helpers import (
    F64,
    RESOLVABLE_COUNTS,
    Recorder,
    mlp_loss,
    planted,
    resolvable_slq,
    resolvable_spectrum,
    sgd_classes,
)

from lightning_chaos.core.counts import (
    COUNT_KEYS,
    exact_summary,
    slq_spectral_count_bounds,
    slq_spectral_counts,
    slq_summary,
    spectral_counts,
)
from lightning_chaos.core.operators import HessianOperator, dense_hessian
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.slq import slq, slq_count_bounds
from lightning_chaos.core.stability import (
    EDGE_TOLERANCE,
    EXACT_EDGE_TOLERANCE,
    classify_eigenvalues,
    local_lyapunov_exponents,
)

EXACT = EXACT_EDGE_TOLERANCE


def counts(**values):
    return dict(zip(COUNT_KEYS, (values[k.removeprefix("n_")] for k in COUNT_KEYS), strict=True))


def test_spectral_counts_of_a_planted_spectrum():
    sgd = SGDHyperparameters(lr=0.5)  # 2/γ = 4
    rho = 10.0
    noise = 1e-8 * rho  # how exact zeros come out of eigvalsh
    h = torch.tensor(
        [
            -10.0,
            -2.0,
            -0.5,
            -noise,
            0.0,
            noise,
            2e-4,
            0.3,
            1.0,
            3.9,
            4.0 - noise,
            4.0,
            4.0 + 2 * noise,
            4.5,
            9.0,
        ],
        dtype=F64,
    )
    edge = torch.zeros(15, dtype=torch.bool)
    edge[[3, 4, 5, 10, 11, 12]] = True
    fine = spectral_counts(h, sgd, EXACT)
    assert fine == counts(chaotic=5, edge=6, stable=4, negative=3, positive=9, zero=3)
    lle = local_lyapunov_exponents(h, sgd)
    assert int((lle[~edge] > 0).sum()) == fine["n_chaotic"]
    assert int((lle[~edge] < 0).sum()) == fine["n_stable"]
    assert float(lle[edge].abs().max()) < 1e-6
    # a tolerance of 0 leaves only exact boundary values on the edge
    strict = spectral_counts(h, sgd, tolerance=0.0)
    assert strict == counts(chaotic=7, edge=2, stable=6, negative=4, positive=10, zero=1)
    # an explicit scale overrides the spectral radius: ε = 1e-5 * 2e4 = 0.2
    assert spectral_counts(h, sgd, EXACT, scale=2e4)["n_edge"] == 8
    # the default band is EDGE_TOLERANCE (changed from 1e-5): ε = 2e-2 * 10 = 0.2 also takes 2e-4 and 3.9
    default = spectral_counts(h, sgd)
    assert default == spectral_counts(h, sgd, EDGE_TOLERANCE)
    assert default == counts(chaotic=5, edge=8, stable=2, negative=3, positive=8, zero=4)


def test_spectral_counts_with_momentum_and_weight_decay():
    lr, mu = 0.1, 0.9  # heavy-ball stable interval (0, 38)
    h = torch.tensor([-1.0, -0.05, 0.0, 0.0, 1.0, 37.0, 38.0, 39.0], dtype=F64)
    heavy = SGDHyperparameters(lr=lr, momentum=mu)
    assert spectral_counts(h, heavy, EXACT) == counts(
        chaotic=3, edge=3, stable=2, negative=2, positive=4, zero=2
    )
    # weight decay wd = 0.1 shifts the effective curvature: exact zeros become stable, -0.05 too
    decayed = SGDHyperparameters(lr=lr, momentum=mu, weight_decay=0.1)
    assert spectral_counts(h, decayed, EXACT) == counts(
        chaotic=3, edge=0, stable=5, negative=1, positive=7, zero=0
    )
    # Nesterov: (0, 2(1+μ)/((1+2μ)γ)) = (0, 13.57...)
    nesterov = SGDHyperparameters(lr=lr, momentum=mu, nesterov=True)
    assert spectral_counts(h, nesterov, EXACT)["n_chaotic"] == 5


def test_relu_zero_eigenvalues_are_edge_in_float32_and_float64():
    loss64, params64 = mlp_loss(sizes=(6, 16, 16, 4), batch=12, act=torch.relu, seed=11)
    loss32, params32 = mlp_loss(sizes=(6, 16, 16, 4), batch=12, act=torch.relu, seed=11, dtype=torch.float32)
    h64 = torch.linalg.eigvalsh(dense_hessian(loss64, params64))
    h32 = torch.linalg.eigvalsh(dense_hessian(loss32, params32)).to(F64)
    rho = float(h64.abs().max())
    exact_zeros = h64.abs() < 1e-12 * rho
    assert int(exact_zeros.sum()) > 20  # dead units and the rank deficit of a small batch
    # float32 rounding moves the exact zeros by far less than the finest (exact) band
    assert float(h32[exact_zeros].abs().max()) < EXACT * rho / 100
    sgd = SGDHyperparameters(lr=1.0 / float(h64.max()))
    m64, m32 = classify_eigenvalues(h64, sgd, EXACT), classify_eigenvalues(h32, sgd, EXACT)
    assert m64["edge"][exact_zeros].all() and m32["edge"][exact_zeros].all()
    assert m64["zero"][exact_zeros].all() and m32["zero"][exact_zeros].all()
    # edge directions have an LLE indistinguishable from 0
    lle = local_lyapunov_exponents(h64, sgd)
    assert float(lle[m64["edge"]].abs().max()) <= 1.01 * sgd.lr * EXACT * rho
    c64, c32 = spectral_counts(h64, sgd, EXACT), spectral_counts(h32, sgd, EXACT)
    borderline = int(((h64.abs() - EXACT * rho).abs() < 1e-6 * rho).sum())
    assert all(abs(c64[key] - c32[key]) <= borderline for key in c64)
    assert c64["n_chaotic"] + c64["n_edge"] + c64["n_stable"] == h64.numel()
    assert c64["n_negative"] + c64["n_zero"] + c64["n_positive"] == h64.numel()
    assert c64["n_chaotic"] == int((h64 < -EXACT * rho).sum())  # no curvature beyond 2/γ = 2 h0


def test_slq_spectral_counts_within_two_percent_of_exact():
    h = resolvable_spectrum()
    n, sgd = h.numel(), SGDHyperparameters(lr=0.1)
    assert spectral_counts(h, sgd, EXACT) == RESOLVABLE_COUNTS
    nodes, weights = resolvable_slq()
    estimate = slq_spectral_counts(nodes, weights, n, sgd, EXACT)
    assert set(estimate) == set(RESOLVABLE_COUNTS)
    for key, value in RESOLVABLE_COUNTS.items():
        assert abs(estimate[key] - value) <= 0.02 * n, (key, estimate[key], value)
    assert estimate["n_chaotic"] + estimate["n_edge"] + estimate["n_stable"] == pytest.approx(n)


def relu_like_spectrum():
    gen = torch.Generator().manual_seed(6)
    return torch.cat(
        [
            -0.3 * torch.rand(60, generator=gen, dtype=F64) ** 2,
            torch.zeros(80, dtype=F64),
            2.0 * torch.rand(150, generator=gen, dtype=F64) ** 2,
            torch.tensor([6.0, 9.0, 14.0, 25.0, 31.0], dtype=F64),
        ]
    )


@pytest.mark.parametrize("tolerance", [EXACT, EDGE_TOLERANCE])
@pytest.mark.parametrize("kwargs", [{"lr": 0.1}, {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.2}])
def test_slq_class_brackets_contain_the_exact_probe_masses_and_the_point_estimates(kwargs, tolerance):
    h = relu_like_spectrum()
    a, u = planted(h, seed=7)
    n = h.numel()
    sgd = SGDHyperparameters(**kwargs)
    op = Recorder(a)
    nodes, weights = slq(op, num_probes=8, num_steps=30, generator=torch.Generator().manual_seed(8))
    mass = (u.T @ op.first_blocks[0]) ** 2  # (N, P) exact (v_iᵀ u_p)²
    masks = sgd_classes(h, **kwargs, eps=tolerance * 31.0)  # the classes written out, not the package's
    bounds = slq_spectral_count_bounds(nodes, weights, n, sgd, tolerance, scale=31.0)
    estimate = slq_spectral_counts(nodes, weights, n, sgd, tolerance, scale=31.0)
    assert list(bounds) == list(estimate) == list(COUNT_KEYS)
    for name, mask in masks.items():
        low, high = bounds[f"n_{name}"]
        exact = float(n * mass[mask].sum(0).mean())
        assert 0 <= low and high <= n, (kwargs, name, low, high)
        assert low - 1e-9 <= exact <= high + 1e-9, (kwargs, name, low, exact, high)
        assert low - 1e-9 <= estimate[f"n_{name}"] <= high + 1e-9, (kwargs, name)


def test_overlapping_edge_bands_leave_stable_empty_instead_of_raising():
    # Behaviour change: with 2ε ≥ u the bands of 0 and u meet; the brackets used to raise ValueError
    # ("the edge bands overlap"). Now stable is empty and edge is the one interval [−ε, u + ε], as in the
    # exact classification. lr = 0.1 (u = 20), tolerance 0.5 at scale 31: ε = 15.5.
    h = relu_like_spectrum()
    a, u = planted(h, seed=7)
    n = h.numel()
    sgd = SGDHyperparameters(lr=0.1)
    op = Recorder(a)
    nodes, weights = slq(op, num_probes=8, num_steps=30, generator=torch.Generator().manual_seed(8))
    mass = (u.T @ op.first_blocks[0]) ** 2
    bounds = slq_spectral_count_bounds(nodes, weights, n, sgd, tolerance=0.5, scale=31.0)
    estimate = slq_spectral_counts(nodes, weights, n, sgd, tolerance=0.5, scale=31.0)
    assert bounds["n_stable"] == (0.0, 0.0) and estimate["n_stable"] == 0.0
    masks = sgd_classes(h, lr=0.1, eps=15.5)
    assert int(masks["edge"].sum()) == n  # every eigenvalue lies in [−15.5, 35.5]
    for name, mask in masks.items():
        low, high = bounds[f"n_{name}"]
        exact = float(n * mass[mask].sum(0).mean())
        assert low - 1e-9 <= exact <= high + 1e-9, (name, low, exact, high)


def test_a_large_spectral_radius_at_a_large_learning_rate_counts_the_band_as_edge():
    # lr 0.2 (u = 10) and an eigenvalue of 300: the default band ε = 2e-2 · 300 = 6 covers [−6, 16], so the
    # two edge bands meet. Diagonal A with Rademacher probes and a full Krylov space: exact SLQ counts.
    h = torch.tensor([-20.0, -3.0, 0.0, 2.0, 4.0, 9.0, 12.0, 20.0, 40.0, 300.0], dtype=F64)
    sgd = SGDHyperparameters(lr=0.2)
    expected = counts(chaotic=4, edge=6, stable=0, negative=1, positive=5, zero=4)
    assert spectral_counts(h, sgd) == expected
    nodes, weights = slq(
        torch.diag(h), num_probes=4, num_steps=10, generator=torch.Generator().manual_seed(0)
    )
    bounds = slq_spectral_count_bounds(nodes, weights, 10, sgd)
    estimate = slq_spectral_counts(nodes, weights, 10, sgd)
    for key, value in expected.items():
        assert estimate[key] == pytest.approx(value, abs=1e-9), key
        assert bounds[key][0] - 1e-9 <= value <= bounds[key][1] + 1e-9, key
    assert bounds["n_stable"] == (0.0, 0.0)


def test_slq_on_hessian_operator_counts_outliers_and_brackets_the_rest():
    loss_fn, params = mlp_loss(sizes=(6, 16, 16, 4), batch=32, act=torch.relu, seed=3)
    hess = dense_hessian(loss_fn, params)
    h, vectors = torch.linalg.eigh(hess)
    n, lr = h.numel(), 2.0 / float(h[-4] + h[-5]) * 2  # 2/γ between the 4th and 5th largest eigenvalue
    sgd = SGDHyperparameters(lr=lr)
    op = HessianOperator(loss_fn, params)
    recorder_blocks = []
    matmat = op.matmat

    def recording_matmat(block):
        if not recorder_blocks:
            recorder_blocks.append(block.clone())
        return matmat(block)

    op.matmat = recording_matmat
    nodes, weights = slq(op, num_probes=10, num_steps=60, generator=torch.Generator().manual_seed(0))
    assert op.num_hvps == 600
    estimate = slq_spectral_counts(nodes, weights, n, sgd, EXACT)
    exact = spectral_counts(h, sgd, EXACT)
    above = float(h.numel() * ((vectors.T @ recorder_blocks[0]) ** 2)[h > 2 / lr].sum(0).mean())
    assert estimate["n_chaotic"] - estimate["n_negative"] == pytest.approx(above, abs=0.3)
    assert exact["n_chaotic"] - exact["n_negative"] == 4
    low, high = slq_count_bounds(nodes, weights, n, upper=-EXACT * float(h.abs().max()))
    probe_mass = float(n * ((vectors.T @ recorder_blocks[0]) ** 2)[h < -EXACT * h.abs().max()].sum(0).mean())
    assert low - 1e-6 <= probe_mass <= high + 1e-6


def test_summaries_add_the_extreme_exponents_and_the_band():
    h = torch.tensor([-20.0, -3.0, 0.0, 2.0, 4.0, 9.0, 12.0, 20.0, 40.0, 300.0], dtype=F64)
    sgd = SGDHyperparameters(lr=0.2)
    exact = exact_summary(h, sgd)
    assert exact["edge_tolerance"] == EDGE_TOLERANCE
    assert {k: exact[k] for k in COUNT_KEYS} == spectral_counts(h, sgd)
    assert exact["lle_max"] == pytest.approx(math.log(59.0), abs=1e-12)  # |1 − 60|
    assert exact["lle_min"] == pytest.approx(math.log(0.2), abs=1e-12)  # h = 4, closest to 1/γ = 5
    assert exact_summary(h, sgd, EXACT)["edge_tolerance"] == EXACT
    nodes, weights = slq(
        torch.diag(h), num_probes=2, num_steps=10, generator=torch.Generator().manual_seed(0)
    )
    summary = slq_summary(nodes, weights, 10, h[[0, -1]], sgd)
    assert summary["edge_tolerance"] == EDGE_TOLERANCE
    for key in COUNT_KEYS:
        assert summary[key] == pytest.approx(exact[key], abs=1e-9)
        assert summary[f"{key}_low"] <= summary[key] + 1e-9 <= summary[f"{key}_high"] + 2e-9
    assert summary["lle_max"] == pytest.approx(exact["lle_max"], abs=1e-12)  # from the extremes
    assert summary["lle_min"] == pytest.approx(exact["lle_min"], abs=1e-9)  # from the nodes
