import pytest
import torch
from torch import nn

from lightning_chaos.core.functional_loss import FunctionalLoss, NoLossError, RNGState
from lightning_chaos.core.params import flatten, unflatten


def dropout_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_probe_leaves_parameters_buffers_grads_and_rng_untouched():
    net = dropout_bn_net()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(net(x), y).backward()
    before, grads = snapshot(net), [p.grad.clone() for p in net.parameters()]
    rng = RNGState.capture()
    loss = FunctionalLoss(net, lambda: nn.functional.cross_entropy(net(x), y), rng_state=rng)
    q = torch.randn(loss.dim, 3)
    marker = torch.get_rng_state()
    loss.gradient(q[:, 0])
    loss.gradients(q)
    assert torch.equal(torch.get_rng_state(), marker)
    after = snapshot(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))


def test_replayed_rng_reproduces_the_training_gradient_with_dropout():
    net = dropout_bn_net()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    rng = RNGState.capture()
    nn.functional.cross_entropy(net(x), y).backward()
    training = flatten([p.grad for p in net.parameters()])
    loss = FunctionalLoss(net, lambda: nn.functional.cross_entropy(net(x), y), rng_state=rng)
    torch.testing.assert_close(loss.gradient(), training, rtol=0, atol=1e-7)
    # without the replay the dropout masks differ and so does the gradient
    unreplayed = FunctionalLoss(net, lambda: nn.functional.cross_entropy(net(x), y))
    assert not torch.allclose(unreplayed.gradient(), training)


def test_gradient_at_perturbed_point_matches_a_perturbed_copy():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss = FunctionalLoss(net, lambda: nn.functional.mse_loss(net(x), y))
    q = torch.randn(loss.dim, dtype=torch.float64) * 0.1
    copy = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        for c, p, dq in zip(copy.parameters(), net.parameters(), unflatten(q, list(net.parameters()))):
            c.copy_(p + dq)
    nn.functional.mse_loss(copy(x), y).backward()
    torch.testing.assert_close(loss.gradient(q), flatten([p.grad for p in copy.parameters()]))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_vmap_and_loop_agree(dropout):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    rng = RNGState.capture()
    q = torch.randn(sum(p.numel() for p in net.parameters()), 4, dtype=torch.float64)
    vm = FunctionalLoss(net, lambda: nn.functional.mse_loss(net(x), y), rng_state=rng)
    batched = vm.gradients(q)
    assert vm.vectorize, "vmap path fell back to the loop"
    lp = FunctionalLoss(net, lambda: nn.functional.mse_loss(net(x), y), rng_state=rng, vectorize=False)
    torch.testing.assert_close(batched, lp.gradients(q))
    assert vm.num_gradients == lp.num_gradients == 4


def test_batchnorm_in_training_mode_falls_back_to_loop():
    net = dropout_bn_net().double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    rng = RNGState.capture()
    q = torch.randn(sum(p.numel() for p in net.parameters()), 2, dtype=torch.float64)
    fl = FunctionalLoss(net, lambda: nn.functional.cross_entropy(net(x), y), rng_state=rng)
    g = fl.gradients(q)
    assert not fl.vectorize
    ref = torch.stack([fl.gradient(q[:, j]) for j in range(2)], dim=1)
    torch.testing.assert_close(g, ref)


def test_loss_scale_and_reduce():
    net = nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    plain = FunctionalLoss(net, lambda: net(x).pow(2).mean())
    scaled = FunctionalLoss(net, lambda: net(x).pow(2).mean(), loss_scale=1024.0, reduce=lambda g: 2 * g)
    torch.testing.assert_close(scaled.gradient(), 2 * plain.gradient())


def test_non_scalar_loss_and_no_parameters_are_clear_errors():
    net = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="scalar"):
        FunctionalLoss(net, lambda: net(x)).gradient()
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        FunctionalLoss(frozen, lambda: frozen(x).sum())


def test_dict_output_with_loss_key():
    net = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    fl = FunctionalLoss(net, lambda: {"loss": net(x).sum(), "other": 1})
    assert fl.gradient().shape == (4,)


