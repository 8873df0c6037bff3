import math

import pytest
import torch
from helpers import Quadratic, planted_spectrum
from torch import nn

from lightning_chaos.core.controlled_lyapunov import ControlledLyapunov, HessianEigenEstimator
from lightning_chaos.core.functional_loss import FunctionalLoss


def quadratic_loss(model):
    return FunctionalLoss(model, model.forward)


def test_planted_top_eigenvalue_to_1e_3():
    model = Quadratic(planted_spectrum())
    loss = quadratic_loss(model)
    est = HessianEigenEstimator(top_k=1)
    iters, settled = est.warmup(loss, max_iters=300, tol=1e-4)
    assert settled, iters
    e = est.step(loss)
    assert e.valid
    exact = model.eigenvalues[0].item()
    assert abs(e.h0 - exact) / exact < 1e-3
    assert abs(e.h0_rayleigh - exact) / exact < 1e-3
    # the control drives λ → 1, i.e. β h0 → e − 1; the paper's 1/β is off by that factor
    assert abs(e.lyapunov_exponent - 1.0) < 1e-2
    assert abs(e.beta * exact - (math.e - 1)) < 5e-2
    # the residual bounds the distance to an exact eigenvalue
    assert abs(e.h0_rayleigh - exact) <= e.h0_residual + 1e-9


def test_planted_top3_and_most_negative():
    model = Quadratic(planted_spectrum())
    loss = quadratic_loss(model)
    est = HessianEigenEstimator(top_k=3, most_negative=True)
    for _ in range(400):
        e = est.step(loss)
    exact = model.eigenvalues
    torch.testing.assert_close(torch.tensor(e.top, dtype=torch.float64), exact[:3], rtol=1e-3, atol=0)
    assert abs(e.h0 - exact[0].item()) / exact[0].item() < 1e-3
    assert abs(e.h_min - exact[-1].item()) / abs(exact[-1].item()) < 1e-3
    assert abs(e.h_min_rayleigh - exact[-1].item()) / abs(exact[-1].item()) < 1e-3
    assert e.num_gradients == 1 + 3 + 1


def test_gradient_reuse_saves_one_gradient():
    model = Quadratic(planted_spectrum())
    loss = quadratic_loss(model)
    est = HessianEigenEstimator()
    g0 = loss.gradient()
    assert est.step(loss, g0=g0, n_iter=2).num_gradients == 2
    assert est.step(loss, n_iter=1).num_gradients == 2


