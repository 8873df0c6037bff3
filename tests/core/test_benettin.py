"""Finite-time Lyapunov exponents (Benettin's QR method) against QR of explicit products of tangent maps."""

import math

import pytest
import torch
from helpers import F64, batch_loss, initial_params, planted, sgd_step

from lightning_chaos.core.benettin import FiniteTimeLyapunov, positive_qr
from lightning_chaos.core.operators import HessianOperator, dense_hessian
from lightning_chaos.core.params import flatten, unflatten
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.stability import local_lyapunov_exponents
from lightning_chaos.core.tangent_map import apply_tangent_map, sgd_tangent_map


def trajectory_maps(steps, lr=0.4):
    """Tangent maps I − γ H_t along a real SGD trajectory of the tiny MLP, one batch per step."""
    sgd = SGDHyperparameters(lr=lr)
    like = initial_params()
    theta, maps, max_lles = flatten(like), [], []
    for t in range(steps):
        loss_fn = batch_loss(t)
        params = unflatten(theta, like)
        hessian = dense_hessian(loss_fn, params)
        maps.append((sgd_tangent_map(hessian, sgd), HessianOperator(loss_fn, params)))
        max_lles.append(float(local_lyapunov_exponents(torch.linalg.eigvalsh(hessian), sgd).max()))
        theta = sgd_step(loss_fn, theta, None, like, lr)[0]
    return maps, max_lles


def test_benettin_exponents_equal_qr_of_the_explicit_product_on_an_mlp():
    maps, max_lles = trajectory_maps(5)
    n = maps[0][0].shape[0]
    product = torch.eye(n, dtype=F64)
    ftl = FiniteTimeLyapunov(n, dtype=F64)
    for dense, op in maps:
        product = dense @ product
        ftl.update(lambda y, op=op: apply_tangent_map(op.matmat, y, SGDHyperparameters(lr=0.4)))
    for lle in max_lles:
        ftl.record_log_norm(lle)  # plain SGD: ‖J_t‖ is the largest LLE
    steps = len(maps)
    r = torch.linalg.qr(product).R
    expected = (torch.log(torch.diagonal(r).abs()) / steps).sort(descending=True).values
    torch.testing.assert_close(ftl.exponents(), expected, rtol=0, atol=1e-10)
    singular = torch.linalg.svdvals(product)
    # volume growth: the exponents sum to (1/T) log |det Y_T| = (1/T) Σ log σ_i
    assert float(ftl.exponents().sum()) == pytest.approx(float(torch.log(singular).sum() / steps), abs=1e-10)
    # first column growth ≤ spectral norm ≤ product of per-step norms (seed 001, A.6)
    assert ftl.mlce() <= float(torch.log(singular[0])) / steps + 1e-12
    assert float(torch.log(singular[0])) / steps <= ftl.mlce_bound() + 1e-12
    assert ftl.mlce_bound() == pytest.approx(sum(max_lles) / steps)
    assert ftl.num_steps == steps


def test_benettin_with_k_columns_follows_the_product_applied_to_the_initial_frame():
    maps, _ = trajectory_maps(4)
    n = maps[0][0].shape[0]
    ftl = FiniteTimeLyapunov(n, k=3, generator=torch.Generator().manual_seed(0), dtype=F64)
    frame0 = ftl.frame.clone()
    torch.testing.assert_close(frame0.T @ frame0, torch.eye(3, dtype=F64), rtol=0, atol=1e-12)
    product = torch.eye(n, dtype=F64)
    for dense, _ in maps:
        ftl.update(dense)
        product = dense @ product
    r = torch.linalg.qr(product @ frame0).R
    expected = (torch.log(torch.diagonal(r).abs()) / 4).sort(descending=True).values
    torch.testing.assert_close(ftl.exponents(), expected, rtol=0, atol=1e-10)


