"""Spectrum numerics against exact linear algebra: planted quadratics, tiny MLPs, explicit tangent maps."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_chaos.core.params import flatten, unflatten
from lightning_chaos.core.spectrum import (
    DEFAULT_TOLERANCE,
    HessianOperator,
    classify_eigenvalues,
    dense_hessian,
    hessian_vector_product,
    lanczos,
    lanczos_eigenpairs,
    local_lyapunov_exponents,
    log_tangent_map_norm,
    slq,
    slq_count,
    slq_count_bounds,
    slq_density,
    slq_spectral_count_bounds,
    slq_spectral_counts,
    spectral_counts,
    stability_interval,
)
from lightning_chaos.core.tangent import sgd_tangent_map

F64 = torch.float64


def mlp_loss(sizes=(3, 6, 4), batch=9, act=torch.tanh, dtype=F64, seed=0):
    """Functional cross-entropy loss of a small MLP on a fixed batch, and its parameters."""
    gen = torch.Generator().manual_seed(seed)  # drawn in float64 so that every dtype sees the same network
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        params.append((torch.randn(fan_out, fan_in, generator=gen, dtype=F64) / math.sqrt(fan_in)).to(dtype))
        params.append((0.1 * torch.randn(fan_out, generator=gen, dtype=F64)).to(dtype))
    x = torch.randn(batch, sizes[0], generator=gen, dtype=F64).to(dtype)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)

    def loss_fn(ps):
        h = x
        for i in range(0, len(ps), 2):
            h = h @ ps[i].T + ps[i + 1]
            if i < len(ps) - 2:
                h = act(h)
        return F.cross_entropy(h, y)

    return loss_fn, params


def random_orthogonal(n, gen, dtype=F64):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def planted(eigenvalues, seed=0):
    """Symmetric A = U diag(h) Uᵀ with a random orthogonal U."""
    u = random_orthogonal(eigenvalues.numel(), torch.Generator().manual_seed(seed))
    a = (u * eigenvalues) @ u.T
    return (a + a.T) / 2, u


def quadratic_loss(a, like):
    """L(θ) = ½ θᵀ A θ over parameters shaped like ``like``."""
    return lambda ps: 0.5 * flatten(ps) @ (a @ flatten(ps))


class Recorder:
    """Dense operator that records the blocks Lanczos starts from (the normalised SLQ probes)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.device = a, a.shape, a.dtype, a.device
        self.first_blocks = []
        self._calls = 0

    def matmat(self, block):
        if self._calls == 0:
            self.first_blocks.append(block.clone())
        self._calls += 1
        return self.a @ block

    def new_run(self):
        self._calls = 0


# ------------------------------------------------------------------ Hessian-vector products


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse", "auto"])
def test_hvp_matches_dense_hessian_on_mlp(method):
    loss_fn, params = mlp_loss()
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = dense_hessian(loss_fn, params) @ v
    torch.testing.assert_close(
        hessian_vector_product(loss_fn, params, v, method), expected, rtol=0, atol=1e-12
    )


def test_hvp_routes_agree_to_float_precision_in_float32():
    loss_fn, params = mlp_loss(dtype=torch.float32, sizes=(5, 16, 16, 3))
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(2))
    a = hessian_vector_product(loss_fn, params, v, "double_backward")
    b = hessian_vector_product(loss_fn, params, v, "forward_over_reverse")
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_dense_hessian_and_hvp_of_planted_quadratic_over_several_tensors():
    like = [torch.zeros(3, 4, dtype=F64), torch.zeros(5, dtype=F64)]
    a, _ = planted(torch.linspace(-2, 3, 17, dtype=F64))
    loss_fn = quadratic_loss(a, like)
    params = unflatten(torch.randn(17, generator=torch.Generator().manual_seed(0), dtype=F64), like)
    torch.testing.assert_close(dense_hessian(loss_fn, params), a, rtol=0, atol=1e-12)
    v = torch.randn(17, generator=torch.Generator().manual_seed(3), dtype=F64)
    for method in ("double_backward", "forward_over_reverse"):
        torch.testing.assert_close(
            hessian_vector_product(loss_fn, params, v, method), a @ v, rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_of_unused_parameter_and_of_linear_loss_is_zero(method):
    w, unused = torch.tensor([1.0, -2.0], dtype=F64), torch.ones(3, dtype=F64)
    quad = lambda ps: (ps[0] ** 2).sum()  # noqa: E731
    out = hessian_vector_product(quad, [w, unused], torch.ones(5, dtype=F64), method)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0], dtype=F64))
    linear = lambda ps: (3 * ps[0]).sum()  # noqa: E731
    assert torch.equal(
        hessian_vector_product(linear, [w], torch.ones(2, dtype=F64), method), torch.zeros(2, dtype=F64)
    )


