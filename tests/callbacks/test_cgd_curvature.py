"""CGDCurvature: CGD in Lightning is the plain loop, shares the eigendecomposition of the step, resumes."""

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    MemoryLogger,
    MetricModule,
    TinyModule,
    assert_same_training,
    cgd_step,
    fit_state,
    loader,
    trainer,
)
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from lightning_chaos import CGD, CGDCurvature, TrajectoryDivergence
from lightning_chaos.callbacks._batch import record_batch, step_curvature
from lightning_chaos.core.operators import HessianOperator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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
        record_batch(trainer, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step_curvature(trainer, pl_module).eigh()


def test_lightning_cgd_matches_the_plain_loop_and_shares_the_eigendecomposition(monkeypatch):
    calls = []
    original = HessianOperator.to_dense
    monkeypatch.setattr(HessianOperator, "to_dense", lambda *a, **k: calls.append(1) or original(*a, **k))
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


class CGDMetricModule(MetricModule):
    def configure_optimizers(self):
        return CGD(torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum), strategy="chaotic")


def test_probing_training_step_leaves_a_torchmetrics_metric_as_training_left_it():
    # CGD cannot run without CGDCurvature: the reference is the same run whose probe is curvature_loss
    # (the same loss, never touching the metric); probing training_step must give the bit-identical run,
    # metric state and update count included
    reference = fit_state([CGDCurvature()], module_cls=CGDMetricModule, curvature_loss=True)
    watched = fit_state([CGDCurvature()], module_cls=CGDMetricModule, curvature_loss=False)
    assert_same_training(reference, watched)
    assert watched[4]["train_acc"][1] == 6  # one update per training step, none per probe evaluation
    assert any(not torch.equal(a, b) for a, b in zip(reference[1], fit_state([], module_cls=MetricModule)[1]))


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
