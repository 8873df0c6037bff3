"""SGDHyperparameters: the update torch.optim.SGD performs, read from the optimizer and validated."""

import dataclasses

import pytest
import torch
from helpers import SGD_VARIANTS, batch_loss, initial_params, sgd_step

from lightning_chaos.core.operators import dense_hessian
from lightning_chaos.core.params import flatten
from lightning_chaos.core.sgd import SGDHyperparameters, sgd_first_step
from lightning_chaos.core.tangent_map import sgd_tangent_map


@pytest.mark.parametrize("kwargs", SGD_VARIANTS)
def test_functional_step_reproduces_torch_optim_sgd(kwargs):
    # the reference update every tangent-map test differentiates is the one torch performs
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


@pytest.mark.parametrize("kwargs", SGD_VARIANTS)
def test_hyperparameters_read_from_sgd_give_the_map_of_its_step(kwargs):
    like = initial_params()
    params = [torch.nn.Parameter(p.clone()) for p in like]
    optimizer = torch.optim.SGD(params, lr=0.3, **kwargs)
    sgd = SGDHyperparameters.from_optimizer(optimizer)
    expected = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0, **kwargs}
    assert sgd == SGDHyperparameters(lr=0.3, **expected)
    assert dataclasses.asdict(sgd) == {"lr": 0.3, **expected}  # (was hp.map_kwargs(), removed with it)
    hessian = dense_hessian(batch_loss(0), like)
    torch.testing.assert_close(
        sgd_tangent_map(hessian, sgd), sgd_tangent_map(hessian, SGDHyperparameters(lr=0.3, **kwargs))
    )
    # a tensor learning rate (e.g. capturable schedulers) is read as a float
    optimizer.param_groups[0]["lr"] = torch.tensor(0.25)
    assert SGDHyperparameters.from_optimizer(optimizer).lr == 0.25


def test_first_step_drops_the_dampening_only_with_momentum():
    heavy = SGDHyperparameters(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1)
    assert heavy.at_first_step() == SGDHyperparameters(lr=0.1, momentum=0.9, weight_decay=0.1)
    plain = SGDHyperparameters(lr=0.1, dampening=0.3)  # torch ignores dampening without momentum
    assert plain.at_first_step() is plain
    with pytest.raises(dataclasses.FrozenInstanceError):
        heavy.lr = 0.2


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
        SGDHyperparameters.from_optimizer(torch.optim.Adam(params))
    with pytest.raises(ValueError, match="maximize"):
        SGDHyperparameters.from_optimizer(torch.optim.SGD(params, lr=0.1, maximize=True))
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.2, "weight_decay": 0.1}]
    with pytest.raises(ValueError, match="lr, weight_decay"):
        SGDHyperparameters.from_optimizer(torch.optim.SGD(groups, lr=0.1))
    same = [{"params": params[:2]}, {"params": params[2:], "lr": 0.1}]
    assert SGDHyperparameters.from_optimizer(torch.optim.SGD(same, lr=0.1)).lr == 0.1
    with pytest.raises(ValueError, match="momentum"):
        SGDHyperparameters.from_optimizer(torch.optim.SGD(params, lr=0.1, momentum=1.0))
    with pytest.raises(ValueError, match="no parameters"):
        SGDHyperparameters.from_optimizer(torch.optim.SGD([{"params": []}], lr=0.1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "momentum": -0.1}, "momentum"),
        ({"lr": 0.1, "momentum": 0.9, "dampening": 1.5}, "dampening"),
        ({"lr": 0.1, "nesterov": True}, "nesterov"),
        ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_invalid_sgd_hyperparameters_are_rejected(kwargs, match):
    # (the SGD formulas used to validate their loose arguments on every call; now the dataclass does, once)
    with pytest.raises(ValueError, match=match):
        SGDHyperparameters(**kwargs)