def test_hvp_rejects_bad_input():
    loss_fn, params = mlp_loss()
    n = sum(p.numel() for p in params)
    with pytest.raises(ValueError, match="method"):
        hessian_vector_product(loss_fn, params, torch.zeros(n, dtype=F64), "finite_difference")
    with pytest.raises(ValueError, match="shape"):
        hessian_vector_product(loss_fn, params, torch.zeros(n + 1, dtype=F64))
    vector_loss = lambda ps: ps[0].sum(dim=0)  # noqa: E731
    for method in ("double_backward", "forward_over_reverse"):
        with pytest.raises(ValueError, match="scalar"):
            hessian_vector_product(vector_loss, params, torch.zeros(n, dtype=F64), method)


def test_hvp_leaves_parameters_and_grads_untouched():
    loss_fn, params = mlp_loss()
    params = [p.clone().requires_grad_(True) for p in params]
    before = [p.detach().clone() for p in params]
    hessian_vector_product(loss_fn, params, torch.ones(sum(p.numel() for p in params), dtype=F64))
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


# ------------------------------------------------------------------ HessianOperator


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hessian_operator_matches_dense_hessian(method):
    loss_fn, params = mlp_loss()
    dense = dense_hessian(loss_fn, params)
    n = dense.shape[0]
    op = HessianOperator(loss_fn, params, method=method, weight_decay=0.3)
    assert op.shape == (n, n) and op.dtype == F64 and op.device == params[0].device
    exact = dense + 0.3 * torch.eye(n, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    v, block = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, 4, generator=gen, dtype=F64)
    torch.testing.assert_close(op.matvec(v), exact @ v, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.matmat(block), exact @ block, rtol=0, atol=1e-12)
    torch.testing.assert_close(op @ v, exact @ v, rtol=0, atol=1e-12)
    torch.testing.assert_close(op @ block, exact @ block, rtol=0, atol=1e-12)
    assert op.num_hvps == 1 + 4 + 1 + 4
    torch.testing.assert_close(op.to_dense(), exact, rtol=0, atol=1e-12)
    assert op.num_hvps == 10 + n
    for chunk_size in (None, 1, 7):  # blocks of any width, the last one partial
        torch.testing.assert_close(op.to_dense(chunk_size), exact, rtol=0, atol=1e-12)


def test_hessian_operator_snapshots_parameters():
    loss_fn, params = mlp_loss()
    dense = dense_hessian(loss_fn, params)
    params = [p.clone() for p in params]
    op = HessianOperator(loss_fn, params)
    for p in params:
        p.add_(1.0)
    torch.testing.assert_close(op.to_dense(), dense, rtol=0, atol=1e-12)


