"""What every probing callback shares (callbacks._base): one instance per log_prefix, skipped steps."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    AttentionModule,
    CustomFunctionModule,
    MemoryLogger,
    OnceTanh,
    RaisingTanh,
    Skipping,
    TinyModule,
    cgd_step,
    loader,
    trainer,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_chaos import (
    CGD,
    CGDCurvature,
    LyapunovSpectrumMonitor,
    TangentMapMonitor,
    TrajectoryDivergence,
)

PROBES = {
    "LyapunovSpectrumMonitor": lambda **kw: LyapunovSpectrumMonitor(every_n_steps=1, **kw),
    "TangentMapMonitor": lambda **kw: TangentMapMonitor(**kw),
    "TrajectoryDivergence": lambda **kw: TrajectoryDivergence(directions=["random"], init_samples=0, **kw),
    "CGDCurvature": lambda **kw: CGDCurvature(**kw),
}
OTHER_SETTINGS = {
    "LyapunovSpectrumMonitor": {"method": "lanczos"},
    "TangentMapMonitor": {"num_columns": 3},
    "TrajectoryDivergence": {"epsilon": 0.5},
    "CGDCurvature": {},
}


class CGDTiny(TinyModule):
    def configure_optimizers(self):
        return CGD(
            torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum), strategy="negative"
        )


@pytest.mark.parametrize("name", PROBES)
@pytest.mark.parametrize("other", [False, True], ids=["identical", "other_settings"])
def test_two_instances_with_one_log_prefix_are_refused_at_fit(name, other):
    make = PROBES[name]
    first, second = make(), make(**(OTHER_SETTINGS[name] if other else {}))
    assert first.log_prefix == second.log_prefix == "chaos/"
    module = CGDTiny() if name == "CGDCurvature" else TinyModule()
    tr = trainer([first, second], max_steps=1)  # building the Trainer is fine: the error comes from fit
    with pytest.raises(
        MisconfigurationException, match=f"2 {name} callbacks share log_prefix='chaos/'.*`log_prefix`"
    ):
        tr.fit(module, loader())


def test_state_keys_name_the_class_and_the_log_prefix():
    a, b = LyapunovSpectrumMonitor(), LyapunovSpectrumMonitor(log_prefix="b/")
    other = TangentMapMonitor()  # another class may share the prefix
    trainer([a, b, other], max_steps=1).fit(TinyModule(), loader())
    assert a.state_key == "LyapunovSpectrumMonitor{'log_prefix': 'chaos/'}"
    assert b.state_key == "LyapunovSpectrumMonitor{'log_prefix': 'b/'}"
    assert other.state_key == "TangentMapMonitor{'log_prefix': 'chaos/'}"


# ------------------------------------------------------------------ training_step returning None

SKIPPED = (1, 2)  # batch indices of the first epoch (4 batches) whose training_step returns None
STEPS = 6  # steps 0-5; steps 1, 2 and 5 (batch 1 of epoch 2) are skipped


def fit_skipping(callback, curvature_loss, module_cls=Skipping):
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    module = module_cls(skip=SKIPPED, curvature_loss=curvature_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([callback], logger=logger, max_steps=STEPS).fit(module, loader(shuffle=False))
    ours = [w for w in caught if type(callback).__name__ in str(w.message)]
    return logger.chaos(), module, ours


def computed_steps(logged, counters):
    return {step for key, values in logged.items() if key not in counters for step in values}


SKIPPED_STEPS = {1, 2, 5}


@pytest.mark.parametrize("curvature_loss", [False, True], ids=["training_step", "curvature_loss"])
def test_lyapunov_spectrum_monitor_skips_and_counts_steps_without_a_loss(curvature_loss):
    monitor = LyapunovSpectrumMonitor(every_n_steps=1)
    logged, _, ours = fit_skipping(monitor, curvature_loss)
    assert monitor.skipped_steps == 3
    assert computed_steps(logged, {"chaos/spectrum_skipped"}) == {0, 3, 4}
    assert logged["chaos/spectrum_skipped"] == {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}
    assert len(ours) == 1 and "NoLossError" in str(ours[0].message)
    assert all(math.isfinite(v) for values in logged.values() for v in values.values())


@pytest.mark.parametrize("curvature_loss", [False, True], ids=["training_step", "curvature_loss"])
def test_tangent_map_monitor_leaves_steps_without_a_loss_out_of_the_product(curvature_loss):
    # the update of a skipped batch is the identity, not I − γH: the product is that of the other steps
    monitor = TangentMapMonitor()
    logged, _, ours = fit_skipping(monitor, curvature_loss)
    assert monitor.skipped_steps == 3 and monitor.lyapunov.num_steps == 3
    assert computed_steps(logged, {"chaos/tangent_steps", "chaos/tangent_skipped"}) == {0, 3, 4}
    assert logged["chaos/tangent_skipped"] == {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}
    assert logged["chaos/tangent_steps"] == {0: 1, 1: 1, 2: 1, 3: 2, 4: 3, 5: 3}
    assert len(ours) == 1


@pytest.mark.parametrize("curvature_loss", [False, True], ids=["training_step", "curvature_loss"])
def test_trajectory_divergence_takes_no_twin_step_where_the_run_took_none(curvature_loss):
    div = TrajectoryDivergence(directions=["random", "max_chaotic"], init_samples=0)
    logged, _, ours = fit_skipping(div, curvature_loss)
    assert div.skipped_steps == 3 and len(ours) == 1
    # d(t) after t real updates: three of them, logged at the steps that had a loss, plus the final one
    assert all(len(d) == 4 for d in div.distances.values())
    assert set(logged["chaos/divergence/random"]) == {0, 3, 4, 6}
    assert div.results["num_steps"] == 3
    # the twins replayed exactly the main run's updates: each is the run started from θ0 + εu
    for name, (twin, _) in div._twins.items():
        start = div.perturbations[name]
        pl.seed_everything(0, verbose=False)
        separate = Skipping(skip=SKIPPED, curvature_loss=curvature_loss)
        with torch.no_grad():
            offset = 0
            for p in separate.parameters():
                p.add_((div.epsilon * start[offset : offset + p.numel()]).reshape(p.shape).to(p.dtype))
                offset += p.numel()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer([], max_steps=STEPS).fit(separate, loader(shuffle=False))
        twin_theta = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
        separate_theta = torch.cat([p.detach().reshape(-1) for p in separate.parameters()])
        torch.testing.assert_close(twin_theta, separate_theta, rtol=0, atol=1e-6)


class SkippingCGD(Skipping):
    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return CGD(base, strategy="negative")


@pytest.mark.parametrize("curvature_loss", [False, True], ids=["training_step", "curvature_loss"])
def test_cgd_takes_no_step_where_lightning_skipped_the_batch(curvature_loss):
    # Lightning still calls optimizer.step (its closure returns None and computes no gradient): CGD then
    # steps nothing, projects nothing (not even the momentum buffer) and does not count the step.
    logged, module, _ = fit_skipping(CGDCurvature(), curvature_loss, SkippingCGD)
    optimizer = module.trainer.optimizers[0]
    assert optimizer.num_steps == 3
    assert set(logged["chaos/cgd_removed"]) == {0, 3, 4}
    assert all(math.isfinite(v) for values in logged.values() for v in values.values())
    # the same as a plain CGD loop over the batches that have a loss (epoch 1: 0 and 3; epoch 2: 0)
    pl.seed_everything(0, verbose=False)
    net = Skipping().net
    plain = CGD(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), strategy="negative")
    batches = list(loader(shuffle=False))
    for x, y in (batches[0], batches[3], batches[0]):
        cgd_step(plain, net, x, y)
    for p, q in zip(module.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            optimizer.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"], rtol=0, atol=1e-6
        )


# ------------------------------------------------------------------ models without double backward


class RecordLLEMax(Callback):
    """Largest plain-SGD LLE of each step's batch Hessian, by torch.func.hessian under the math kernel."""

    def __init__(self, lr):
        self.lr, self.values = lr, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        names = [n for n, _ in pl_module.named_parameters()]
        like = [p.detach() for p in pl_module.parameters()]

        def flat_loss(flat):
            pieces = torch.split(flat, [p.numel() for p in like])
            params = {n: t.reshape(p.shape) for n, t, p in zip(names, pieces, like, strict=True)}
            return torch.func.functional_call(pl_module, params, (self.batch,), strict=False)

        theta = torch.cat([p.reshape(-1) for p in like])
        with sdpa_kernel(SDPBackend.MATH):
            h = torch.linalg.eigvalsh(torch.func.hessian(flat_loss)(theta).double())
        self.values.append(float(torch.log((1 - self.lr * h).abs()).max()))


