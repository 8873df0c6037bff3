"""The ``lightning-chaos`` CLI and every YAML config in ``examples/``.

The config runs are one ``fast_dev_run`` step each, with an override file composed after the configs (as
a user would): the curvature warm-up capped at one iteration (a ResNet-18 gradient costs up to seconds on
a busy 2-core CPU), and, for configs that download (CIFAR-10), ``SyntheticDataModule`` data of the
configured datamodule's shape and class count. The quasi-Newton training test runs its config unchanged.
"""

import importlib
import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import charts, layouts, matching

from lightning_chaos import HessianEigenvalueMonitor, InverseCurvatureLR
from lightning_chaos.cli import ChaosCLI, main
from lightning_chaos.dashboards import (
    CONVERGED,
    COUNTERS,
    DELTA_Q,
    EIGENVALUES,
    INVERSE_CURVATURE,
    LAMBDA,
    LOSS,
    PROBE,
)
from lightning_chaos.data import DigitsDataModule
from lightning_chaos.plot import read_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
BASES = [p for p in CONFIGS if "class_path" in yaml.safe_load(p.read_text()).get("model", {})]
MIXINS = [p for p in CONFIGS if p not in BASES]
EMBEDDED = ("lightning_chaos.data.DigitsDataModule", "lightning_chaos.data.SyntheticDataModule")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
FAST_DEV_RUN = ["--trainer.fast_dev_run", "true", *QUIET]