class _TwiceXG(torch.autograd.Function):
    """2·x·g, whose own backward has data-dependent control flow (cannot be vmapped)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 2 * x * g

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        if gg.abs().sum().item() == 0:
            return torch.zeros_like(x), torch.zeros_like(g)
        return 2 * g * gg, 2 * x * gg


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _TwiceXG.apply(x, g)


def test_hessian_operator_falls_back_to_a_loop_when_batching_fails():
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    loss_fn = lambda ps: (_Square.apply(ps[0]) * weights).sum()  # noqa: E731  H = diag(2, 4, 6)
    op = HessianOperator(loss_fn, [torch.tensor([1.0, -2.0, 0.5], dtype=F64)], method="double_backward")
    with pytest.warns(UserWarning, match="falling back to a loop"):
        out = op.matmat(torch.eye(3, dtype=F64))
    torch.testing.assert_close(out, torch.diag(2 * weights), rtol=0, atol=0)
    assert op.num_hvps == 3


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hessian_operator_with_a_replayed_random_mask(method):
    loss_fn, params = mlp_loss()

    def dropout_like(ps):  # random op inside the loss, with the generator replayed on every call
        gen = torch.Generator().manual_seed(0)
        mask = torch.bernoulli(torch.full(ps[0].shape, 0.7, dtype=F64), generator=gen)
        return loss_fn([ps[0] * mask, *ps[1:]])

    gen = torch.Generator().manual_seed(0)
    mask = torch.bernoulli(torch.full(params[0].shape, 0.7, dtype=F64), generator=gen).reshape(-1)
    chain = torch.cat([mask, torch.ones(sum(p.numel() for p in params[1:]), dtype=F64)])
    expected = chain[:, None] * dense_hessian(
        loss_fn, [params[0] * mask.reshape(params[0].shape), *params[1:]]
    )
    expected = expected * chain[None, :]  # H of L(m ⊙ θ) = diag(m) H_L diag(m)
    op = HessianOperator(dropout_like, params, method=method)
    torch.testing.assert_close(op.to_dense(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(dense_hessian(dropout_like, params), expected, rtol=0, atol=1e-12)


def test_hessian_operator_rejects_wrong_shapes():
    loss_fn, params = mlp_loss()
    op = HessianOperator(loss_fn, params)
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.zeros(op.shape[0], dtype=F64))


# ------------------------------------------------------------------ Lanczos


def test_lanczos_basis_is_orthonormal_and_tridiagonalises():
    a, _ = planted(torch.linspace(-1, 4, 60, dtype=F64) ** 3)
    alpha, beta, v = lanczos(a.__matmul__, 60, 25, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert alpha.shape == (25,) and beta.shape == (24,) and v.shape == (60, 25)
    torch.testing.assert_close(v.T @ v, torch.eye(25, dtype=F64), rtol=0, atol=1e-12)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    torch.testing.assert_close(v.T @ a @ v, t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_lanczos_eigenpairs_match_eigvalsh(which):
    gen = torch.Generator().manual_seed(1)
    h = torch.cat([torch.tensor([-9.0, -6.0, -4.5], dtype=F64), torch.randn(300, generator=gen, dtype=F64)])
    h = torch.cat([h, torch.tensor([5.0, 7.0, 12.0], dtype=F64)])
    a, _ = planted(h, seed=2)
    exact_values, exact_vectors = torch.linalg.eigh(a)
    values, vectors = lanczos_eigenpairs(a, 3, which, num_steps=80, generator=gen)
    expected_index = {"largest": [-1, -2, -3], "smallest": [0, 1, 2], "both": [-1, -2, -3, 2, 1, 0]}[which]
    torch.testing.assert_close(values, exact_values[expected_index], rtol=0, atol=1e-9)
    overlaps = (vectors * exact_vectors[:, expected_index]).sum(0).abs()
    torch.testing.assert_close(overlaps, torch.ones_like(overlaps), rtol=0, atol=1e-8)
    torch.testing.assert_close(a @ vectors, vectors * values, rtol=0, atol=1e-7)


def test_lanczos_eigenpairs_of_hessian_operator():
    loss_fn, params = mlp_loss(sizes=(4, 12, 12, 3), batch=16)
    exact = torch.linalg.eigvalsh(dense_hessian(loss_fn, params))
    op = HessianOperator(loss_fn, params)
    top, _ = lanczos_eigenpairs(op, 2, "largest", generator=torch.Generator().manual_seed(0))
    bottom, _ = lanczos_eigenpairs(op, 1, "smallest", num_steps=op.shape[0], generator=torch.Generator())
    torch.testing.assert_close(top, exact[[-1, -2]], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(bottom, exact[:1], rtol=1e-8, atol=1e-10)
    assert op.num_hvps <= 36 + op.shape[0]


def test_lanczos_stops_at_an_invariant_subspace():
    h = torch.tensor([-2.0] * 10 + [0.5] * 20 + [3.0] * 10, dtype=F64)  # three distinct eigenvalues
    a, u = planted(h, seed=3)
    alpha, beta, v = lanczos(a.__matmul__, 40, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert alpha.shape == (3,) and beta.shape == (2,) and v.shape == (40, 3)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(t), torch.tensor([-2.0, 0.5, 3.0], dtype=F64), rtol=0, atol=1e-12
    )
    alpha, beta, v = lanczos(a.__matmul__, 40, 30, v0=u[:, 4])  # an eigenvector: one step
    assert alpha.shape == (1,) and beta.shape == (0,)
    torch.testing.assert_close(alpha, torch.tensor([-2.0], dtype=F64), rtol=0, atol=1e-12)
    values, vectors = lanczos_eigenpairs(a, 5, "largest", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(values, torch.tensor([3.0, 0.5, -2.0], dtype=F64), rtol=0, atol=1e-12)
    assert vectors.shape == (40, 3)


def test_lanczos_rejects_zero_start_and_non_finite_products():
    a = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(a.__matmul__, 5, 3, v0=torch.zeros(5, dtype=F64))
    with pytest.raises(FloatingPointError):
        lanczos(lambda v: v * math.nan, 5, 3, v0=torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="which"):
        lanczos_eigenpairs(a, 1, "middle")


# ------------------------------------------------------------------ stochastic Lanczos quadrature


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


def resolvable_spectrum():
    """N = 2000: negative bulk, an atom of exact zeros, positive bulk, a few outliers beyond 2/γ = 20."""
    gen = torch.Generator().manual_seed(0)

    def uniform(n, lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)

    zeros = torch.zeros(400, dtype=F64)
    return torch.cat(
        [uniform(300, -4, -1), zeros, uniform(1250, 1, 12), uniform(40, 12, 18), uniform(10, 24, 60)]
    )


@functools.cache
def resolvable_slq():
    # A diagonal operator with Gaussian probes is distributed exactly like any rotation U diag(h) Uᵀ.
    h = resolvable_spectrum()
    gen = torch.Generator().manual_seed(1)
    return slq(lambda v: h * v, h.numel(), 10, 80, gen, distribution="gaussian", dtype=F64)


def test_slq_spectral_counts_within_two_percent_of_exact():
    h = resolvable_spectrum()
    n, lr = h.numel(), 0.1
    exact = spectral_counts(h, lr)
    assert exact == {
        "n_chaotic": 310,
        "n_edge": 400,
        "n_stable": 1290,
        "n_negative": 300,
        "n_positive": 1300,
        "n_zero": 400,
    }
    nodes, weights = resolvable_slq()
    estimate = slq_spectral_counts(nodes, weights, n, lr)
    assert set(estimate) == set(exact)
    for key, value in exact.items():
        assert abs(estimate[key] - value) <= 0.02 * n, (key, estimate[key], value)
    assert estimate["n_chaotic"] + estimate["n_edge"] + estimate["n_stable"] == pytest.approx(n)


def test_slq_without_reorthogonalisation_keeps_the_counts_and_is_chosen_for_large_bases(monkeypatch):
    h = resolvable_spectrum()
    n, lr = h.numel(), 0.1
    exact = spectral_counts(h, lr)

    def run(**kwargs):
        gen = torch.Generator().manual_seed(1)
        return slq(lambda v: h * v, n, 10, 80, gen, distribution="gaussian", dtype=F64, **kwargs)

    plain = run(reorthogonalize=False)
    assert torch.allclose(plain[1].sum(dim=1), torch.ones(10, dtype=F64))  # still a probability measure
    estimate = slq_spectral_counts(*plain, n, lr)
    for key, value in exact.items():
        assert abs(estimate[key] - value) <= 0.02 * n, (key, estimate[key], value)
    # the 10 x 80 x 2000 float64 basis is 12.8 MB: reorthogonalised by default, not below a smaller budget
    assert all(torch.equal(a, b) for a, b in zip(run(), resolvable_slq()))
    monkeypatch.setattr("lightning_chaos.core.spectrum.SLQ_REORTHOGONALIZE_BYTES", 10 * 80 * n * 8 - 1)
    assert all(torch.equal(a, b) for a, b in zip(run(), plain))


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
    eps = DEFAULT_TOLERANCE * 31.0
    for lower, upper in ((-math.inf, -eps), (-eps, eps), (eps, 20.0), (20.0, math.inf), (-0.1, 1.0)):
        exact = float(h.numel() * mass[(h >= lower) & (h <= upper)].sum(0).mean())
        low, high = slq_count_bounds(nodes, weights, h.numel(), lower, upper)
        assert low - 1e-9 <= exact <= high + 1e-9, (lower, upper, low, exact, high)
        assert low - 1e-9 <= slq_count(nodes, weights, h.numel(), lower, upper) <= high + 1e-9


def test_slq_class_brackets_contain_the_exact_probe_masses_and_the_point_estimates():
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
    n = h.numel()
    for kwargs in ({"lr": 0.1}, {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.2}):
        op = Recorder(a)
        nodes, weights = slq(op, num_probes=8, num_steps=30, generator=torch.Generator().manual_seed(8))
        mass = (u.T @ op.first_blocks[0]) ** 2  # (N, P) exact (v_iᵀ u_p)²
        masks = classify_eigenvalues(h, scale=31.0, **kwargs)
        bounds = slq_spectral_count_bounds(nodes, weights, n, scale=31.0, **kwargs)
        estimate = slq_spectral_counts(nodes, weights, n, scale=31.0, **kwargs)
        assert list(bounds) == ["n_chaotic", "n_edge", "n_stable", "n_negative", "n_positive", "n_zero"]
        for name, mask in masks.items():
            low, high = bounds[f"n_{name}"]
            exact = float(n * mass[mask].sum(0).mean())
            assert 0 <= low and high <= n, (kwargs, name, low, high)
            assert low - 1e-9 <= exact <= high + 1e-9, (kwargs, name, low, exact, high)
            assert low - 1e-9 <= estimate[f"n_{name}"] <= high + 1e-9, (kwargs, name)
    with pytest.raises(ValueError, match="overlap"):
        slq_spectral_count_bounds(nodes, weights, n, lr=0.1, tolerance=0.5)


def test_slq_on_hessian_operator_counts_outliers_and_brackets_the_rest():
    loss_fn, params = mlp_loss(sizes=(6, 16, 16, 4), batch=32, act=torch.relu, seed=3)
    hess = dense_hessian(loss_fn, params)
    h, vectors = torch.linalg.eigh(hess)
    n, lr = h.numel(), 2.0 / float(h[-4] + h[-5]) * 2  # 2/γ between the 4th and 5th largest eigenvalue
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
    estimate = slq_spectral_counts(nodes, weights, n, lr)
    exact = spectral_counts(h, lr)
    above = float(h.numel() * ((vectors.T @ recorder_blocks[0]) ** 2)[h > 2 / lr].sum(0).mean())
    assert estimate["n_chaotic"] - estimate["n_negative"] == pytest.approx(above, abs=0.3)
    assert exact["n_chaotic"] - exact["n_negative"] == 4
    low, high = slq_count_bounds(nodes, weights, n, upper=-DEFAULT_TOLERANCE * float(h.abs().max()))
    probe_mass = float(
        n * ((vectors.T @ recorder_blocks[0]) ** 2)[h < -DEFAULT_TOLERANCE * h.abs().max()].sum(0).mean()
    )
    assert low - 1e-6 <= probe_mass <= high + 1e-6


def test_slq_density_integrates_to_one_and_matches_smoothed_spectrum():
    h = resolvable_spectrum()
    nodes, weights = resolvable_slq()
    grid = torch.linspace(-20, 80, 5001, dtype=F64)
    density = slq_density(nodes, weights, grid, bandwidth=2.0)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    exact = torch.exp(-0.5 * ((grid[:, None] - h) / 2.0) ** 2).mean(1) / (2.0 * math.sqrt(2 * math.pi))
    assert float(torch.trapezoid((density - exact).abs(), grid)) < 0.05


# ------------------------------------------------------------------ local Lyapunov exponents


MOMENTUM_CASES_FOR_NORM = [
    {"momentum": 0.9},
    {"momentum": 0.5, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.6, "dampening": 0.5, "weight_decay": 0.1},
]


def test_plain_sgd_lle_are_log_singular_values_of_the_tangent_map():
    h = torch.tensor([-3.0, -0.2, 0.0, 0.4, 1.0, 3.9, 4.1, 7.0], dtype=F64)
    a, _ = planted(h, seed=9)
    lr, wd = 0.5, 0.05
    jac = sgd_tangent_map(a, lr, weight_decay=wd)
    expected = torch.log(torch.linalg.svdvals(jac)).sort().values  # Λ = ½ log JᵀJ (seed 001, A.5)
    lle = local_lyapunov_exponents(h, lr, weight_decay=wd)
    torch.testing.assert_close(lle.sort().values, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.3}, *MOMENTUM_CASES_FOR_NORM])
def test_log_tangent_map_norm_is_the_spectral_norm_of_the_explicit_map(kwargs, first_step):
    h = torch.tensor([-2.0, -0.3, 0.0, 0.05, 0.5, 1.7, 3.0, 4.5, 9.0], dtype=F64)
    a, _ = planted(h, seed=12)
    lr = 0.3
    jac = sgd_tangent_map(a, lr, first_step=first_step, **kwargs)
    expected = float(torch.log(torch.linalg.matrix_norm(jac, ord=2)))
    assert log_tangent_map_norm(h, lr, first_step=first_step, **kwargs) == pytest.approx(expected, abs=1e-10)
    extremes = h[[0, -1]]  # the block norm is convex in h: the extremes decide
    assert log_tangent_map_norm(extremes, lr, first_step=first_step, **kwargs) == pytest.approx(expected)
    lle_max = float(local_lyapunov_exponents(h, lr, **kwargs).max())
    if not kwargs.get("momentum"):
        assert expected == pytest.approx(lle_max, abs=1e-12)  # normal map: norm = spectral radius
    else:
        assert expected > lle_max  # not normal: the largest LLE is no bound on one-step growth


def test_lle_is_minus_infinity_where_the_map_annihilates_the_direction():
    lle = local_lyapunov_exponents(torch.tensor([2.0, 1.0], dtype=F64), lr=0.5)
    assert lle[0] == -math.inf and lle[1] == pytest.approx(math.log(0.5))


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
    n, lr = h.numel(), 0.4
    a, u = planted(h, seed=10)
    jac = sgd_tangent_map(a, lr, **kwargs)
    # In the eigenbasis of H the 2N x 2N map decouples into 2 x 2 blocks acting on (δθ_i, δv_i).
    basis = torch.block_diag(u, u)
    rotated = basis.T @ jac @ basis
    block_radius = torch.stack(
        [torch.linalg.eigvals(rotated[[i, n + i]][:, [i, n + i]]).abs().max() for i in range(n)]
    )
    lle = local_lyapunov_exponents(h, lr, **kwargs)
    torch.testing.assert_close(lle, torch.log(block_radius), rtol=0, atol=1e-9)
    assert float(lle.max()) == pytest.approx(float(torch.linalg.eigvals(jac).abs().max().log()), abs=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.8, "nesterov": True}],
)
def test_stability_interval_bounds_the_negative_lle_region(kwargs):
    lr = 0.25
    lower, upper = stability_interval(lr, **kwargs)
    expected_upper = {
        (): 2 / lr,
        ("momentum",): 2 * (1 + 0.9) / lr,
        ("dampening", "momentum"): 2 * 1.5 / (0.7 * lr),
        ("momentum", "nesterov"): 2 * 1.8 / (2.6 * lr),
    }[tuple(sorted(kwargs))]
    assert lower == 0.0 and upper == pytest.approx(expected_upper)

    def spectral_radius(curvature):  # from the explicit tangent map of a 1-parameter problem
        jac = sgd_tangent_map(torch.tensor([[curvature]], dtype=F64), lr, **kwargs)
        return float(torch.linalg.eigvals(jac).abs().max())

    assert spectral_radius(0.0) == pytest.approx(1.0, abs=1e-12)
    assert spectral_radius(upper) == pytest.approx(1.0, abs=1e-7)
    inside = torch.linspace(lower, upper, 203, dtype=F64)[1:-1]
    outside = torch.cat(
        [torch.linspace(-5, lower, 50, dtype=F64)[:-1], torch.linspace(upper, 4 * upper, 50, dtype=F64)[1:]]
    )
    assert all(spectral_radius(float(c)) < 1 for c in inside)
    assert all(spectral_radius(float(c)) > 1 for c in outside)
    assert (local_lyapunov_exponents(inside, lr, **kwargs) < 0).all()
    assert (local_lyapunov_exponents(outside, lr, **kwargs) > 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": 0.1, "momentum": 1.0},
        {"lr": 0.1, "momentum": 0.9, "dampening": 1.5},
        {"lr": 0.1, "nesterov": True},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True},
        {"lr": 0.1, "weight_decay": -1.0},
    ],
)
def test_invalid_sgd_hyperparameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        local_lyapunov_exponents(torch.ones(3, dtype=F64), **kwargs)
    with pytest.raises(ValueError):
        spectral_counts(torch.ones(3, dtype=F64), **kwargs)


def test_dampening_one_has_no_stability_interval():
    with pytest.raises(ValueError, match="dampening=1"):
        stability_interval(0.1, momentum=0.9, dampening=1.0)
    lle = local_lyapunov_exponents(
        torch.tensor([-1.0, 0.0, 5.0], dtype=F64), 0.1, momentum=0.9, dampening=1.0
    )
    torch.testing.assert_close(lle, torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------ spectral counts


def test_spectral_counts_of_a_planted_spectrum():
    lr = 0.5  # 2/γ = 4
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
    counts = spectral_counts(h, lr)
    assert counts == {
        "n_chaotic": 5,
        "n_edge": 6,
        "n_stable": 4,
        "n_negative": 3,
        "n_positive": 9,
        "n_zero": 3,
    }
    lle = local_lyapunov_exponents(h, lr)
    assert int((lle[~edge] > 0).sum()) == counts["n_chaotic"]
    assert int((lle[~edge] < 0).sum()) == counts["n_stable"]
    assert float(lle[edge].abs().max()) < 1e-6
    # a tolerance of 0 leaves only exact boundary values on the edge
    strict = spectral_counts(h, lr, tolerance=0.0)
    assert strict == {
        "n_chaotic": 7,
        "n_edge": 2,
        "n_stable": 6,
        "n_negative": 4,
        "n_positive": 10,
        "n_zero": 1,
    }
    # an explicit scale overrides the spectral radius: ε = 1e-5 * 2e4 = 0.2
    assert spectral_counts(h, lr, scale=2e4)["n_edge"] == 8


def test_spectral_counts_with_momentum_and_weight_decay():
    lr, mu = 0.1, 0.9  # heavy-ball stable interval (0, 38)
    h = torch.tensor([-1.0, -0.05, 0.0, 0.0, 1.0, 37.0, 38.0, 39.0], dtype=F64)
    assert spectral_counts(h, lr, momentum=mu) == {
        "n_chaotic": 3,
        "n_edge": 3,
        "n_stable": 2,
        "n_negative": 2,
        "n_positive": 4,
        "n_zero": 2,
    }
    # weight decay wd = 0.1 shifts the effective curvature: exact zeros become stable, -0.05 too
    assert spectral_counts(h, lr, momentum=mu, weight_decay=0.1) == {
        "n_chaotic": 3,
        "n_edge": 0,
        "n_stable": 5,
        "n_negative": 1,
        "n_positive": 7,
        "n_zero": 0,
    }
    # Nesterov: (0, 2(1+μ)/((1+2μ)γ)) = (0, 13.57...)
    assert spectral_counts(h, lr, momentum=mu, nesterov=True)["n_chaotic"] == 5


def test_relu_zero_eigenvalues_are_edge_in_float32_and_float64():
    loss64, params64 = mlp_loss(sizes=(6, 16, 16, 4), batch=12, act=torch.relu, seed=11)
    loss32, params32 = mlp_loss(sizes=(6, 16, 16, 4), batch=12, act=torch.relu, seed=11, dtype=torch.float32)
    h64 = torch.linalg.eigvalsh(dense_hessian(loss64, params64))
    h32 = torch.linalg.eigvalsh(dense_hessian(loss32, params32)).to(F64)
    rho = float(h64.abs().max())
    exact_zeros = h64.abs() < 1e-12 * rho
    assert int(exact_zeros.sum()) > 20  # dead units and the rank deficit of a small batch
    # float32 rounding moves the exact zeros by far less than the default tolerance
    assert float(h32[exact_zeros].abs().max()) < DEFAULT_TOLERANCE * rho / 100
    lr = 1.0 / float(h64.max())
    m64, m32 = classify_eigenvalues(h64, lr), classify_eigenvalues(h32, lr)
    assert m64["edge"][exact_zeros].all() and m32["edge"][exact_zeros].all()
    assert m64["zero"][exact_zeros].all() and m32["zero"][exact_zeros].all()
    # edge directions have an LLE indistinguishable from 0
    lle = local_lyapunov_exponents(h64, lr)
    assert float(lle[m64["edge"]].abs().max()) <= 1.01 * lr * DEFAULT_TOLERANCE * rho
    c64, c32 = spectral_counts(h64, lr), spectral_counts(h32, lr)
    borderline = int(((h64.abs() - DEFAULT_TOLERANCE * rho).abs() < 1e-6 * rho).sum())
    assert all(abs(c64[key] - c32[key]) <= borderline for key in c64)
    assert c64["n_chaotic"] + c64["n_edge"] + c64["n_stable"] == h64.numel()
    assert c64["n_negative"] + c64["n_zero"] + c64["n_positive"] == h64.numel()
    assert c64["n_chaotic"] == int((h64 < -DEFAULT_TOLERANCE * rho).sum())  # no curvature beyond 2/γ = 2 h0


def test_symmetric_eigh_retries_in_float64_when_float32_lapack_fails(monkeypatch):
    from lightning_chaos.core.spectrum import symmetric_eigh

    a = torch.randn(6, 6)
    a = a + a.T
    real_eigh, real_eigvalsh = torch.linalg.eigh, torch.linalg.eigvalsh

    def failing(solver):
        def solve(m):
            if m.dtype == torch.float32:
                raise torch.linalg.LinAlgError("failed to converge")
            return solver(m)

        return solve

    monkeypatch.setattr(torch.linalg, "eigh", failing(real_eigh))
    monkeypatch.setattr(torch.linalg, "eigvalsh", failing(real_eigvalsh))
    values, vectors = symmetric_eigh(a)
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(symmetric_eigh(a, eigenvectors=False), values)
    with pytest.raises(torch.linalg.LinAlgError):
        symmetric_eigh(torch.full((3, 3), float("nan"), dtype=torch.float64))
