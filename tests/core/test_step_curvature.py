"""StepCurvature: every derived quantity equals its direct computation and is computed once."""

import torch
from helpers import Quadratic
from torch import nn

from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.step_curvature import StepCurvature


def quadratic_step(gradient_source=None):
    model = Quadratic([4.0, 1.0, -2.0, 0.5], seed=1)
    return model, StepCurvature(FunctionalLoss(model, model.forward), gradient_source)


def test_dense_hessian_and_spectrum_of_a_planted_quadratic():
    model, step = quadratic_step()
    torch.testing.assert_close(step.dense(), model.A, rtol=0, atol=1e-12)
    torch.testing.assert_close(step.eigvalsh(), model.eigenvalues.flip(0), rtol=0, atol=1e-12)
    values, vectors = step.eigh()
    torch.testing.assert_close(values, model.eigenvalues.flip(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.A @ vectors, vectors * values, rtol=0, atol=1e-12)
    theta = model.theta.detach()
    torch.testing.assert_close(step.g0(), model.A @ theta + model.b, rtol=0, atol=1e-12)


def test_each_quantity_is_computed_once_and_shared():
    _, step = quadratic_step()
    assert step.hessian() is step.hessian()
    assert step.dense() is step.dense()
    hvps = step.hessian().num_hvps
    assert step.eigvalsh() is step.eigvalsh()
    pairs = step.eigh()
    assert step.eigh() is pairs and step.eigvalsh() is pairs[0]  # eigvalsh reads eigh once it ran
    assert step.hessian().num_hvps == hvps == 4 and step.hessian().num_graphs == 1
    assert step.g0() is step.g0() and step.loss.num_gradients == 1


def test_the_training_gradient_is_reused_when_given():
    model, _ = quadratic_step()
    model.forward().backward()
    step = StepCurvature(FunctionalLoss(model, model.forward), [model.theta])
    assert step.reuses_gradient
    torch.testing.assert_close(step.g0(), model.theta.grad, rtol=0, atol=0)
    assert step.g0() is not model.theta.grad and step.loss.num_gradients == 0  # a copy, no extra pass


def test_the_hessian_of_a_network_matches_torch_func():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    step = StepCurvature(FunctionalLoss(net, lambda: nn.functional.mse_loss(net(x), y)))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def flat_loss(vec):
        pieces = dict(zip(names, torch.split(vec, [s.numel() for s in shapes]), strict=True))
        params = {n: pieces[n].reshape(s) for n, s in zip(names, shapes, strict=True)}
        return nn.functional.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    expected = torch.func.hessian(flat_loss)(theta)
    torch.testing.assert_close(step.dense(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(step.dense(), step.dense().T, rtol=0, atol=0)  # symmetrised
