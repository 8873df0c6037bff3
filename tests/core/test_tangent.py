"""Tangent maps against the Jacobian of the real SGD update; finite-time spectra against explicit products."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_chaos.core.params import flatten, unflatten
from lightning_chaos.core.spectrum import HessianOperator, dense_hessian, local_lyapunov_exponents
from lightning_chaos.core.tangent import (
    FiniteTimeLyapunov,
    SGDHyperparameters,
    apply_tangent_map,
    sgd_first_step,
    sgd_hyperparameters,
    sgd_tangent_map,
    validate_sgd_hyperparameters,
)

F64 = torch.float64


SIZES = (3, 4, 2)


def initial_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        params.append(torch.randn(fan_out, fan_in, generator=gen, dtype=F64))
        params.append(0.3 * torch.randn(fan_out, generator=gen, dtype=F64))
    return params


def batch_loss(seed, batch=6):
    """Functional cross-entropy loss of a 3-4-2 tanh MLP on batch number ``seed``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(batch, SIZES[0], generator=gen, dtype=F64)
    y = torch.randint(0, SIZES[-1], (batch,), generator=gen)

    def loss_fn(ps):
        h = torch.tanh(x @ ps[0].T + ps[1])
        return F.cross_entropy(h @ ps[2].T + ps[3], y)

    return loss_fn