def test_planted_quadratic_exponents_are_the_lles():
    h = torch.tensor([-1.5, -0.2, 0.0, 0.7, 2.0, 4.6, 6.0], dtype=F64)
    sgd = SGDHyperparameters(lr=0.4)
    a, u = planted(h)
    lles = local_lyapunov_exponents(h, sgd).sort(descending=True).values
    # started in the eigenbasis the frame is invariant: exact at every T
    exact = FiniteTimeLyapunov(7, initial_frame=u)
    for _ in range(3):
        exact.update(sgd_tangent_map(a, sgd))
    torch.testing.assert_close(exact.exponents(), lles, rtol=0, atol=1e-12)
    # from the identity frame they converge to the LLEs at rate O(1/T)
    ftl = FiniteTimeLyapunov(7, dtype=F64)
    jac = sgd_tangent_map(a, sgd)
    for _ in range(400):
        ftl.update(jac)
    torch.testing.assert_close(ftl.exponents(), lles, rtol=0, atol=2e-2)
    assert ftl.mlce() == pytest.approx(float(lles[0]), abs=1e-2)


def test_planted_quadratic_with_momentum_converges_to_log_moduli_of_the_2n_map():
    h = torch.tensor([-0.5, 0.3, 1.0, 3.0, 9.0], dtype=F64)
    sgd = SGDHyperparameters(lr=0.2, momentum=0.8)
    a, _ = planted(h, seed=1)
    jac = sgd_tangent_map(a, sgd)
    op = lambda y: a @ y  # noqa: E731
    ftl = FiniteTimeLyapunov(10, dtype=F64)
    for _ in range(1500):
        ftl.update(lambda y: apply_tangent_map(op, y, sgd))
    expected = torch.log(torch.linalg.eigvals(jac).abs()).sort(descending=True).values
    torch.testing.assert_close(ftl.exponents(), expected, rtol=0, atol=1e-2)
    assert ftl.mlce() == pytest.approx(float(local_lyapunov_exponents(h, sgd).max()), abs=1e-2)


def test_state_dict_resumes_exactly():
    maps, _ = trajectory_maps(5)
    n = maps[0][0].shape[0]
    uninterrupted = FiniteTimeLyapunov(n, k=4, generator=torch.Generator().manual_seed(1), dtype=F64)
    first = FiniteTimeLyapunov(n, k=4, generator=torch.Generator().manual_seed(1), dtype=F64)
    for dense, _ in maps[:3]:
        uninterrupted.update(dense)
        first.update(dense)
        uninterrupted.record_log_norm(0.1)
        first.record_log_norm(0.1)
    state = first.state_dict()
    assert set(state) == {"frame", "log_r_sum", "num_steps", "log_norm_sum", "num_norms"}  # renamed keys
    resumed = FiniteTimeLyapunov(n, k=4, generator=torch.Generator().manual_seed(99), dtype=F64)
    resumed.load_state_dict(state)
    for dense, _ in maps[3:]:
        uninterrupted.update(dense)
        resumed.update(dense)
    assert torch.equal(resumed.exponents(), uninterrupted.exponents())
    assert torch.equal(resumed.frame, uninterrupted.frame)
    assert resumed.num_steps == uninterrupted.num_steps == 5
    assert resumed.mlce_bound() == uninterrupted.mlce_bound()
    with pytest.raises(ValueError, match="shape"):
        FiniteTimeLyapunov(n, k=2).load_state_dict(state)


def test_finite_time_lyapunov_guards():
    ftl = FiniteTimeLyapunov(3, dtype=F64)
    with pytest.raises(RuntimeError):
        ftl.exponents()
    with pytest.raises(RuntimeError):
        ftl.mlce_bound()
    with pytest.raises(FloatingPointError):
        ftl.update(torch.full((3, 3), math.nan, dtype=F64))
    assert ftl.num_steps == 0 and torch.equal(ftl.frame, torch.eye(3, dtype=F64))
    # a singular step (h = 1/γ exactly) gives the exact finite-time value -inf
    ftl.update(torch.diag(torch.tensor([2.0, 0.0, 0.5], dtype=F64)))
    assert ftl.exponents()[-1] == -math.inf
    assert ftl.exponents()[0] == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError):
        FiniteTimeLyapunov(3, k=4)


def test_positive_qr_has_a_non_negative_diagonal():
    matrix = torch.randn(7, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    matrix[:, 1] *= -1
    q, r_diag = positive_qr(matrix)
    r = q.T @ matrix
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.diagonal(r), r_diag, rtol=0, atol=1e-13)
    torch.testing.assert_close(q @ r, matrix, rtol=0, atol=1e-13)
    assert (r_diag >= 0).all() and torch.allclose(torch.triu(r), r, atol=1e-13)
