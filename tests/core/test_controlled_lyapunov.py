"""The controlled Lyapunov iteration with Rayleigh–Ritz, against exact linear algebra."""

import math

import pytest
import torch
from conftest import Quadratic, planted_spectrum
from helpers import OnceTanh
from torch import nn

from lightning_chaos.core.controlled_lyapunov import (
    GRAPH_COST,
    HVP_COST,
    ControlledLyapunov,
    DirectionProbe,
    FiniteDifferenceScale,
    HessianEigenEstimator,
    _KrylovSpace,
)
from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.operators import SecondOrderError
from lightning_chaos.core.step_curvature import StepCurvature

F64 = torch.float64


def curvature_of(model, compute=None):
    return StepCurvature(FunctionalLoss(model, compute or model.forward))


def krylov_ritz(a, start, m):
    """Top Ritz value of span{v, Av, …, A^{m−1}v}, built independently (monomial basis + QR)."""
    columns = [start / start.norm()]
    for _ in range(m - 1):
        nxt = a @ columns[-1]
        columns.append(nxt / nxt.norm())
    q = torch.linalg.qr(torch.stack(columns, dim=1)).Q
    return float(torch.linalg.eigvalsh(q.T @ a @ q)[-1])


@pytest.mark.parametrize("products", ["auto", "exact", "finite_difference"])
def test_planted_top_eigenvalue_and_most_negative(products):
    model = Quadratic(planted_spectrum())
    est = HessianEigenEstimator(products=products, most_negative=True)
    for _ in range(5):
        e = est.step(curvature_of(model))
        assert e.valid and e.converged
    h = model.eigenvalues
    assert e.h0 == pytest.approx(h[0].item(), rel=1e-3)
    assert e.h_min == pytest.approx(h[-1].item(), rel=1e-3)
    assert e.exact_products == (products == "exact")  # "auto": finite differences are exact on a quadratic
    # a Ritz value of exact products never exceeds the largest eigenvalue (Courant–Fischer)
    assert e.h0 <= h[0].item() * (1 + 1e-12)
    assert abs(e.h0 - h[0].item()) <= e.h0_residual + 1e-9


def test_top_k_ritz_values_of_a_planted_spectrum():
    model = Quadratic(planted_spectrum())
    est = HessianEigenEstimator(top_k=3, products="exact", n_iter=12, budget=math.inf)
    for _ in range(10):
        e = est.step(curvature_of(model))
    torch.testing.assert_close(torch.tensor(e.top, dtype=F64), model.eigenvalues[:3], rtol=1e-4, atol=0)


def test_one_product_is_the_papers_iteration():
    """n = 1: d = u + βHu, λ = log‖d‖, h = (e^λ − 1)/β, Ritz value = Rayleigh quotient, β ← β/λ, u ← d/‖d‖."""
    a = torch.diag(torch.linspace(-2.0, 9.0, 10, dtype=F64))
    it = ControlledLyapunov(beta=0.3, seed=3)
    step = it.step(a.__matmul__, 10, dtype=F64, max_products=1)
    u = torch.linalg.qr(torch.randn(10, 1, generator=torch.Generator().manual_seed(3), dtype=F64)).Q
    d = u + 0.3 * a @ u
    lam = torch.log(d.norm())
    assert step.num_products == 1
    assert step.exponents[0].item() == pytest.approx(lam.item(), rel=1e-12)
    assert step.lyapunov[0].item() == pytest.approx(torch.expm1(lam).item() / 0.3, rel=1e-12)
    assert step.ritz_values[0].item() == pytest.approx((u.T @ a @ u).item(), rel=1e-12)
    assert step.residuals[0].item() == pytest.approx((a @ u - (u.T @ a @ u) * u).norm().item(), rel=1e-10)
    assert it.beta == pytest.approx(0.3 / lam.item(), rel=1e-12)
    torch.testing.assert_close(it.basis, d / d.norm())


@pytest.mark.parametrize("m", [2, 3, 5, 9, 12])
def test_m_products_give_the_ritz_value_of_the_m_dimensional_krylov_space(m):
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=F64)).Q
    a = q @ torch.diag(torch.linspace(-3.0, 10.0, 30, dtype=F64)) @ q.T
    it = ControlledLyapunov(seed=4)
    start = torch.linalg.qr(torch.randn(30, 1, generator=torch.Generator().manual_seed(4), dtype=F64)).Q[:, 0]
    step = it.step(a.__matmul__, 30, dtype=F64, max_products=m, tol=1e-12)
    assert step.num_products == m and not step.converged
    assert step.ritz_values[0].item() == pytest.approx(krylov_ritz(a, start, m), rel=1e-10)


