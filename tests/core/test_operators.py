"""Exact Hessian-vector products, the Hessian operator and the dense Hessian against exact linear algebra."""

import warnings

import pytest
import torch
from helpers import F64, OnceTanh, RaisingTanh, mlp_loss, planted, quadratic_loss

from lightning_chaos.core.operators import (
    HessianOperator,
    LinearOperator,
    SecondOrderError,
    as_matmat,
    dense_hessian,
    hessian_vector_product,
    second_order_context,
    symmetric_eigh,
)
from lightning_chaos.core.params import unflatten

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
    before = op.num_hvps
    for chunk_size in (None, 1, 3, 4):
        torch.testing.assert_close(op.matmat_chunked(block, chunk_size), exact @ block, rtol=0, atol=1e-12)
    assert op.num_hvps == before + 4 * 4  # every column counted once, whatever the chunks


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


def test_symmetric_eigh_retries_in_float64_when_float32_lapack_fails(monkeypatch):
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


# ------------------------------------------------------------------ the operator contract


def test_as_matmat_accepts_dense_operators_and_bare_matvecs():
    a, _ = planted(torch.linspace(-1, 2, 6, dtype=F64))
    block = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    matmat, n, dtype, device = as_matmat(a)
    assert (n, dtype, device) == (6, F64, a.device)
    torch.testing.assert_close(matmat(block), a @ block, rtol=0, atol=0)
    loss_fn, params = mlp_loss()
    op = HessianOperator(loss_fn, params)
    assert isinstance(op, LinearOperator)
    matmat, n, dtype, _ = as_matmat(op)
    assert (n, dtype) == (op.shape[0], F64)
    matmat, n, dtype, _ = as_matmat(lambda v: a @ v, dim=6, dtype=F64)
    assert (n, dtype) == (6, F64)
    torch.testing.assert_close(matmat(block), a @ block, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="dim"):
        as_matmat(lambda v: a @ v)
    with pytest.raises(ValueError, match="square"):
        as_matmat(torch.zeros(2, 3))


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_a_missing_double_backward_is_a_second_order_error_and_no_batching_warning(method):
    # in the middle of the loss, as in a network: the gradient flowing into its backward depends on θ
    loss_fn = lambda ps: (ps[1] * RaisingTanh.apply(ps[0])).sum()  # noqa: E731
    params = [torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.5, -1.0], dtype=F64)]
    with pytest.raises(SecondOrderError, match="second-order product failed"):
        hessian_vector_product(loss_fn, params, torch.ones(4, dtype=F64), method)
    op = HessianOperator(loss_fn, params, method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the products fail, not their batching: nothing to warn about
        with pytest.raises(SecondOrderError):
            op.to_dense()
    with pytest.raises(SecondOrderError):
        dense_hessian(loss_fn, params)


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_a_once_differentiable_backward_is_a_second_order_error_not_a_zero(method):
    # autograd never reaches the error node @once_differentiable leaves in the gradient's graph when it
    # differentiates with respect to θ: the second derivatives through it came out as silent zeros
    loss_fn = lambda ps: (ps[1] * OnceTanh.apply(ps[0])).sum()  # noqa: E731
    params = [torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.5, -1.0], dtype=F64)]
    with pytest.raises(SecondOrderError, match="once_differentiable|second-order product failed"):
        hessian_vector_product(loss_fn, params, torch.ones(4, dtype=F64), method)
    with pytest.raises(SecondOrderError):
        HessianOperator(loss_fn, params, method=method).to_dense()
    # the same loss with torch's tanh has the Hessian the error replaced
    exact = dense_hessian(lambda ps: (ps[1] * torch.tanh(ps[0])).sum(), params)
    assert float(torch.diagonal(exact[:2, 2:]).abs().min()) > 0.05  # the cross terms that were dropped


def test_second_order_context_lets_other_errors_through():
    with pytest.raises(ValueError, match="not a second-order failure"), second_order_context():
        raise ValueError("not a second-order failure")
    with pytest.raises(SecondOrderError), second_order_context():
        raise RuntimeError("derivative for foo is not implemented")


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_through_multihead_attention_in_training_mode(method):
    # In float32 training mode nn.MultiheadAttention (need_weights=False, as nn.TransformerEncoderLayer
    # calls it) selects the fused CPU attention kernel, which has no double backward; second_order_context
    # selects the math kernel, which does. Oracle: torch.func.hessian of the same loss under the math
    # kernel, computed here without the package.
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(4, 2, batch_first=True, dropout=0.0).train()
    x = torch.randn(3, 5, 4)
    names = [n for n, _ in attention.named_parameters()]
    params = [p.detach() for p in attention.parameters()]

    def loss_fn(ps):
        mapping = dict(zip(names, ps, strict=True))
        out, _ = torch.func.functional_call(attention, mapping, (x, x, x), {"need_weights": False})
        return out.pow(2).mean()

    leaves = [p.clone().requires_grad_() for p in params]
    grads = torch.autograd.grad(loss_fn(leaves), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # the fused kernel: no double backward
        torch.autograd.grad(sum(g.sum() for g in grads), leaves, allow_unused=True)

    def flat_loss(flat):
        return loss_fn(list(unflatten(flat, params)))

    theta = torch.cat([p.reshape(-1) for p in params])
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = torch.func.hessian(flat_loss)(theta) @ v
    hv = hessian_vector_product(loss_fn, params, v, method)
    torch.testing.assert_close(hv, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        HessianOperator(loss_fn, params, method=method).matvec(v), hv, rtol=0, atol=1e-6
    )