@pytest.mark.parametrize("output", [None, {"other": 1}])
def test_a_closure_without_a_loss_raises_no_loss_error(output):
    # a training_step that returns None (or a dict without "loss") tells Lightning to skip the batch
    net = nn.Linear(3, 1)
    fl = FunctionalLoss(net, lambda: output)
    with pytest.raises(NoLossError, match="returned None"):
        fl.gradient()
    with pytest.raises(NoLossError):
        fl.gradients(torch.zeros(fl.dim, 2))
    assert not issubclass(NoLossError, (RuntimeError, ValueError))  # not mistaken for a numerical failure


def test_update_buffers_lets_the_evaluation_update_running_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    x = torch.randn(16, 5)
    before = net[1].running_mean.clone()
    probe = FunctionalLoss(net, lambda: net(x).pow(2).mean())
    probe.gradient()
    assert torch.equal(net[1].running_mean, before)  # the default works on clones
    twin = FunctionalLoss(net, lambda: net(x).pow(2).mean(), update_buffers=True)
    twin.gradient()
    reference = nn.BatchNorm1d(4)
    reference.running_mean.copy_(before)
    with torch.no_grad():
        reference(net[0](x))  # one training forward pass of the same BatchNorm
    torch.testing.assert_close(net[1].running_mean, reference.running_mean)
    assert int(net[1].num_batches_tracked) == 1


class TiedNet(nn.Module):
    """Encoder and decoder share one weight; BatchNorm's running mean is registered under a second name."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.norm = nn.BatchNorm1d(4, dtype=torch.float64)
        self.register_buffer("alias_of_running_mean", self.norm.running_mean)
        self.double()  # converts module by module: tie the buffer again afterwards
        self.alias_of_running_mean = self.norm.running_mean

    def forward(self, x):
        return self.decoder(torch.tanh(self.norm(self.encoder(x))))


def test_tied_weights_are_perturbed_under_every_name():
    torch.manual_seed(0)
    net = TiedNet()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    assert "decoder.weight" not in names  # named_parameters() lists the shared weight once
    loss = FunctionalLoss(net, lambda: nn.functional.mse_loss(net(x), y))
    q = torch.randn(loss.dim, dtype=torch.float64) * 0.1
    copy = TiedNet()
    copy.load_state_dict(net.state_dict())
    with torch.no_grad():
        for c, dq in zip(copy.parameters(), unflatten(q, list(net.parameters()))):
            c.add_(dq)  # the copy's decoder uses the perturbed shared weight too
    nn.functional.mse_loss(copy(x), y).backward()
    expected = flatten([p.grad for p in copy.parameters()])
    torch.testing.assert_close(loss.gradient(q), expected)
    torch.testing.assert_close(loss.gradients(torch.stack([q, q], dim=1))[:, 1], expected)
    before = net.norm.running_mean.clone()
    loss.gradient(q)
    assert torch.equal(net.norm.running_mean, before) and net.alias_of_running_mean is net.norm.running_mean


def test_gradient_relative_to_a_reference_is_the_difference_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    loss = FunctionalLoss(net, lambda: nn.functional.mse_loss(net(x), y), loss_scale=8.0)
    reference = [torch.randn_like(p) for p in net.parameters()]
    q = 0.1 * torch.randn(loss.dim)
    assert torch.equal(loss.gradient(q, relative_to=reference), loss.gradient(q) - flatten(reference))
    assert loss.num_gradients == 2


def test_tied_weights_are_swapped_under_every_name_and_restored_after_an_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False))
    net[2].weight = net[0].weight  # one tensor, two names
    x = torch.randn(5, 3)
    loss = FunctionalLoss(net, lambda: net(x).square().mean())
    assert loss.dim == 9
    w = net[0].weight.detach()
    q = 0.1 * torch.randn(9)
    moved = w + q.view(3, 3)
    expected = torch.func.grad(lambda v: (torch.tanh(x @ v.T) @ v.T).square().mean())(moved)
    torch.testing.assert_close(loss.gradient(q), expected.reshape(-1))

    def failing():
        raise RuntimeError("inside the loss")

    broken = FunctionalLoss(net, failing)
    with pytest.raises(RuntimeError, match="inside the loss"):
        broken(broken.params)
    assert net[0].weight is net[2].weight and isinstance(net[0].weight, nn.Parameter)