class AttentionForward(AttentionModule):
    def forward(self, batch):  # the loss as forward, for functional_call in RecordLLEMax
        return self._loss(batch)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LyapunovSpectrumMonitor(every_n_steps=1),
        lambda: LyapunovSpectrumMonitor(every_n_steps=1, method="lanczos", slq_steps=20),
        lambda: TangentMapMonitor(),
        lambda: TangentMapMonitor(num_columns=3),
    ],
    ids=["spectrum_exact", "spectrum_lanczos", "tangent_full", "tangent_columns"],
)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_monitors_run_through_fused_attention_in_training_mode(make, dropout):
    monitor = make()
    record = RecordLLEMax(lr=0.1)
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    module = AttentionForward(dropout=dropout, momentum=0.0)
    callbacks = [monitor, record] if dropout == 0 else [monitor]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks, logger=logger, max_steps=3).fit(module, loader())
    assert module.training and monitor.skipped_steps == 0
    assert not [w for w in caught if "lightning_chaos" in w.filename], [str(w.message) for w in caught]
    logged = logger.chaos()
    key = "chaos/lle_max" if isinstance(monitor, LyapunovSpectrumMonitor) else "chaos/mlce"
    assert set(logged[key]) == {0, 1, 2}
    assert all(math.isfinite(v) for values in logged.values() for v in values.values())
    if dropout == 0 and key == "chaos/lle_max" and monitor.method == "exact":
        assert len(record.values) == 3
        for step, expected in enumerate(record.values):  # the exact spectrum of the step's batch
            assert logged[key][step] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("function", [RaisingTanh, OnceTanh], ids=["raising", "once_differentiable"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: LyapunovSpectrumMonitor(every_n_steps=1),
        lambda: LyapunovSpectrumMonitor(every_n_steps=1, method="lanczos", slq_steps=20),
        lambda: TangentMapMonitor(),
    ],
    ids=["spectrum_exact", "spectrum_lanczos", "tangent"],
)
def test_a_custom_function_without_double_backward_skips_counted_steps_with_one_warning(make, function):
    monitor = make()
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([monitor], logger=logger, max_steps=3).fit(CustomFunctionModule(function), loader())
    ours = [
        str(w.message) for w in caught if "lightning_chaos" in w.filename or "skipped step" in str(w.message)
    ]
    assert len(ours) == 1 and "SecondOrderError" in ours[0], ours
    assert monitor.skipped_steps == 3
    counters = {"chaos/spectrum_skipped", "chaos/tangent_steps", "chaos/tangent_skipped"}
    assert set(logger.chaos()) <= counters  # nothing but the counters is logged
    skipped = (
        "chaos/spectrum_skipped" if "chaos/spectrum_skipped" in logger.chaos() else "chaos/tangent_skipped"
    )
    assert logger.chaos()[skipped] == {0: 1, 1: 2, 2: 3}