@pytest.mark.parametrize("start_columns", [1, 3])
def test_the_growing_krylov_space_keeps_its_projection_exact(start_columns):
    gen = torch.Generator().manual_seed(7)
    dim, capacity = 40, 11
    a = torch.randn(dim, dim, generator=gen, dtype=F64)
    a = a + a.T
    warm = torch.linalg.qr(torch.randn(dim, start_columns, generator=gen, dtype=F64)).Q
    kept = warm.clone()
    space = _KrylovSpace(warm, a @ warm, capacity)
    columns = [warm]
    for _ in range(capacity - start_columns):  # crosses the geometric growth of the storage
        basis = torch.cat(columns, dim=1)
        v = torch.randn(dim, 1, generator=gen, dtype=F64)
        v = v - basis @ (basis.T @ v)
        v = v / v.norm()
        columns.append(v)
        space.append(v, a @ v)
    basis = torch.cat(columns, dim=1)
    torch.testing.assert_close(space.basis, basis, rtol=0, atol=0)
    torch.testing.assert_close(space.images, a @ basis, rtol=0, atol=1e-12)
    torch.testing.assert_close(space.projected, basis.T @ a @ basis, rtol=0, atol=1e-12)
    values, coefficients = space.rayleigh_ritz(2)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(basis.T @ a @ basis).flip(0)[:2])
    ritz_vectors = basis @ coefficients  # Galerkin condition: the residuals are orthogonal to span(V)
    residuals = a @ ritz_vectors - ritz_vectors * values
    torch.testing.assert_close(basis.T @ residuals, torch.zeros(capacity, 2, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(warm, kept, rtol=0, atol=0)  # the caller's warm block is not written


def test_an_invariant_krylov_space_stops_early_and_is_exact():
    a = torch.diag(torch.tensor([5.0, 5.0, 1.0, 1.0], dtype=F64))
    it = ControlledLyapunov()
    step = it.step(a.__matmul__, 4, dtype=F64, max_products=6, tol=1e-14)
    assert step.converged and step.num_products <= 2
    assert step.ritz_values[0].item() == pytest.approx(5.0, rel=1e-12)


def test_unrelated_top_eigenvectors_are_flagged_or_converged():
    """Every step a fresh random rotation of one spectrum: the warm start carries nothing."""
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 8.5]), torch.linspace(-2.0, 6.0, 57)]).double()
    est = HessianEigenEstimator(products="exact", n_iter=2, budget=math.inf)
    flags, errors = [], []
    for t in range(61):
        e = est.step(curvature_of(Quadratic(spectrum, seed=100 + t)))
        if t:  # after the warm-up
            flags.append(e.converged)
            errors.append(abs(e.h0 - 10.0) / 10.0)
    assert sum(flags) <= 0.2 * len(flags)  # two products from an unrelated start rarely converge
    assert sorted(errors)[len(errors) // 2] > 0.05  # and the estimates are indeed far off
    off_but_flagged = sum(f and err > 0.1 for f, err in zip(flags, errors, strict=True))
    assert off_but_flagged <= 0.05 * len(flags)  # the flag is honest
    # with enough products per step (and a tolerance that sees the gap h0 − h1) the same sequence converges
    est = HessianEigenEstimator(products="exact", n_iter=60, tol=1e-3, budget=math.inf)
    for t in range(10):
        e = est.step(curvature_of(Quadratic(spectrum, seed=100 + t)))
        assert e.converged and abs(e.h0 - 10.0) / 10.0 < 1e-3


class Bump(nn.Module):
    """½θᵀAθ + k s² (1 − cos(vᵀθ / s)): quadratic, plus curvature k along v that exists only below scale s."""

    def __init__(self, s=1e-3, k=30.0, dtype=F64):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        n = 20
        q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype)).Q
        self.register_buffer("A", q @ torch.diag(torch.linspace(0.5, 10.0, n, dtype=dtype)) @ q.T)
        v = torch.randn(n, generator=gen, dtype=dtype)
        self.register_buffer("v", v / v.norm())
        self.theta = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.s, self.k = s, k

    def forward(self):
        t = self.v @ self.theta
        return 0.5 * self.theta @ self.A @ self.theta + self.k * self.s**2 * (1 - torch.cos(t / self.s))

    def exact_top(self):
        return float(torch.linalg.eigvalsh(self.A + self.k * torch.outer(self.v, self.v))[-1])


