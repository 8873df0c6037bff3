"""Stochastic Lanczos quadrature against the exact spectral measure of planted matrices."""

import importlib
import math

import pytest
import torch
from helpers import (
    F64,
    RESOLVABLE_COUNTS,
    Recorder,
    planted,
    resolvable_slq,
    resolvable_spectrum,
    sgd_classes,
)

from lightning_chaos.core.counts import slq_spectral_counts
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.slq import cdf_bracket, slq, slq_count, slq_count_bounds, slq_density
from lightning_chaos.core.stability import EXACT_EDGE_TOLERANCE


def test_slq_with_full_krylov_space_is_the_exact_hutchinson_estimate():
    h = torch.linspace(-3, 5, 40, dtype=F64)
    a, u = planted(h, seed=4)
    op = Recorder(a)
    probes, nodes_all, weights_all = [], [], []
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        op.new_run()
        nodes, weights = slq(op, num_probes=1, num_steps=40, generator=gen)
        nodes_all.append(nodes)
        weights_all.append(weights)
        probes.append(op.first_blocks[-1][:, 0])
    nodes, weights = torch.cat(nodes_all), torch.cat(weights_all)
    torch.testing.assert_close(weights.sum(1), torch.ones(6, dtype=F64), rtol=0, atol=1e-12)
    mass = (u.T @ torch.stack(probes, 1)) ** 2  # (N, P): exact spectral weights (v_iᵀ u_p)²
    for lower, upper in ((-math.inf, 0.0), (0.0, 2.5), (1.0, math.inf)):
        inside = (h >= lower) & (h <= upper)
        expected = 40 * mass[inside].sum(0).mean()
        assert slq_count(nodes, weights, 40, lower, upper) == pytest.approx(float(expected), abs=1e-9)
    trace = 40 * (weights * nodes).sum(1).mean()  # Hutchinson trace: N mean_p u_pᵀ A u_p
    expected_trace = (
        40 * torch.einsum("np,nm,mp->p", torch.stack(probes, 1), a, torch.stack(probes, 1)).mean()
    )
    torch.testing.assert_close(trace, expected_trace, rtol=0, atol=1e-10)


def test_rademacher_probes_of_a_diagonal_matrix_count_exactly():
    # (e_iᵀ z)² / ‖z‖² = 1/N for z ∈ {±1}^N: with a full Krylov space the estimate is the exact count.
    h = torch.tensor([-4.0, -1.0, 0.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 9.0], dtype=F64)
    nodes, weights = slq(
        torch.diag(h), num_probes=3, num_steps=10, generator=torch.Generator().manual_seed(0)
    )
    for lower, upper, count in ((-math.inf, -0.5, 2), (-0.25, 0.25, 2), (2.5, 3.5, 3), (-1.5, math.inf, 9)):
        assert slq_count(nodes, weights, 10, lower, upper) == pytest.approx(count, abs=1e-9)


def test_slq_without_reorthogonalisation_keeps_the_counts_and_is_chosen_for_large_bases(monkeypatch):
    h = resolvable_spectrum()
    n = h.numel()
    sgd = SGDHyperparameters(lr=0.1)

    def run(**kwargs):
        gen = torch.Generator().manual_seed(1)
        return slq(lambda v: h * v, n, 10, 80, gen, distribution="gaussian", dtype=F64, **kwargs)

    plain = run(reorthogonalize=False)
    assert torch.allclose(plain[1].sum(dim=1), torch.ones(10, dtype=F64))  # still a probability measure
    estimate = slq_spectral_counts(*plain, n, sgd, EXACT_EDGE_TOLERANCE)
    for key, value in RESOLVABLE_COUNTS.items():
        assert abs(estimate[key] - value) <= 0.02 * n, (key, estimate[key], value)
    # the 10 x 80 x 2000 float64 basis is 12.8 MB: reorthogonalised by default, not below a smaller budget
    assert all(torch.equal(a, b) for a, b in zip(run(), resolvable_slq()))
    # (the function slq shadows the module as an attribute of lightning_chaos.core: patch the module itself)
    module = importlib.import_module("lightning_chaos.core.slq")
    monkeypatch.setattr(module, "SLQ_REORTHOGONALIZE_BYTES", 10 * 80 * n * 8 - 1)
    assert all(torch.equal(a, b) for a, b in zip(run(), plain))