def sgd_step(loss_fn, theta, buf, like, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """The update of torch.optim.SGD (``_single_tensor_sgd``) on flat tensors; ``buf=None`` first."""
    d_p = torch.func.grad(lambda flat: loss_fn(unflatten(flat, like)))(theta) + weight_decay * theta
    if momentum != 0:
        buf = d_p if buf is None else momentum * buf + (1 - dampening) * d_p
        d_p = d_p + momentum * buf if nesterov else buf
    return theta - lr * d_p, buf


VARIANTS = [
    {},
    {"weight_decay": 0.05},
    {"dampening": 0.5},  # torch ignores dampening without momentum
    {"momentum": 0.9},
    {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.7, "nesterov": True, "weight_decay": 0.02},
]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_functional_step_reproduces_torch_optim_sgd(kwargs):
    like = initial_params()
    model_params = [torch.nn.Parameter(p.clone()) for p in like]
    optimizer = torch.optim.SGD(model_params, lr=0.3, **kwargs)
    theta, buf = flatten(like), None
    for t in range(3):
        loss_fn = batch_loss(t)
        optimizer.zero_grad()
        loss_fn(model_params).backward()
        optimizer.step()
        theta, buf = sgd_step(loss_fn, theta, buf, like, 0.3, **kwargs)
        torch.testing.assert_close(flatten([p.detach() for p in model_params]), theta, rtol=0, atol=1e-14)
        if kwargs.get("momentum"):
            torch_buf = flatten([optimizer.state[p]["momentum_buffer"] for p in model_params])
            torch.testing.assert_close(torch_buf, buf, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_tangent_map_is_the_jacobian_of_the_sgd_step(kwargs):
    like, lr = initial_params(), 0.3
    loss_fn = batch_loss(0)
    theta = flatten(like)
    n = theta.numel()
    hessian = dense_hessian(loss_fn, like)
    jac = sgd_tangent_map(hessian, lr, **kwargs)
    if not kwargs.get("momentum"):
        expected = torch.func.jacrev(lambda th: sgd_step(loss_fn, th, None, like, lr, **kwargs)[0])(theta)
        assert jac.shape == (n, n)
        torch.testing.assert_close(jac, expected, rtol=0, atol=1e-12)
        return
    buf = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=F64)

    def steady(z):
        return torch.cat(sgd_step(loss_fn, z[:n], z[n:], like, lr, **kwargs))

    assert jac.shape == (2 * n, 2 * n)
    torch.testing.assert_close(jac, torch.func.jacrev(steady)(torch.cat([theta, buf])), rtol=0, atol=1e-12)

    def first(th):  # torch's first step: the buffer does not exist yet
        return torch.cat(sgd_step(loss_fn, th, None, like, lr, **kwargs))

    first_map = sgd_tangent_map(hessian, lr, first_step=True, **kwargs)
    torch.testing.assert_close(first_map[:, :n], torch.func.jacrev(first)(theta), rtol=0, atol=1e-12)
    if kwargs.get("dampening"):
        assert not torch.allclose(first_map[:, :n], jac[:, :n])  # dampening is skipped on the first step


@pytest.mark.parametrize("kwargs", VARIANTS)
@pytest.mark.parametrize("first_step", [False, True])
def test_matrix_free_tangent_map_equals_dense_map(kwargs, first_step):
    like, lr = initial_params(), 0.3
    loss_fn = batch_loss(1)
    op = HessianOperator(loss_fn, like)
    hessian = dense_hessian(loss_fn, like)
    dense = sgd_tangent_map(hessian, lr, first_step=first_step, **kwargs)
    block = torch.randn(dense.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = apply_tangent_map(op.matmat, block, lr, first_step=first_step, **kwargs)
    torch.testing.assert_close(out, dense @ block, rtol=0, atol=1e-12)
    vector_out = apply_tangent_map(op.matmat, block[:, 0], lr, first_step=first_step, **kwargs)
    torch.testing.assert_close(vector_out, dense @ block[:, 0], rtol=0, atol=1e-12)


def test_tangent_map_input_checks():
    with pytest.raises(ValueError, match="square"):
        sgd_tangent_map(torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match="2N"):
        apply_tangent_map(lambda y: y, torch.zeros(5, 2), 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        validate_sgd_hyperparameters(0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        validate_sgd_hyperparameters(0.1, momentum=-0.1)


# ------------------------------------------------------------------ finite-time Lyapunov exponents


def trajectory_maps(steps, lr=0.4):
    """Tangent maps I − γ H_t along a real SGD trajectory of the tiny MLP, one batch per step."""
    like = initial_params()
    theta, maps, max_lles = flatten(like), [], []
    for t in range(steps):
        loss_fn = batch_loss(t)
        params = unflatten(theta, like)
        hessian = dense_hessian(loss_fn, params)
        maps.append((sgd_tangent_map(hessian, lr), HessianOperator(loss_fn, params)))
        max_lles.append(float(local_lyapunov_exponents(torch.linalg.eigvalsh(hessian), lr).max()))
        theta = sgd_step(loss_fn, theta, None, like, lr)[0]
    return maps, max_lles


def test_benettin_exponents_equal_qr_of_the_explicit_product_on_an_mlp():
    maps, max_lles = trajectory_maps(5)
    n = maps[0][0].shape[0]
    product = torch.eye(n, dtype=F64)
    ftl = FiniteTimeLyapunov(n, dtype=F64)
    for dense, op in maps:
        product = dense @ product
        ftl.update(lambda y, op=op: apply_tangent_map(op.matmat, y, 0.4))
    for lle in max_lles:
        ftl.record_max_lle(lle)
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


def planted_hessian(h, seed=0):
    q, r = torch.linalg.qr(
        torch.randn(h.numel(), h.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64)
    )
    u = q * torch.sign(torch.diagonal(r))
    return (u * h) @ u.T, u


def test_planted_quadratic_exponents_are_the_lles():
    h = torch.tensor([-1.5, -0.2, 0.0, 0.7, 2.0, 4.6, 6.0], dtype=F64)
    lr = 0.4
    a, u = planted_hessian(h)
    lles = local_lyapunov_exponents(h, lr).sort(descending=True).values
    # started in the eigenbasis the frame is invariant: exact at every T
    exact = FiniteTimeLyapunov(7, initial_frame=u)
    for _ in range(3):
        exact.update(sgd_tangent_map(a, lr))
    torch.testing.assert_close(exact.exponents(), lles, rtol=0, atol=1e-12)
    # from the identity frame they converge to the LLEs at rate O(1/T)
    ftl = FiniteTimeLyapunov(7, dtype=F64)
    jac = sgd_tangent_map(a, lr)
    for _ in range(400):
        ftl.update(jac)
    torch.testing.assert_close(ftl.exponents(), lles, rtol=0, atol=2e-2)
    assert ftl.mlce() == pytest.approx(float(lles[0]), abs=1e-2)


def test_planted_quadratic_with_momentum_converges_to_log_moduli_of_the_2n_map():
    h = torch.tensor([-0.5, 0.3, 1.0, 3.0, 9.0], dtype=F64)
    lr, mu = 0.2, 0.8
    a, _ = planted_hessian(h, seed=1)
    jac = sgd_tangent_map(a, lr, momentum=mu)
    op = lambda y: a @ y  # noqa: E731
    ftl = FiniteTimeLyapunov(10, dtype=F64)
    for _ in range(1500):
        ftl.update(lambda y: apply_tangent_map(op, y, lr, momentum=mu))
    expected = torch.log(torch.linalg.eigvals(jac).abs()).sort(descending=True).values
    torch.testing.assert_close(ftl.exponents(), expected, rtol=0, atol=1e-2)
    assert ftl.mlce() == pytest.approx(float(local_lyapunov_exponents(h, lr, momentum=mu).max()), abs=1e-2)


def test_state_dict_resumes_exactly():
    maps, _ = trajectory_maps(5)
    n = maps[0][0].shape[0]
    uninterrupted = FiniteTimeLyapunov(n, k=4, generator=torch.Generator().manual_seed(1), dtype=F64)
    first = FiniteTimeLyapunov(n, k=4, generator=torch.Generator().manual_seed(1), dtype=F64)
    for dense, _ in maps[:3]:
        uninterrupted.update(dense)
        first.update(dense)
        uninterrupted.record_max_lle(0.1)
        first.record_max_lle(0.1)
    state = first.state_dict()
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


# ------------------------------------------------------------------ SGD hyper-parameters of an optimizer


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_hyperparameters_read_from_sgd_give_the_map_of_its_step(kwargs):
    like, lr = initial_params(), 0.3
    params = [torch.nn.Parameter(p.clone()) for p in like]
    optimizer = torch.optim.SGD(params, lr=lr, **kwargs)
    hp = sgd_hyperparameters(optimizer)
    expected = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0, **kwargs}
    assert hp == SGDHyperparameters(lr=lr, **expected)
    assert hp.map_kwargs() == expected
    hessian = dense_hessian(batch_loss(0), like)
    torch.testing.assert_close(
        sgd_tangent_map(hessian, hp.lr, **hp.map_kwargs()), sgd_tangent_map(hessian, lr, **kwargs)
    )


def test_first_step_is_detected_from_the_momentum_buffer():
    params = [torch.nn.Parameter(p.clone()) for p in initial_params()]
    plain = torch.optim.SGD(params, lr=0.1)
    heavy = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert not sgd_first_step(plain) and sgd_first_step(heavy)
    batch_loss(0)(params).backward()
    plain.step()
    heavy.step()
    assert not sgd_first_step(plain) and not sgd_first_step(heavy)


def test_hyperparameters_of_unsupported_optimizers_are_clear_errors():
    params = [torch.nn.Parameter(p.clone()) for p in initial_params()]
    with pytest.raises(TypeError, match="Adam"):
        sgd_hyperparameters(torch.optim.Adam(params))
    with pytest.raises(ValueError, match="maximize"):
        sgd_hyperparameters(torch.optim.SGD(params, lr=0.1, maximize=True))
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.2, "weight_decay": 0.1}]
    with pytest.raises(ValueError, match="lr, weight_decay"):
        sgd_hyperparameters(torch.optim.SGD(groups, lr=0.1))
    same = [{"params": params[:2]}, {"params": params[2:], "lr": 0.1}]
    assert sgd_hyperparameters(torch.optim.SGD(same, lr=0.1)).lr == 0.1
    with pytest.raises(ValueError, match="momentum"):
        sgd_hyperparameters(torch.optim.SGD(params, lr=0.1, momentum=1.0))
