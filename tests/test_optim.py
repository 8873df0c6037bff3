"""CGD against the explicit projection of the base update, in plain PyTorch (Lightning: callbacks/)."""

import copy
import functools

import pytest
import torch
from helpers import F64, cgd_step, loss_of, tanh_net
from helpers import cgd_batch as batch
from torch import nn

from lightning_chaos import CGD
from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.step_curvature import StepCurvature


def explicit_hessian(net, x, y):
    """The batch Hessian by torch.func.hessian on the flat parameter vector (independent of the package)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def flat_loss(vec):
        pieces, i = {}, 0
        for name, shape in zip(names, shapes):
            pieces[name] = vec[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(net, pieces, (x,)), y)

    return torch.func.hessian(flat_loss)(theta)


def boundary(lr, momentum, nesterov):
    if momentum == 0:
        return 2 / lr
    return 2 * (1 + momentum) / (((1 + 2 * momentum) if nesterov else 1) * lr)


def flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


SGD_SETTINGS = [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=0.05),
    dict(momentum=0.5, weight_decay=0.01, nesterov=True),
]


@pytest.mark.parametrize("strategy", ["chaotic", "negative", "positive", "positive_curvature"])
@pytest.mark.parametrize("sgd", SGD_SETTINGS, ids=["plain", "momentum", "momentum+wd", "nesterov+wd"])
@pytest.mark.parametrize("project", [True, False], ids=["project_buffer", "keep_buffer"])
def test_step_is_the_explicit_projection_of_the_base_update(strategy, sgd, project):
    net = tanh_net()
    x, y = batch()
    h0 = float(torch.linalg.eigvalsh(explicit_hessian(net, x, y))[-1])
    lr = 3.0 / h0 * (1 + sgd["momentum"])  # top curvature beyond the stability edge: "positive" removes some
    ref = copy.deepcopy(net)
    opt = CGD(torch.optim.SGD(net.parameters(), lr=lr, **sgd), strategy=strategy, project_momentum=project)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, **sgd)
    for step in range(3):  # earlier steps fill the momentum buffers
        xb, yb = batch(seed=10 + step)
        if step:  # keep both runs at the same point: plain SGD steps for both
            for o, m in ((opt.optimizer, net), (ref_opt, ref)):
                o.zero_grad()
                loss_of(m, xb, yb).backward()
                o.step()
    theta = flat(net)
    torch.testing.assert_close(theta, flat(ref), rtol=0, atol=0)
    # explicit reference: plain SGD update, exact eigendirections of the batch Hessian, (I − VVᵀ)Δθ
    ref_opt.zero_grad()
    loss_of(ref, x, y).backward()
    ref_opt.step()
    delta = flat(ref) - theta
    evals, evecs = torch.linalg.eigh(explicit_hessian(net, x, y))
    shifted = evals + sgd["weight_decay"]
    eps = 1e-5 * evals.abs().max()
    upper = boundary(lr, sgd["momentum"], sgd.get("nesterov", False))
    negative, beyond, positive = shifted < -eps, shifted > upper + eps, shifted > eps
    mask = {
        "chaotic": negative | beyond,
        "negative": negative,
        "positive": beyond,
        "positive_curvature": positive,
    }[strategy]
    assert 0 < int(mask.sum()) < evals.numel()
    v = evecs[:, mask]
    expected = theta + (torch.eye(theta.numel(), dtype=F64) - v @ v.T) @ delta

    cgd_step(opt, net, x, y)
    torch.testing.assert_close(flat(net), expected, rtol=0, atol=1e-12)
    assert opt.last_removed == int(mask.sum())
    torch.testing.assert_close(opt.removed_eigenvalues.sort().values, evals[mask].sort().values)
    if not sgd["momentum"]:
        return
    # momentum buffer: P v' (project_momentum) or exactly the plain-SGD buffer v' (kept)
    buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in net.parameters()])
    ref_buf = torch.cat([ref_opt.state[q]["momentum_buffer"].reshape(-1) for q in ref.parameters()])
    projected_ref = ref_buf - v @ (v.T @ ref_buf)
    torch.testing.assert_close(
        buf, projected_ref if project else ref_buf, rtol=0, atol=0 if not project else 1e-12
    )
    if not sgd.get("nesterov"):  # heavy ball: the update taken is −γ P v'
        torch.testing.assert_close(flat(net) - theta, -lr * projected_ref, rtol=0, atol=1e-12)


def test_nothing_removed_leaves_the_base_update_bit_identical():
    net, ref = tanh_net(), tanh_net()
    x, y = batch()
    opt = CGD(torch.optim.SGD(net.parameters(), lr=1e-3), strategy="positive")  # 2/γ far above h0
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
    cgd_step(opt, net, x, y)
    loss_of(ref, x, y).backward()
    ref_opt.step()
    assert opt.last_removed == 0 and opt.last_update_ratio == 1.0
    assert torch.equal(flat(net), flat(ref))


@pytest.mark.parametrize("strategy", ["chaotic", "negative", "positive", "positive_curvature"])
def test_lanczos_removes_the_exact_top_k(strategy):
    results = {}
    x, y = batch()
    h0 = float(torch.linalg.eigvalsh(explicit_hessian(tanh_net(), x, y))[-1])
    for method in ("exact", "lanczos"):
        net = tanh_net()
        opt = CGD(torch.optim.SGD(net.parameters(), lr=2.5 / h0), strategy=strategy, method=method, k=2)
        cgd_step(opt, net, x, y)
        results[method] = (flat(net), opt.last_removed, opt.removed_eigenvalues.sort().values)
    (theta_e, r_e, h_e), (theta_l, r_l, h_l) = results["exact"], results["lanczos"]
    assert r_e == r_l >= 1
    torch.testing.assert_close(h_l, h_e, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(theta_l, theta_e, rtol=0, atol=1e-9)


def test_every_n_steps_reuses_the_directions_in_between(monkeypatch):
    net = tanh_net()
    opt = CGD(torch.optim.SGD(net.parameters(), lr=0.5), strategy="negative", every_n_steps=3)
    calls = []
    original = CGD._directions
    monkeypatch.setattr(CGD, "_directions", lambda self, probe: calls.append(1) or original(self, probe))
    for step in range(7):
        cgd_step(opt, net, *batch(seed=step))
        assert opt.last_removed == opt.removed_eigenvalues.numel() > 0
    assert len(calls) == 3  # steps 0, 3, 6


def test_state_dict_round_trip_and_scheduler():
    def make(net):
        base = torch.optim.SGD(net.parameters(), lr=0.8, momentum=0.9)
        return CGD(base, strategy="chaotic", method="lanczos", k=3, every_n_steps=2, seed=3)

    net = tanh_net()
    opt = make(net)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        cgd_step(opt, net, *batch(seed=step))
        sched.step()
    assert opt.last_removed > 0
    assert [g["lr"] for g in opt.optimizer.param_groups] == [0.8 * 0.5**3]  # StepLR acts on the base groups
    state = copy.deepcopy(opt.state_dict())
    assert {"state", "param_groups", "cgd"} <= set(state)
    # continue the original, and a fresh CGD restored from the state dict, on the same batches
    clone = copy.deepcopy(net)
    restored = make(clone)
    restored.load_state_dict(state)
    for o, m in ((opt, net), (restored, clone)):
        for step in range(3, 6):
            cgd_step(o, m, *batch(seed=step))
    assert restored.num_steps == opt.num_steps == 6
    assert torch.equal(flat(net), flat(clone))


def test_missing_curvature_and_bad_arguments_are_clear_errors():
    net = tanh_net()
    x, y = batch()
    opt = CGD(torch.optim.SGD(net.parameters(), lr=0.1))
    loss_of(net, x, y).backward()
    with pytest.raises(RuntimeError, match="CGDCurvature.*set_curvature"):
        opt.step()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    for kwargs, name in [
        ({"strategy": "chaos"}, "strategy"),
        ({"method": "power"}, "method"),
        ({"k": 0}, "k"),
        ({"method": "lanczos"}, "k"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"tolerance": -1.0}, "tolerance"),
    ]:
        with pytest.raises(ValueError, match=name):
            CGD(sgd, **kwargs)
    # the messages of lightning_chaos.core.validation: the argument, what is allowed, the value given
    with pytest.raises(ValueError, match=r"^`strategy` must be one of 'chaotic', .*; got 'chaos'\.$"):
        CGD(sgd, strategy="chaos")
    with pytest.raises(ValueError, match=r"^`k` must be an integer >= 1, got 0\.$"):
        CGD(sgd, k=0)
    with pytest.raises(ValueError, match=r"^`tolerance` must be a number in \[0\.0, inf\), got -1\.0\.$"):
        CGD(sgd, tolerance=-1.0)
    with pytest.raises(ValueError, match="either a base optimizer or parameters"):
        CGD(sgd, base=functools.partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(TypeError, match="base optimizer"):
        CGD(net.parameters())
    with pytest.raises(TypeError, match="other than CGD"):
        CGD(CGD(sgd))
    other = tanh_net(seed=5)
    opt.set_curvature(FunctionalLoss(other, lambda: loss_of(other, x, y)))
    with pytest.raises(ValueError, match="not in the base optimizer"):
        opt.step()


def test_a_diverged_loss_is_a_floating_point_error_and_no_step():
    net = tanh_net()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")  # (an inf weight saturates tanh: loss and Hessian stay finite)
    before = flat(net)
    opt = CGD(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError, match="not finite"):
        cgd_step(opt, net, *batch())
    assert torch.allclose(flat(net), before, rtol=0, atol=0, equal_nan=True)
    assert opt.num_steps == 0


def test_built_from_params_and_a_base_factory_like_lightning_cli():
    net = tanh_net()
    opt = CGD(
        net.parameters(), strategy="negative", base=functools.partial(torch.optim.SGD, lr=0.3, momentum=0.5)
    )
    assert isinstance(opt.optimizer, torch.optim.SGD) and opt.param_groups is opt.optimizer.param_groups
    assert opt.hyperparameters().momentum == 0.5
    clone = copy.deepcopy(opt)  # e.g. for twins or checkpoints in memory: an independent optimizer
    assert clone.optimizer is not opt.optimizer and clone.param_groups[0]["lr"] == 0.3


def test_a_step_curvature_is_accepted_and_shared_with_other_consumers():
    net = tanh_net()
    x, y = batch()
    curvature = StepCurvature(FunctionalLoss(net, lambda: loss_of(net, x, y)))
    evals = curvature.eigh()[0]  # another consumer computed the eigendecomposition first
    opt = CGD(torch.optim.SGD(net.parameters(), lr=0.5), strategy="negative")
    opt.zero_grad()
    loss_of(net, x, y).backward()
    opt.set_curvature(curvature)
    opt.step()
    torch.testing.assert_close(opt.removed_eigenvalues, evals[evals < -1e-5 * evals.abs().max()])
    with pytest.raises(TypeError, match="FunctionalLoss or a StepCurvature"):
        opt.set_curvature(lambda: loss_of(net, x, y))


def test_other_base_optimizers_use_their_shared_learning_rate():
    net = tanh_net()
    opt = CGD(torch.optim.Adam(net.parameters(), lr=0.01), strategy="negative")
    sgd = opt.hyperparameters()
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.01, 0.0, 0.0)
    cgd_step(opt, net, *batch())
    assert opt.num_steps == 1 and opt.last_removed > 0
    groups = [{"params": list(net.parameters())[:2]}, {"params": list(net.parameters())[2:], "lr": 0.1}]
    with pytest.raises(ValueError, match="one learning rate"):
        CGD(torch.optim.Adam(groups, lr=0.01)).hyperparameters()


def test_a_closure_without_loss_or_gradient_is_a_skipped_step():
    # Lightning's closure of a training_step that returned None: zero_grad, no backward, no loss
    net = tanh_net()
    opt = CGD(torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9), strategy="negative")
    cgd_step(opt, net, *batch(seed=3))  # fills the momentum buffers
    before = flat(net)
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    opt.set_curvature(FunctionalLoss(net, lambda: None))  # what CGDCurvature hands over on such a step

    def closure():
        opt.zero_grad()

    assert opt.step(closure) is None
    assert torch.equal(flat(net), before) and opt.num_steps == 1
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(buffers, net.parameters()))
    assert opt.step(closure) is None  # no curvature needed either
    # a closure that runs backward but returns nothing is a real step: it needs (and uses) the curvature
    x, y = batch(seed=4)

    def backward_only():
        opt.zero_grad()
        loss_of(net, x, y).backward()

    with pytest.raises(RuntimeError, match="CGDCurvature"):
        opt.step(backward_only)
    opt.set_curvature(FunctionalLoss(net, lambda: loss_of(net, x, y)))
    opt.step(backward_only)
    assert opt.num_steps == 2 and not torch.equal(flat(net), before)