def test_probes_per_block_only_regroups_the_runs():
    h = resolvable_spectrum()[::10]
    one = slq(lambda v: h * v, h.numel(), 6, 30, torch.Generator().manual_seed(2), dtype=F64)
    split = slq(
        lambda v: h * v, h.numel(), 6, 30, torch.Generator().manual_seed(2), dtype=F64, probes_per_block=4
    )
    # the same probes are drawn (4 then 2 instead of 6 at once is another stream): the rules are rules
    for nodes, weights in (one, split):
        assert nodes.shape == weights.shape == (6, 30)
        torch.testing.assert_close(weights.sum(1), torch.ones(6, dtype=F64), rtol=0, atol=1e-12)
        assert float(nodes.min()) >= float(h.min()) - 1e-9 and float(nodes.max()) <= float(h.max()) + 1e-9
    with pytest.raises(ValueError, match="num_probes"):
        slq(torch.diag(h), num_probes=0)


def test_slq_bounds_bracket_the_exact_probe_masses_of_a_relu_like_spectrum():
    # Dense bulk through 0 plus an atom of exact zeros: the point estimate of the sign split is unreliable
    # at moderate m, but the Chebyshev-Markov-Stieltjes bracket must contain the exact probe masses.
    gen = torch.Generator().manual_seed(6)
    h = torch.cat(
        [
            -0.3 * torch.rand(60, generator=gen, dtype=F64) ** 2,
            torch.zeros(80, dtype=F64),
            2.0 * torch.rand(150, generator=gen, dtype=F64) ** 2,
            torch.tensor([6.0, 9.0, 14.0, 25.0, 31.0], dtype=F64),
        ]
    )
    a, u = planted(h, seed=7)
    op = Recorder(a)
    nodes, weights = slq(op, num_probes=8, num_steps=30, generator=torch.Generator().manual_seed(8))
    mass = (u.T @ op.first_blocks[0]) ** 2
    eps = EXACT_EDGE_TOLERANCE * 31.0
    for lower, upper in ((-math.inf, -eps), (-eps, eps), (eps, 20.0), (20.0, math.inf), (-0.1, 1.0)):
        exact = float(h.numel() * mass[(h >= lower) & (h <= upper)].sum(0).mean())
        low, high = slq_count_bounds(nodes, weights, h.numel(), lower, upper)
        assert low - 1e-9 <= exact <= high + 1e-9, (lower, upper, low, exact, high)
        assert low - 1e-9 <= slq_count(nodes, weights, h.numel(), lower, upper) <= high + 1e-9
    # per probe, F(t) and F(t−) are bracketed at every t (here at the nodes themselves and in the gaps)
    for t in (-0.2, 0.0, 1.0, 6.0, 14.0, 31.0, 40.0):
        for strict in (False, True):
            low, high = cdf_bracket(nodes, weights, t, strict)
            cdf = mass[(h < t) if strict else (h <= t)].sum(0)
            assert ((low - 1e-12 <= cdf) & (cdf <= high + 1e-12)).all(), (t, strict)


def test_slq_density_integrates_to_one_and_matches_smoothed_spectrum():
    h = resolvable_spectrum()
    nodes, weights = resolvable_slq()
    grid = torch.linspace(-20, 80, 5001, dtype=F64)
    density = slq_density(nodes, weights, grid, bandwidth=2.0)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    exact = torch.exp(-0.5 * ((grid[:, None] - h) / 2.0) ** 2).mean(1) / (2.0 * math.sqrt(2 * math.pi))
    assert float(torch.trapezoid((density - exact).abs(), grid)) < 0.05
    with pytest.raises(ValueError, match="bandwidth"):
        slq_density(nodes, weights, grid, bandwidth=0.0)


def test_resolvable_spectrum_has_its_planted_counts():
    masks = sgd_classes(resolvable_spectrum(), lr=0.1, eps=EXACT_EDGE_TOLERANCE * 60)
    # the outliers reach at most 60: ε < 6e-4 separates the zeros from the bulks at either radius
    assert {f"n_{k}": int(m.sum()) for k, m in masks.items()} == RESOLVABLE_COUNTS
