import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    Exploding,
    MemoryLogger,
    MetricModule,
    QuadraticModule,
    TinyModule,
    assert_same_training,
    fit_state,
    loader,
    trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_chaos import TangentMapMonitor
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.tangent_map import sgd_tangent_map

F64 = torch.float64


H = [-3.0, -0.5, 0.0, 0.3, 1.0, 4.0, 4.5, 9.0, 12.0, 20.0]


def run(module, monitor, max_steps=4, **kwargs):
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    trainer([monitor], logger=logger, max_steps=max_steps, **kwargs).fit(module, loader())
    return logger.chaos()


@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
def test_planted_quadratic_exponents_are_the_lles_at_every_step(weight_decay):
    # A diagonal: the identity frame is the eigenbasis, so the finite-time exponents are exact at every T.
    lr = 0.2
    lles = sorted((math.log(abs(1 - lr * (h + weight_decay))) for h in H), reverse=True)
    logged = run(QuadraticModule(H, lr=lr, weight_decay=weight_decay, diagonal=True), TangentMapMonitor())
    for step in range(4):
        assert logged["chaos/tangent_steps"][step] == step + 1
        for i in range(5):
            assert logged[f"chaos/ftle_{i}"][step] == pytest.approx(lles[i], abs=1e-12)
        assert logged["chaos/ftle_min"][step] == pytest.approx(lles[-1], abs=1e-12)
        assert logged["chaos/mlce"][step] == pytest.approx(lles[0], abs=1e-12)
        # plain SGD: ‖J‖ is the largest LLE, so the A.6 bound is attained by the constant map
        assert logged["chaos/mlce_bound"][step] == pytest.approx(lles[0], abs=1e-12)
        assert logged["chaos/lle_max_mean"][step] == pytest.approx(lles[0], abs=1e-12)


def block(h, lr, mu, tau):
    """The 2 x 2 heavy-ball block on (δθ_i, δv_i) of one eigenvalue."""
    c = 1 - tau
    return torch.tensor([[1 - lr * c * h, -lr * mu], [c * h, mu]], dtype=F64)


def test_planted_quadratic_with_momentum_follows_the_2x2_blocks():
    lr, mu, tau, steps = 0.2, 0.5, 0.3, 6
    logged = run(
        QuadraticModule(H, lr=lr, momentum=mu, dampening=tau, diagonal=True),
        TangentMapMonitor(num_exponents=10),
        max_steps=steps,
    )
    # Each frame column starts as δθ_i = 1, δv_i = 0 and stays in its own (θ_i, v_i) plane; torch's first
    # step creates the buffer without dampening (τ = 0).
    vectors = [block(h, lr, mu, 0.0) @ torch.tensor([1.0, 0.0], dtype=F64) for h in H]
    bound = max(float(torch.linalg.matrix_norm(block(h, lr, mu, 0.0), 2).log()) for h in H)
    steady_norm = max(float(torch.linalg.matrix_norm(block(h, lr, mu, tau), 2).log()) for h in H)
    for step in range(steps):
        if step:
            vectors = [block(h, lr, mu, tau) @ v for h, v in zip(H, vectors)]
            bound += steady_norm
        expected = sorted((float(v.norm().log()) / (step + 1) for v in vectors), reverse=True)
        for i in range(10):
            assert logged[f"chaos/ftle_{i}"][step] == pytest.approx(expected[i], abs=1e-12)
        assert logged["chaos/mlce_bound"][step] == pytest.approx(bound / (step + 1), abs=1e-12)
        assert logged["chaos/mlce"][step] <= logged["chaos/mlce_bound"][step]


class RecordHessians(Callback):
    """The exact Hessian of every step's batch at θ_t, from torch.func.hessian on the module's net."""

    def __init__(self):
        self.hessians = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        names = [n for n, _ in pl_module.net.named_parameters()]
        shapes = [p.shape for _, p in pl_module.net.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in pl_module.net.parameters()])
        x, y = self.batch

        def loss(flat):
            pieces = dict(zip(names, torch.split(flat, [math.prod(s) for s in shapes])))
            params = {n: pieces[n].reshape(s) for n, s in zip(names, shapes)}
            return torch.nn.functional.cross_entropy(
                torch.func.functional_call(pl_module.net, params, (x,)), y
            )

        self.hessians.append(torch.func.hessian(loss)(theta))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_accumulated_map_of_a_tiny_mlp_is_the_explicit_product(momentum):
    lr, steps = 0.1, 4
    monitor, record = TangentMapMonitor(), RecordHessians()
    pl.seed_everything(0, verbose=False)
    model = TinyModule(momentum=momentum, lr=lr)
    trainer([monitor, record], max_steps=steps, precision="64-true").fit(model, loader())
    n = record.hessians[0].shape[0]
    assert monitor.full and monitor.lyapunov.num_steps == steps
    if momentum == 0:
        product = torch.eye(n, dtype=F64)  # Y_T = Π (I − γ H_t)
        for hessian in record.hessians:
            product = (torch.eye(n, dtype=F64) - lr * hessian) @ product
    else:  # Y_T = Π J_t [I; 0] on (δθ, δv), the first map with torch's buffer initialisation
        product = torch.cat([torch.eye(n, dtype=F64), torch.zeros(n, n, dtype=F64)])
        sgd = SGDHyperparameters(lr=lr, momentum=momentum)
        for t, hessian in enumerate(record.hessians):
            product = sgd_tangent_map(hessian, sgd.at_first_step() if t == 0 else sgd) @ product
    q, r = torch.linalg.qr(product)
    sign = torch.sign(torch.diagonal(r))
    torch.testing.assert_close(monitor.lyapunov.frame, q * sign, rtol=0, atol=1e-10)
    expected = (torch.log(torch.diagonal(r).abs()) / steps).sort(descending=True).values
    torch.testing.assert_close(monitor.lyapunov.exponents(), expected, rtol=0, atol=1e-10)
    # A.6: mLCE ≤ (1/T) log ‖Y_T‖ ≤ (1/T) Σ log ‖J_t‖
    norm = float(torch.linalg.matrix_norm(product, 2).log()) / steps
    assert monitor.lyapunov.mlce() <= norm + 1e-12 <= monitor.lyapunov.mlce_bound() + 2e-12