def test_single_iteration_matches_formulas():
    """One iteration by hand: d = q + βHq, λ = log(‖d‖/‖q‖), h = (e^λ − 1)/β, q ← Δq d/‖d‖."""
    model = Quadratic(planted_spectrum(n=10))
    loss = quadratic_loss(model)
    it = ControlledLyapunov(k=1, delta_q=0.05, beta=0.3, seed=3)
    g0 = loss.gradient()
    step = it.iterate(lambda q: loss.gradients(q) - g0[:, None], 10, dtype=torch.float64)
    q = (
        0.05
        * torch.linalg.qr(
            torch.randn(10, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        ).Q
    )
    d = q + 0.3 * model.A @ q
    lam = torch.log(d.norm() / q.norm())
    assert step.exponents[0].item() == pytest.approx(lam.item(), rel=1e-12)
    assert step.eigenvalues[0].item() == pytest.approx(torch.expm1(lam).item() / 0.3, rel=1e-12)
    assert step.ritz_values[0].item() == pytest.approx((q.T @ model.A @ q).item() / 0.05**2, rel=1e-12)
    assert it.beta == pytest.approx(0.3 / lam.item(), rel=1e-12)
    torch.testing.assert_close(it.basis, d / d.norm())


def test_tanh_mlp_matches_exact_same_batch_h0():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    loss = FunctionalLoss(net, lambda: nn.functional.cross_entropy(net(x), y))
    params = [p.detach() for p in net.parameters()]
    shapes = [p.shape for p in params]

    def flat_loss(vec):
        pieces, i = [], 0
        for s, p in zip(shapes, params):
            pieces.append(vec[i : i + p.numel()].reshape(s))
            i += p.numel()
        return loss(pieces)

    theta = torch.cat([p.reshape(-1) for p in params])
    exact = torch.linalg.eigvalsh(torch.func.hessian(flat_loss)(theta))[-1].item()
    est = HessianEigenEstimator(delta_q=1e-3)
    est.warmup(loss, max_iters=500, tol=1e-5, patience=5)
    e = est.step(loss)
    assert abs(e.h0 - exact) / exact < 1e-2
    assert abs(e.h0_rayleigh - exact) / exact < 1e-2


def test_relative_delta_q_scales_with_theta_norm():
    model = Quadratic(planted_spectrum(n=10))
    loss = quadratic_loss(model)
    seen = []
    it = HessianEigenEstimator(delta_q=1e-2, relative_delta_q=True)
    orig = loss.gradients

    def spy(block):
        seen.append(block.norm(dim=0))
        return orig(block)

    loss.gradients = spy
    it.step(loss)
    torch.testing.assert_close(
        seen[0], torch.full((1,), 1e-2 * model.theta.detach().norm().item(), dtype=torch.float64)
    )


def test_invalid_step_keeps_beta_and_redraws_direction():
    it = ControlledLyapunov(k=1, beta=0.5)
    it.iterate(lambda q: 2.0 * q, 5, dtype=torch.float64)
    beta, basis = it.beta, it.basis.clone()
    step = it.iterate(lambda q: torch.full_like(q, math.nan), 5, dtype=torch.float64)
    assert not step.valid and it.beta == beta and not torch.equal(it.basis, basis)
    assert it.num_restarts == 1
    # λ ≤ 0: a negative-definite operator contracts the ascent map
    step = it.iterate(lambda q: -0.1 * q, 5, dtype=torch.float64)
    assert not step.valid


def test_state_dict_round_trip_continues_identically():
    model = Quadratic(planted_spectrum(n=12))
    loss = quadratic_loss(model)
    a = HessianEigenEstimator(top_k=2, most_negative=True)
    for _ in range(3):
        a.step(loss)
    b = HessianEigenEstimator(top_k=2, most_negative=True)
    b.load_state_dict(a.state_dict())
    assert a.step(loss) == b.step(loss)


@pytest.mark.parametrize(
    "kwargs", [{"k": 0}, {"delta_q": 0.0}, {"delta_q": -1.0}, {"beta": 0.0}, {"window": 0}]
)
def test_bad_arguments_name_the_argument(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        ControlledLyapunov(**kwargs)


def test_rounding_level_growth_is_not_a_measurement():
    """A finite difference that cancels to zero (huge weights) must not be read as h0 ≈ 0."""
    it = ControlledLyapunov(k=1, beta=1.0)
    step = it.iterate(lambda q: torch.zeros_like(q), 5, dtype=torch.float32)
    assert not step.valid and it.beta == 1.0


def test_beta_far_too_small_is_re_aimed_from_the_rayleigh_quotient():
    it = ControlledLyapunov(k=1, beta=1.0)
    step = it.iterate(lambda q: 1e-9 * q, 5, dtype=torch.float32)
    assert not step.valid
    assert it.beta == pytest.approx((math.e - 1) / 1e-9, rel=1e-3)
    assert it.iterate(lambda q: 1e-9 * q, 5, dtype=torch.float32).valid


def test_vector_fast_path_equals_the_block_qr_ritz_path():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(30, 1, generator=gen, dtype=torch.float64)).Q
    a = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    b_u = (a + a.T) @ u
    fast = ControlledLyapunov._measure_vector(u, b_u, 0.3)
    block = ControlledLyapunov._measure_block(u, b_u, 0.3)
    for x, y in zip(fast, block):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
