"""CGD against the explicit projection of the base update; its Lightning, scheduler and checkpoint wiring."""

import copy
import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyModule, loader, trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from torch import nn

from lightning_chaos import CGD, CGDCurvature, TrajectoryDivergence
from lightning_chaos.callbacks import _step
from lightning_chaos.callbacks._step import StepProbe
from lightning_chaos.core.probe import FunctionalLoss

F64 = torch.float64
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tanh_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def batch(seed=1, n=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen)


def loss_of(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def cgd_step(opt, net, x, y):
    """One plain-PyTorch CGD step on the batch (x, y): backward, curvature, step."""
    opt.zero_grad()
    loss_of(net, x, y).backward()
    opt.set_curvature(FunctionalLoss(net, lambda: loss_of(net, x, y)))
    opt.step()


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


# ----------------------------------------------------------------------------------------------------------
# Lightning


class CGDModule(TinyModule):
    def __init__(self, strategy="chaotic", scheduler=False, every_n_steps=1, **kwargs):
        super().__init__(**kwargs)
        self.strategy, self.scheduler, self.every_n_steps = strategy, scheduler, every_n_steps

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        opt = CGD(base, strategy=self.strategy, every_n_steps=self.every_n_steps)
        if not self.scheduler:
            return opt
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CountDense(Callback):
    """Another chaos callback that needs the step's eigendecomposition (as LyapunovSpectrumMonitor does)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _step.record_batch(trainer, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        StepProbe.current(trainer, pl_module).eigh()


def test_lightning_cgd_matches_the_plain_loop_and_shares_the_eigendecomposition(monkeypatch):
    calls = []
    original = _step.HessianOperator.to_dense
    monkeypatch.setattr(
        _step.HessianOperator, "to_dense", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    pl.seed_everything(0, verbose=False)
    module = CGDModule(lr=2.0, momentum=0.5, scheduler=True, curvature_loss=True)
    initial = copy.deepcopy(module.net)
    logger = MemoryLogger()
    trainer([CountDense(), CGDCurvature(), LearningRateMonitor()], logger=logger, max_steps=4).fit(
        module, loader(shuffle=False)
    )
    assert len(calls) == 4  # one dense Hessian per step for both callbacks and CGD
    removed = logger.metrics["chaos/cgd_removed"]
    assert sorted(removed) == [0, 1, 2, 3] and min(removed.values()) > 0
    assert all(0 < r < 1 for r in logger.metrics["chaos/cgd_update_ratio"].values())
    assert list(logger.metrics["lr-SGD"].values()) == [2.0, 2.0, 1.0, 1.0]  # StepLR acts through the base
    # the same four steps (one epoch) in a plain loop
    net = initial
    opt = CGD(torch.optim.SGD(net.parameters(), lr=2.0, momentum=0.5), strategy="chaotic")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in loader(shuffle=False):
        cgd_step(opt, net, x, y)
        sched.step()
    for p, q in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_lightning_without_the_callback_or_without_cgd_says_what_to_add():
    with pytest.raises(RuntimeError, match="CGDCurvature"):
        trainer([], max_steps=1).fit(CGDModule(), loader())
    with pytest.warns(UserWarning, match="no CGD optimizer"):
        trainer([CGDCurvature()], max_steps=1).fit(TinyModule(), loader())


def test_lightning_resume_is_exact(tmp_path):
    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        logger = MemoryLogger()
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        module = CGDModule(strategy="negative", every_n_steps=3, lr=0.5, momentum=0.9)
        tr = trainer(
            [CGDCurvature(), ckpt], logger=logger, max_steps=-1, max_epochs=2, enable_checkpointing=True
        )
        tr.fit(module, loader(shuffle=False), ckpt_path=ckpt_path)
        return logger.chaos(), module

    full, full_module = run()
    resumed, resumed_module = run(ckpt_path=tmp_path / "epoch=0.ckpt")
    assert set(resumed["chaos/cgd_removed"]) == {4, 5, 6, 7}
    for key, values in resumed.items():
        for step, value in values.items():
            assert full[key][step] == value, (key, step)
    for p, q in zip(full_module.parameters(), resumed_module.parameters()):
        assert torch.equal(p, q)


INPUT_SHAPES = {"digits": "[64]", "usps": "[1, 16, 16]", "fashionmnist": "[1, 28, 28]"}


def cli(configs, tmp_path, *extra):
    """LightningCLI over the given YAML configs with the data replaced by synthetic tensors (no download)."""
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_chaos.models import Classifier

    shape = INPUT_SHAPES[configs[0].name.split("_")[0]]
    args = [arg for config in configs for arg in ("--config", str(config))]
    args += ["--data", "lightning_chaos.data.SyntheticDataModule", "--data.init_args.input_shape", shape]
    args += ["--data.init_args.num_classes", "10", "--data.init_args.num_samples", "128"]
    args += ["--model.init_args.num_classes", "10"]  # what lightning-chaos's CLI links from the data
    args += [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    args += list(extra)
    return LightningCLI(
        Classifier,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=args,
    )


def test_yaml_configs_instantiate_with_lightning_cli(tmp_path):
    configs = sorted(EXAMPLES.glob("*_cgd*.yaml"))
    assert {c.name.split("_")[0] for c in configs} == set(INPUT_SHAPES)
    for config in configs:
        built = cli([config], tmp_path)
        names = {type(c).__name__ for c in built.trainer.callbacks}
        if "divergence" in config.name:
            assert {"CGDCurvature", "TrajectoryDivergence"} <= names, config.name
        else:
            assert "CGDCurvature" in names and isinstance(built.model.configure_optimizers(), CGD), (
                config.name
            )
    # the digits pair composed: CGD from the first file, the twins from the second
    built = cli([EXAMPLES / "digits_mlp_cgd.yaml", EXAMPLES / "digits_mlp_cgd_divergence.yaml"], tmp_path)
    assert isinstance(built.model.configure_optimizers(), CGD)
    assert any(isinstance(c, TrajectoryDivergence) for c in built.trainer.callbacks)
    # the digits CGD config trains (two steps, strategy overridden from the command line)
    built = cli(
        [EXAMPLES / "digits_mlp_cgd.yaml"],
        tmp_path,
        "--trainer.max_steps",
        "2",
        "--optimizer.init_args.strategy",
        "negative",
    )
    built.trainer.fit(built.model, built.datamodule)
    optimizer = built.trainer.optimizers[0]
    assert isinstance(optimizer, CGD) and optimizer.strategy == "negative" and optimizer.num_steps == 2
