"""Tangent maps against the Jacobian of the real SGD update (torch.func.jacrev of the reference step)."""

import pytest
import torch
from helpers import F64, SGD_VARIANTS, batch_loss, initial_params, sgd_step

from lightning_chaos.core.operators import HessianOperator, dense_hessian
from lightning_chaos.core.params import flatten
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.tangent_map import apply_tangent_map, sgd_tangent_map


@pytest.mark.parametrize("kwargs", SGD_VARIANTS)
def test_tangent_map_is_the_jacobian_of_the_sgd_step(kwargs):
    like, lr = initial_params(), 0.3
    sgd = SGDHyperparameters(lr=lr, **kwargs)
    loss_fn = batch_loss(0)
    theta = flatten(like)
    n = theta.numel()
    hessian = dense_hessian(loss_fn, like)
    jac = sgd_tangent_map(hessian, sgd)
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

    first_map = sgd_tangent_map(hessian, sgd.at_first_step())
    torch.testing.assert_close(first_map[:, :n], torch.func.jacrev(first)(theta), rtol=0, atol=1e-12)
    if kwargs.get("dampening"):
        assert not torch.allclose(first_map[:, :n], jac[:, :n])  # dampening is skipped on the first step


@pytest.mark.parametrize("kwargs", SGD_VARIANTS)
@pytest.mark.parametrize("first_step", [False, True])
def test_matrix_free_tangent_map_equals_dense_map(kwargs, first_step):
    like = initial_params()
    sgd = SGDHyperparameters(lr=0.3, **kwargs)
    sgd = sgd.at_first_step() if first_step else sgd
    loss_fn = batch_loss(1)
    op = HessianOperator(loss_fn, like)
    hessian = dense_hessian(loss_fn, like)
    dense = sgd_tangent_map(hessian, sgd)
    block = torch.randn(dense.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = apply_tangent_map(op.matmat, block, sgd)
    torch.testing.assert_close(out, dense @ block, rtol=0, atol=1e-12)
    vector_out = apply_tangent_map(op.matmat, block[:, 0], sgd)
    torch.testing.assert_close(vector_out, dense @ block[:, 0], rtol=0, atol=1e-12)


def test_tangent_map_input_checks():
    with pytest.raises(ValueError, match="square"):
        sgd_tangent_map(torch.zeros(2, 3), SGDHyperparameters(lr=0.1))
    with pytest.raises(ValueError, match="2N"):
        apply_tangent_map(lambda y: y, torch.zeros(5, 2), SGDHyperparameters(lr=0.1, momentum=0.9))