pytestmark = [
    pytest.mark.usefixtures("no_network"),
    pytest.mark.filterwarnings("ignore:.*(LeafSpec|litlogger|litmodels).*"),
    pytest.mark.filterwarnings("ignore:.*args parameter is intended to run from within Python.*"),
]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Default log directories (chaos_logs/, lightning_logs/) land in tmp_path."""
    monkeypatch.chdir(tmp_path)


def load(class_path):
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def fast(configs, tmp_path):
    """``--config`` arguments for ``configs`` plus an override: warm-up capped, no dense spectra of the
    larger paper models (CGD by Lanczos, random twins only), no download."""
    data, callbacks, optimizer = None, [], None
    for config in configs:  # what the composition resolves to: the last config that sets a key wins
        cfg = yaml.safe_load(config.read_text())
        data = cfg.get("data", data)
        callbacks = cfg.get("trainer", {}).get("callbacks", callbacks)
        optimizer = cfg.get("optimizer", optimizer)
    capped = []
    for entry in callbacks:
        entry = {"init_args": {}, **entry}
        if "warmup_iters" in inspect.signature(load(entry["class_path"])).parameters:
            entry["init_args"] = {**entry["init_args"], "warmup_iters": 1}
        if entry["class_path"].endswith("TrajectoryDivergence"):  # exact spectra are tested on tiny models
            entry["init_args"] = {**entry["init_args"], "directions": ["random"]}
        capped.append(entry)
    override = {"trainer": {"callbacks": capped}}
    if optimizer is not None and optimizer["class_path"].endswith("CGD"):  # a 2-pair Lanczos, not N HVPs
        override["optimizer"] = {
            **optimizer,
            "init_args": {**optimizer["init_args"], "method": "lanczos", "k": 2},
        }
    if data["class_path"] not in EMBEDDED:
        datamodule = load(data["class_path"])(**data.get("init_args", {}))  # constructing never downloads
        override["data"] = {
            "class_path": "lightning_chaos.data.SyntheticDataModule",
            "init_args": {
                "input_shape": list(datamodule.input_shape),
                "num_classes": datamodule.num_classes,
                "num_samples": 4,
                "num_val_samples": 2,
                "batch_size": 2,
            },
        }
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(override))
    return [arg for config in [*configs, path] for arg in ("--config", str(config))]


def test_examples_are_all_covered():
    names = {p.name for p in CONFIGS}
    assert {"digits_mlp_fixed_lr.yaml", "digits_mlp_cyclic_lr.yaml", "digits_mlp_quasi_newton.yaml"} <= names
    assert {
        "cifar2_linear_mse.yaml",
        "cifar2_mlp.yaml",
        "cifar2_lenet1.yaml",
        "cifar2_small_resnet.yaml",
    } <= names
    assert {"cifar10_resnet18.yaml", "mse.yaml", "cyclic_lr.yaml", "quasi_newton.yaml"} <= names
    assert len(MIXINS) == 3  # every other config is a complete run, each run below


@pytest.mark.parametrize("config", BASES, ids=lambda p: p.stem)
def test_example_config_runs(config, tmp_path):
    main(["fit", *fast([config], tmp_path), *FAST_DEV_RUN])


@pytest.mark.parametrize("mixin", MIXINS, ids=lambda p: p.stem)
def test_mixin_composes_with_a_cifar_config(mixin, tmp_path):
    base = EXAMPLES / "cifar2_lenet1.yaml"
    main(["fit", *fast([base, mixin], tmp_path), *FAST_DEV_RUN])
    cli = ChaosCLI(args=["--config", str(base), "--config", str(mixin)], run=False)
    expected = {
        "mse": lambda: cli.model.hparams.loss == "mse",
        "cyclic_lr": lambda: cli.model.hparams.lr_schedule == "cyclic",
        "quasi_newton": lambda: (
            [type(c) for c in cli.trainer.callbacks if "chaos" in type(c).__module__] == [InverseCurvatureLR]
        ),
    }
    assert expected[mixin.stem]()
    assert isinstance(cli.model.net, load("lightning_chaos.models.LeNet1"))


def test_validate_and_test_subcommands_and_the_defaults():
    for subcommand in ("validate", "test"):
        main([subcommand, "--config", str(EXAMPLES / "digits_mlp_fixed_lr.yaml"), *FAST_DEV_RUN])
    cli = ChaosCLI(args=["fit", *FAST_DEV_RUN])  # no config: digits MLP
    assert isinstance(cli.datamodule, DigitsDataModule) and cli.model.num_classes == 10


@pytest.mark.parametrize(
    "config",
    [p for p in CONFIGS if "max_steps" in yaml.safe_load(p.read_text()).get("trainer", {})],
    ids=lambda p: p.stem,
)
def test_a_configs_max_steps_is_not_cut_short_by_an_epoch_limit(config):
    steps = yaml.safe_load(config.read_text())["trainer"]["max_steps"]
    cli = ChaosCLI(args=["--config", str(config)], run=False)
    assert cli.trainer.max_steps == steps and cli.trainer.max_epochs == -1


def test_the_default_epoch_limit_applies_only_to_an_otherwise_unlimited_run():
    assert ChaosCLI(args=[], run=False).trainer.max_epochs == 20  # `lightning-chaos fit` alone is finite
    assert ChaosCLI(args=["--trainer.max_time", "00:00:01:00"], run=False).trainer.max_epochs == -1
    both = ChaosCLI(args=["--trainer.max_steps", "600", "--trainer.max_epochs", "3"], run=False).trainer
    assert (both.max_steps, both.max_epochs) == (600, 3)  # what the user set is kept


def test_print_config_round_trips(tmp_path, capsys):
    config = EXAMPLES / "digits_mlp_quasi_newton.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["class_path"] == "lightning_chaos.models.Classifier"
    assert resolved["model"]["init_args"]["net"]["init_args"]["hidden"] == [64, 64, 64]
    assert resolved["trainer"]["callbacks"][0]["init_args"]["scale"] == 1.0
    assert resolved["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    (tmp_path / "printed.yaml").write_text(printed)
    main(["fit", *fast([tmp_path / "printed.yaml"], tmp_path), *FAST_DEV_RUN])


@pytest.mark.parametrize(
    "args, key, listed",
    [
        (["--model", "lightning_chaos.models.Nope"], "model", "lightning_chaos.models.Classifier"),
        (["--model", "lightning_chaos.models.MLP"], "model", "lightning_chaos.models.Classifier"),
        (["--model.init_args.net", "lightning_chaos.models.Nope"], "model", "lightning_chaos.models.MLP"),
        (["--data", "lightning_chaos.data.Nope"], "data", "lightning_chaos.data.DigitsDataModule"),
        (
            ["--trainer.callbacks+=lightning_chaos.Nope"],
            "trainer.callbacks",
            "lightning_chaos.InverseCurvatureLR",
        ),
    ],
)
def test_bad_class_path_is_a_clear_error(args, key, listed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    given = args[-1].split("=")[-1]
    assert f'Parser key "{key}"' in err and given in err, err
    assert "Classes of lightning_chaos that a config can name" in err and listed in err


def test_num_classes_comes_from_the_datamodule():
    two = ["--data.init_args.classes", "[3, 5]"]
    cli = ChaosCLI(args=[*two, "--model.init_args.net.init_args.out_features", "2"], run=False)
    assert cli.datamodule.num_classes == 2 and cli.model.num_classes == 2
    with pytest.raises(ValueError, match=r"expected \(batch, 2\)"):  # 10 outputs for 2 classes
        main(["fit", *two, *FAST_DEV_RUN])


def test_num_classes_cannot_be_set_by_hand(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.init_args.num_classes", "3"])
    assert "num_classes=3 cannot be set: it is taken from the datamodule" in capsys.readouterr().err


def test_checkpoint_of_a_fit_validates_tests_and_resumes(tmp_path):
    """The documented commands with ``--ckpt_path``: the checkpoint's saved ``num_classes`` is accepted."""
    config = fast([EXAMPLES / "digits_mlp_fixed_lr.yaml"], tmp_path)
    main(["fit", *config, "--trainer.max_steps", "3", *QUIET])
    [ckpt] = tmp_path.glob("chaos_logs/digits_mlp_fixed_lr/version_0/checkpoints/*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["num_classes"] == 10 and saved["global_step"] == 3
    for subcommand, logged in [("validate", "val/acc"), ("test", "test/acc")]:
        cli = ChaosCLI(args=[subcommand, *config, "--ckpt_path", str(ckpt), *QUIET])
        assert logged in cli.trainer.callback_metrics
        for name, value in cli.model.state_dict().items():
            assert torch.equal(value, saved["state_dict"][name]), name  # the checkpoint's weights
    resumed = ChaosCLI(args=["fit", *config, "--ckpt_path", str(ckpt), "--trainer.max_steps", "5", *QUIET])
    assert resumed.trainer.global_step == 5
    steps, _ = read_scalars(resumed.trainer.logger.log_dir)["train/loss_step"]
    assert steps == [3, 4]  # continued from the checkpoint's step, not from scratch
    with pytest.raises(SystemExit):  # a hand-set value is still refused, with or without a checkpoint
        main(["validate", *config, "--ckpt_path", str(ckpt), "--model.init_args.num_classes", "10"])
    with pytest.raises(ValueError, match=r"expected \(batch, 2\)"):  # the link wins over the checkpoint
        main(["validate", *config, "--ckpt_path", str(ckpt), "--data.init_args.classes", "[3, 5]", *QUIET])


def test_quasi_newton_config_trains_on_digits_and_writes_the_dashboard(tmp_path):
    """No lr given: InverseCurvatureLR sets it from step 0. Loss falls, accuracy far above chance."""
    cli = ChaosCLI(
        args=[
            "fit",
            "--config",
            str(EXAMPLES / "digits_mlp_quasi_newton.yaml"),
            "--trainer.max_epochs",
            "3",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs"),
            "--trainer.enable_checkpointing",
            "false",
            *QUIET,
        ]
    )
    logdir = Path(cli.trainer.logger.log_dir)
    assert (logdir / "config.yaml").is_file()
    series = read_scalars(logdir)
    steps, lrs = series["chaos/lr"]
    assert steps[0] == 0 and len(steps) == 3 * 12  # the very first update already used 1/h0
    assert lrs[0] == pytest.approx(1 / series["chaos/h0"][1][0], rel=1e-5) and lrs[0] != cli.model.hparams.lr
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lrs[-1])
    assert all(math.isfinite(v) and v > 0 for v in lrs)
    first, losses = series["train/loss_step"][1][0], series["train/loss_epoch"][1]
    assert first == pytest.approx(math.log(10), rel=0.1)  # untrained
    assert losses[-1] < losses[0] and losses[-1] < 0.4 * first
    assert series["val/acc"][1][-1] > 0.7  # chance is 0.1

    [layout] = layouts(logdir)  # the dashboard, from the event files
    written = charts(layout)
    tags = set(series)
    assert {"train/loss_step", "train/loss_epoch", "val/loss"} <= matching(written["training"][LOSS], tags)
    curvature = written["lightning_chaos: chaos/"]  # the charts of the monitor InverseCurvatureLR owns
    assert list(curvature) == [LAMBDA, INVERSE_CURVATURE, EIGENVALUES, PROBE, CONVERGED, COUNTERS, DELTA_Q]
    assert matching(curvature[CONVERGED], tags) == {"chaos/h0_converged"}
    assert matching(curvature[INVERSE_CURVATURE], tags) == {"chaos/inv_h0", "chaos/beta", "chaos/lr"}
    assert {"chaos/h0", "chaos/h0_lyapunov", "chaos/h0_ema"} <= matching(curvature[EIGENVALUES], tags)
    owned = cli.trainer.callbacks[[type(c) for c in cli.trainer.callbacks].index(InverseCurvatureLR)]
    assert isinstance(owned.monitor, HessianEigenvalueMonitor) and owned.monitor.warmup_iterations > 0
    assert torch.isfinite(torch.tensor(series["chaos/inv_h0"][1])).all()