def test_delta_q_control_finds_the_scale_of_sharp_curvature():
    model = Bump()
    fixed = HessianEigenEstimator(products="finite_difference", delta_q=5e-2)
    auto = HessianEigenEstimator(products="auto", delta_q=5e-2, delta_q_tol=1e-2)
    for _ in range(4):
        e_fixed, e_auto = fixed.step(curvature_of(model)), auto.step(curvature_of(model))
    exact = model.exact_top()
    assert abs(e_fixed.h0 - exact) / exact > 0.3  # at Δq ≫ s the difference quotient misses the bump
    assert abs(e_auto.h0 - exact) / exact < 1e-2
    assert not e_auto.exact_products and e_auto.delta_q <= 2.5e-4  # finite differences at a small Δq
    assert auto.scale.error <= 1e-2


def test_float32_cancellation_abandons_finite_differences():
    """θ far from 0 in float32: θ + Δq·u rounds away the perturbation below Δq ≈ 1e-3·|θ|·eps⁻¹."""
    model = Quadratic(planted_spectrum(n=20), dtype=torch.float32)
    with torch.no_grad():
        model.theta.add_(1e4)
    est = HessianEigenEstimator(products="auto", delta_q=1e-6, delta_q_tol=1e-2)
    for _ in range(3):
        e = est.step(curvature_of(model))
    assert est.scale.exact and e.exact_products
    assert e.h0 == pytest.approx(model.eigenvalues[0].item(), rel=1e-3)