def test_k_columns_follow_the_product_applied_to_the_initial_frame():
    lr, steps, k = 0.1, 4, 3
    monitor, record = TangentMapMonitor(num_columns=k, num_exponents=k, seed=3), RecordHessians()
    pl.seed_everything(0, verbose=False)
    trainer([monitor, record], max_steps=steps, precision="64-true").fit(
        TinyModule(momentum=0.0, lr=lr), loader()
    )
    n = record.hessians[0].shape[0]
    frame = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(3), dtype=F64)).Q
    maps = [torch.eye(n, dtype=F64) - lr * hessian for hessian in record.hessians]
    product = torch.linalg.multi_dot([*reversed(maps), frame])
    r = torch.linalg.qr(product).R
    expected = (torch.log(torch.diagonal(r).abs()) / steps).sort(descending=True).values
    assert not monitor.full
    torch.testing.assert_close(monitor.lyapunov.exponents(), expected, rtol=0, atol=1e-10)
    # the A.6 bound from Lanczos extremes (40 steps, N = 195) agrees with the exact spectra
    exact = [float(torch.linalg.eigvalsh(m).abs().max().log()) for m in maps]
    assert monitor.lyapunov.mlce_bound() == pytest.approx(sum(exact) / steps, rel=1e-6)


@pytest.mark.parametrize("module_cls", [TinyModule, MetricModule], ids=["tiny", "torchmetrics"])
def test_monitor_leaves_training_bit_identical(module_cls):
    plain = fit_state([], module_cls=module_cls)
    full, columns = TangentMapMonitor(), TangentMapMonitor(num_columns=4, log_prefix="tk/")
    watched = fit_state([full, columns], module_cls=module_cls)
    for key in plain[0]:
        assert torch.equal(plain[0][key], watched[0][key]), key
    assert all(torch.equal(a, b) for a, b in zip(plain[1], watched[1]))
    assert torch.equal(plain[2], watched[2])
    assert torch.equal(plain[3], watched[3])
    assert_same_training(plain, watched)  # with MetricModule: the metric's state and update count too
    if module_cls is MetricModule:
        assert plain[4]["train_acc"][1] == 6
    assert full.lyapunov.num_steps == columns.lyapunov.num_steps == 6


def test_resume_logs_what_the_uninterrupted_run_logs(tmp_path):
    def fit(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        logger = MemoryLogger()
        callbacks = [
            TangentMapMonitor(),
            TangentMapMonitor(num_columns=3, log_prefix="chaos/k_"),
            ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"),
        ]
        tr = trainer(callbacks, logger=logger, max_steps=-1, max_epochs=2, enable_checkpointing=True)
        tr.fit(TinyModule(), loader(shuffle=False), ckpt_path=ckpt_path)
        return logger.chaos()

    full = fit()
    resumed = fit(ckpt_path=tmp_path / "epoch=0.ckpt")
    assert resumed["chaos/tangent_steps"] == {4: 5.0, 5: 6.0, 6: 7.0, 7: 8.0}
    assert set(resumed["chaos/k_mlce"]) == {4, 5, 6, 7}
    for key, values in resumed.items():
        for step, value in values.items():
            assert full[key][step] == value, (key, step)


def test_nan_steps_are_left_out_of_the_product_and_never_logged():
    monitor = TangentMapMonitor()
    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    trainer([monitor], logger=logger, max_steps=8).fit(Exploding(), loader())
    chaos = logger.chaos()
    assert 0 < monitor.skipped_steps < 8
    assert chaos["chaos/tangent_skipped"][7] == monitor.skipped_steps
    assert monitor.lyapunov.num_steps + monitor.skipped_steps == 8
    assert all(math.isfinite(v) for values in chaos.values() for v in values.values())


class AdamModule(TinyModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


@pytest.mark.parametrize(
    "module, kwargs, match",
    [
        (AdamModule(), {}, "Adam"),
        (TinyModule(), {"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
        (TinyModule(), {"gradient_clip_val": 1.0}, "clipping"),
    ],
)
def test_updates_that_are_not_the_sgd_map_are_refused(module, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        trainer([TangentMapMonitor()], max_steps=1, **kwargs).fit(module, loader())


@pytest.mark.parametrize(
    "kwargs",
    [{"num_columns": 0}, {"max_full_params": 0}, {"num_exponents": 0}, {"lanczos_steps": 1}],
)
def test_bad_arguments_name_the_argument(kwargs):
    with pytest.raises(MisconfigurationException, match=f"`{next(iter(kwargs))}`"):
        TangentMapMonitor(**kwargs)