def test_exact_products_match_torch_func_hessian_on_a_tanh_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    names = [n for n, _ in net.named_parameters()]

    def flat_loss(flat):
        pieces, i = {}, 0
        for name, p in net.named_parameters():
            pieces[name] = flat[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(net, pieces, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    exact = float(torch.linalg.eigvalsh(torch.func.hessian(flat_loss)(theta).double())[-1])
    assert len(names) == 4
    est = HessianEigenEstimator(products="exact", warmup_tol=1e-4)
    e = est.step(curvature_of(net, lambda: nn.functional.cross_entropy(net(x), y)))
    assert e.converged and e.h0 == pytest.approx(exact, rel=1e-4)


def test_cost_is_counted_and_the_mean_stays_within_the_budget():
    n = 40
    spectrum = torch.cat([torch.tensor([10.0, 9.5]), torch.linspace(-2.0, 6.0, n - 2)]).double()
    est = HessianEigenEstimator(products="exact", n_iter=6, budget=4.0)
    costs = []
    for t in range(25):
        e = est.step(curvature_of(Quadratic(spectrum, seed=200 + t)))
        assert e.cost == e.num_gradients + HVP_COST * e.num_hvps + GRAPH_COST * e.num_graphs
        assert e.num_hvps == e.num_products  # every product exact, one graph per step
        assert e.num_graphs == 1
        if t:
            costs.append(e.cost)
    assert max(costs) <= 3 * 4.0 + 1e-9  # what was saved is capped at three steps' worth
    assert sum(costs) / len(costs) <= 4.0 + GRAPH_COST + HVP_COST  # the minimum product of a step aside
    assert est.credit >= -(GRAPH_COST + HVP_COST)


def test_gradient_reuse_saves_one_gradient():
    model = Quadratic(planted_spectrum())
    est = HessianEigenEstimator(products="finite_difference", n_iter=1, warmup_iters=0)
    curvature = curvature_of(model)
    g0 = curvature.loss.gradient()
    assert est.step(curvature, g0=g0).num_gradients == 1
    assert est.step(curvature_of(model)).num_gradients == 2


def test_a_non_finite_gradient_skips_the_step_and_keeps_the_direction():
    model = Quadratic(planted_spectrum())
    est = HessianEigenEstimator(products="exact")
    est.step(curvature_of(model))
    direction = est.top.basis.clone()
    with torch.no_grad():
        model.A[0, 0] = math.nan
    e = est.step(curvature_of(model))
    assert not e.valid and e.num_products == 0 and not est.needs_warmup
    torch.testing.assert_close(est.top.basis, direction)


def test_non_finite_products_invalidate_the_step_and_rewarm():
    model = Quadratic(planted_spectrum())
    calls = []

    def loss():  # finite for g(θ), the first evaluation; NaN at every perturbed point after it
        calls.append(1)
        return model() * (1.0 if len(calls) == 1 else math.nan)

    est = HessianEigenEstimator(products="finite_difference", warmup_iters=3)
    e = est.step(curvature_of(model, loss))
    assert not e.valid and est.needs_warmup and est.top.num_restarts == 1
    assert e.num_gradients == 2  # g(θ) and the one failed product: no retry on that step


def test_a_model_without_second_derivatives_keeps_finite_differences():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)

    def loss():
        return ((OnceTanh.apply(net(x)) - y) ** 2).mean()

    auto = HessianEigenEstimator(products="auto")
    e = auto.step(curvature_of(net, loss))
    assert e.valid and not auto.second_order and not e.exact_products
    with pytest.raises(SecondOrderError):
        HessianEigenEstimator(products="exact").step(curvature_of(net, loss))


def test_state_dict_round_trip_continues_identically():
    spectrum = planted_spectrum()
    est = HessianEigenEstimator(most_negative=True)
    for t in range(3):
        est.step(curvature_of(Quadratic(spectrum, seed=t)))
    resumed = HessianEigenEstimator(most_negative=True)
    resumed.load_state_dict(est.state_dict())
    for t in range(3, 6):
        a, b = (
            est.step(curvature_of(Quadratic(spectrum, seed=t))),
            resumed.step(curvature_of(Quadratic(spectrum, seed=t))),
        )
        assert (a.h0, a.h_min, a.beta, a.cost, a.converged) == (b.h0, b.h_min, b.beta, b.cost, b.converged)


def test_direction_probe_measures_in_units_of_h0():
    exact = torch.tensor([3.0, 4.0], dtype=F64)
    probe = DirectionProbe(lambda dq: exact + dq, exact, scale=10.0)
    assert probe.error(0.5) == (pytest.approx(math.sqrt(2) * 0.5 / 10.0), 1)
    assert probe.error(0.5)[1] == 0  # reused, not recomputed


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_iter": 0}, "n_iter"),
        ({"tol": 0}, "tol"),
        ({"budget": 0}, "budget"),
        ({"products": "x"}, "products"),
        ({"delta_q": -1}, "delta_q"),
        ({"delta_q_tol": 0}, "delta_q_tol"),
        ({"block": 0}, "block"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        HessianEigenEstimator(**kwargs)


def test_finite_difference_scale_walks_down_until_a_rung_passes():
    calls = []

    def fd(delta):
        calls.append(delta)
        return torch.tensor([1.0 + delta * 10], dtype=F64)

    scale = FiniteDifferenceScale(delta_max=0.1, tol=0.05)
    spent = scale.calibrate([DirectionProbe(fd, torch.tensor([1.0], dtype=F64), scale=1.0)])
    # errors 1.0, 0.25, 0.0625 fail; 0.0156 passes, and so does the next rung (0.0039): a stable rung
    assert scale.delta_q == 0.1 / 4**3 and not scale.exact
    assert calls == [0.1 / 4**j for j in range(5)] and spent == 5


def test_a_rung_whose_next_rung_fails_does_not_pass():
    """A kink: fine at one Δq, far off at the next smaller one (a jump divided by Δq)."""
    exact = torch.tensor([1.0], dtype=F64)

    def fd(delta):
        return exact + (0.0 if delta > 0.02 else 1.0)  # off below 0.02 only

    scale = FiniteDifferenceScale(delta_max=0.05, tol=0.05, rungs=3)
    scale.calibrate([DirectionProbe(fd, exact, scale=1.0)])
    assert scale.exact  # 0.05 is exact but 0.0125 is not: no stable rung


@pytest.mark.parametrize("products", ["auto", "exact"])
def test_a_larger_warm_block_on_check_steps(products):
    """block=2 carries the top residual; on a Δq check step the checked products are the block's own."""
    model = Quadratic(planted_spectrum())
    est = HessianEigenEstimator(products=products, block=2, check_every=1, budget=math.inf)
    for _ in range(4):
        e = est.step(curvature_of(model))
        assert e.valid and e.num_products >= 2
    assert e.converged and e.h0 == pytest.approx(model.eigenvalues[0].item(), rel=1e-4)


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e2, 1e3, 3e3, 1e4, 1e5, 1e7])
def test_representability_without_computing_it_agrees_with_computing_it(scale):
    """Where the rounding bound certifies θ + Δq·u, the explicit test (computed here) passes too."""
    torch.manual_seed(0)
    net = nn.Linear(300, 10)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    curvature = curvature_of(net, lambda: net(torch.ones(1, 300)).sum())
    est = HessianEigenEstimator(products="finite_difference")
    warm = est.top._warm(curvature.loss.dim, torch.float32, torch.device("cpu"))
    theta = curvature.loss.theta()
    step = est.scale.delta_max * warm[:, 0]
    explicit = bool(((theta + step) - theta - step).norm() <= 1e-2 * step.norm())
    assert est._representable(curvature, warm) == explicit


def test_an_error_that_rises_as_delta_q_shrinks_gives_exact_products():
    # ½aθ² with a jump J of the gradient at θ = d: a difference from θ = 0 that crosses the kink is off by
    # J/Δq, which grows as Δq shrinks until Δq < d. The rungs below the kink pass this probe, but a kinked
    # loss is not safe for finite differences there (the iteration's directions find the kinks): exact
    a, jump, kink = 3.0, 0.1, 1e-3
    calls = []

    def fd(delta):
        calls.append(delta)
        return torch.tensor([a + (jump / delta if delta > kink else 0.0)], dtype=F64)

    probe = DirectionProbe(fd, torch.tensor([a], dtype=F64), scale=a)
    scale = FiniteDifferenceScale(delta_max=0.5, tol=1e-2)
    scale.calibrate([probe])
    assert [probe.error(d)[0] for d in calls] == sorted(probe.error(d)[0] for d in calls)  # rising
    assert scale.exact and scale.delta_q == 0.5 and scale.error == pytest.approx(jump / 0.5 / a)
    assert min(calls) > kink  # the walk stopped above the kink


class SwappedTop(nn.Module):
    """½θᵀAθ + bᵀθ where A has eigenvector v_top at eigenvalue 10 and v_low at 3, or the two swapped.

    On alternate batches the previous top eigenvector is an exact eigenvector of a lower eigenvalue:
    a space spanned from it alone is invariant and converges, exactly, to the wrong eigenvalue.
    """

    def __init__(self, swapped, n=30):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64)).Q
        h = torch.cat([torch.tensor([10.0, 3.0], dtype=F64), torch.linspace(-2.0, 2.0, n - 2, dtype=F64)])
        if swapped:
            h[[0, 1]] = h[[1, 0]]
        self.register_buffer("A", q @ torch.diag(h) @ q.T)
        self.register_buffer("b", torch.randn(n, generator=gen, dtype=F64))
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=F64))

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta


@pytest.mark.parametrize("gradient_start", [False, True])
def test_the_gradient_start_finds_a_top_eigenvector_the_warm_direction_does_not_carry(gradient_start):
    est = HessianEigenEstimator(
        products="finite_difference", n_iter=8, tol=1e-4, budget=math.inf, gradient_start=gradient_start
    )
    estimates = [est.step(curvature_of(SwappedTop(swapped=t % 2 == 1))) for t in range(8)]
    after = estimates[1:]
    if gradient_start:  # the gradient has a component along the new top eigenvector: found every step
        assert all(e.converged and e.h0 == pytest.approx(10.0, rel=1e-6) for e in after)
    else:  # the failure it prevents: on every other batch an exact eigenpair of the wrong eigenvalue,
        # flagged converged after one product
        wrong = [e for e in after if e.converged and e.h0 == pytest.approx(3.0, rel=1e-6)]
        assert len(wrong) >= 3 and all(e.num_products == 1 for e in wrong)


def rotated_spectrum_and_start(n, low, seed):
    """``A = Q diag(linspace(low, 10, n)) Qᵀ`` with its eigenvectors ``Q`` and a random start vector."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64)).Q
    a = q @ torch.diag(torch.linspace(low, 10.0, n, dtype=F64)) @ q.T
    return q, a, torch.randn(n, generator=gen, dtype=F64)


def test_start_directions_check_a_converged_pair_by_their_own_krylov_sequence():
    n = 30
    q, a, start = rotated_spectrum_and_start(n, -3.0, seed=5)
    u = q[:, 20]  # an exact eigenvector of an interior eigenvalue: converged after one product
    it = ControlledLyapunov()
    it.basis = u[:, None].clone()
    alone = it.step(a.__matmul__, n, dtype=F64, max_products=3, tol=1e-6)
    assert alone.converged and alone.num_products == 1
    it.basis = u[:, None].clone()
    step = it.step(a.__matmul__, n, dtype=F64, max_products=3, tol=1e-6, starts=start, start_depth=2)
    assert step.num_products == 3 and not step.converged  # the check found a higher eigenvalue
    # the space is span{u, s', As'} with s' = s − (uᵀs)u, the start orthogonalised against the warm
    # direction: its top Ritz value, computed independently
    s_perp = start - (u @ start) * u
    basis = torch.linalg.qr(torch.stack([u, s_perp, a @ s_perp], dim=1)).Q
    expected = float(torch.linalg.eigvalsh(basis.T @ a @ basis)[-1])
    assert step.ritz_values[0].item() == pytest.approx(expected, rel=1e-10)
    assert expected > alone.ritz_values[0].item() + 1.0
    # a converged top pair passes the check: the starts' space has nothing above it
    it.basis = q[:, -1:].clone()
    top = it.step(a.__matmul__, n, dtype=F64, max_products=3, tol=1e-6, starts=start, start_depth=2)
    assert top.converged and top.num_products == 3 and top.ritz_values[0].item() == pytest.approx(10.0)


def test_an_unchecked_convergence_is_not_flagged_while_recent_checks_failed():
    n = 20
    q, a, start = rotated_spectrum_and_start(n, -1.0, seed=6)
    flags = {}
    for failed in (0, 3):
        it = ControlledLyapunov()
        it.checks.extend([True] * failed + [False] * (10 - failed))
        it.basis = q[:, -1:].clone()  # the top eigenvector: converged after one product
        # the check needs 1 + 3 products: not affordable with 2
        step = it.step(a.__matmul__, n, dtype=F64, max_products=2, tol=1e-6, starts=start, start_depth=3)
        assert step.num_products == 1 and step.ritz_values[0].item() == pytest.approx(10.0)
        flags[failed] = step.converged
        restored = ControlledLyapunov()
        restored.load_state_dict(it.state_dict())
        assert list(restored.checks) == list(it.checks) and restored.warm_trusted == it.warm_trusted
    assert flags == {0: True, 3: False}


@pytest.mark.parametrize(("last_top", "checked"), [(10.0, True), (5.9, False)])
def test_passing_checks_back_off_unless_the_converged_value_drops(last_top, checked):
    n = 30
    q, a, start = rotated_spectrum_and_start(n, -3.0, seed=5)
    it = ControlledLyapunov()
    it.checks.extend([False] * 10)  # the recent checks passed: the next ones back off
    it.check_interval, it.since_check, it.last_top = 8, 0, last_top
    it.basis = q[:, 20:21].clone()  # an eigenvector of 5.97: converges after one product
    step = it.step(a.__matmul__, n, dtype=F64, max_products=4, tol=1e-6, starts=start, start_depth=3)
    if checked:  # 5.97 is far below the last step's 10: checked despite the back-off, and found out
        assert step.num_products == 4 and not step.converged and step.ritz_values[0].item() > 7.0
        assert it.checks[-1] and it.check_interval == 1
    else:  # no drop: the check is skipped this step (the residual test alone flags it)
        assert step.num_products == 1 and step.converged
        assert it.since_check == 1 and it.check_interval == 8
    assert it.last_top == pytest.approx(step.ritz_values[0].item())


def test_delta_q_checks_back_off_while_they_keep_the_setting_and_reset_when_it_changes():
    """check_every = 2: checks after 2, 4, 8, 8 computed steps while Δq stays; a changed Δq resets to 2."""
    model = Quadratic(planted_spectrum())
    est = HessianEigenEstimator(check_every=2, budget=math.inf)
    est.step(curvature_of(model))  # the warm-up and its calibration
    assert not est.scale.exact
    checked = []
    for t in range(1, 25):
        before = est.scale.num_checks
        est.step(curvature_of(model))
        if est.scale.num_checks > before:
            checked.append(t)
    assert checked == [2, 6, 14, 22]
    assert est.recheck_after == 8  # MAX_CHECK_BACKOFF · check_every
    # a check that moves Δq (here one rung back up from the smallest, on a loss exact at every rung)
    est.scale.delta_q = est.scale.ladder()[-1]
    est.steps_since_check = est.recheck_after - 1
    est.step(curvature_of(model))
    assert est.scale.delta_q == est.scale.ladder()[-2]
    assert est.recheck_after == 2
    resumed = HessianEigenEstimator(check_every=2, budget=math.inf)
    resumed.load_state_dict(est.state_dict())
    assert resumed.recheck_after == 2
