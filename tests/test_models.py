import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_chaos.data import DigitsDataModule
from lightning_chaos.models import MLP, Classifier, LeNet1, LinearModel, ResNet18, SmallCNN, SmallResNet

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning")


def trainer(**kwargs):
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def digits_batch(n=32, flatten=True):
    dm = DigitsDataModule(batch_size=n, flatten=flatten, shuffle=False)
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(
    "make, shape, out",
    [
        (lambda: MLP(), (4, 64), 10),
        (lambda: MLP(), (4, 1, 8, 8), 10),
        (lambda: MLP(784, (20,), 10, activation="tanh", dropout=0.1, batchnorm=True), (4, 1, 28, 28), 10),
        (lambda: MLP(3072, (32, 32, 32), 2, activation="sigmoid", bias=False), (4, 3, 32, 32), 2),
        (lambda: MLP(64, (), 10, activation="softplus"), (4, 64), 10),
        (lambda: MLP(64, (8,), 10, activation="gelu"), (4, 64), 10),
        (lambda: LinearModel(3072, 1), (4, 3, 32, 32), 1),
        (lambda: SmallCNN(), (4, 1, 8, 8), 10),
        (lambda: SmallCNN(1, 10, batchnorm=True), (4, 1, 28, 28), 10),
        (lambda: SmallCNN(3, 2, channels=(4, 8, 8), activation="tanh"), (4, 3, 32, 32), 2),
        (lambda: SmallCNN(1), (4, 1, 16, 16), 10),
        (lambda: LeNet1(1), (4, 1, 28, 28), 10),
        (lambda: LeNet1(3, 2), (4, 3, 32, 32), 2),
        (lambda: LeNet1(1, padding=2), (4, 1, 16, 16), 10),
        (lambda: LeNet1(1), (4, 1, 16, 16), 10),
        (lambda: LeNet1(1, padding=2, activation="tanh"), (4, 1, 8, 8), 10),
        (lambda: SmallResNet(), (4, 3, 32, 32), 10),
        (lambda: SmallResNet(1, 10, width=4, batchnorm=False), (4, 1, 8, 8), 10),
        (lambda: SmallResNet(1, 10, width=8), (4, 1, 28, 28), 10),
        (lambda: ResNet18(3, 10, width=8), (4, 3, 32, 32), 10),
    ],
)
def test_shapes_forward_backward(make, shape, out):
    torch.manual_seed(0)
    net = make()
    y = net(torch.randn(shape))
    assert y.shape == (shape[0], out)
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_reference_sizes():
    def count(net):
        return sum(p.numel() for p in net.parameters())

    net = ResNet18()
    assert count(net) == 11_173_962  # the CIFAR ResNet-18 with 10 classes
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # LeNet-1 on 28x28: conv 1->4 (5x5), conv 4->12 (5x5), 12*4*4 -> 10
    assert count(LeNet1()) == (25 * 4 + 4) + (4 * 12 * 25 + 12) + (192 * 10 + 10)
    assert count(SmallCNN()) < 3000  # small enough for exact Hessians on CPU
    assert count(MLP(784, (20,), 10)) == 784 * 20 + 20 + 20 * 10 + 10
    feats = LeNet1().features(torch.randn(1, 1, 28, 28))
    assert feats.shape == (1, 12, 4, 4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MLP(activation="swish"), "activation must be one of"),
        (lambda: MLP(hidden=(16, 0)), r"hidden\[1\]"),
        (lambda: MLP(in_features=0), "in_features"),
        (lambda: MLP(dropout=1.0), "dropout"),
        (lambda: MLP(dropout=-0.1), "dropout"),
        (lambda: LinearModel(64, 0), "out_features"),
        (lambda: SmallCNN(channels=()), "channels"),
        (lambda: SmallCNN(channels=(8, -1)), r"channels\[1\]"),
        (lambda: SmallCNN(activation="elu"), "activation"),
        (lambda: LeNet1(padding=-1), "padding"),
        (lambda: LeNet1(num_classes=0), "num_classes"),
        (lambda: LeNet1(activation="Relu"), "activation"),
        (lambda: SmallResNet(width=0), "width"),
        (lambda: ResNet18(in_channels=2.5), "in_channels"),
    ],
)
def test_net_argument_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mlp_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="expects 64 features"):
        MLP()(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="hinge"), "loss must be one of"),
        (dict(lr_schedule="step"), "lr_schedule must be one of"),
        (dict(lr=-0.1), "lr must be"),
        (dict(momentum=-0.5), "momentum"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(nesterov=True), "nesterov"),
        (dict(cyclic_base_lr=0.5, cyclic_max_lr=0.1), "cyclic_base_lr"),
        (dict(cyclic_step_size=0), "cyclic_step_size"),
        (dict(num_classes=1), "num_classes"),
    ],
)
def test_classifier_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Classifier(MLP(), **kwargs)


def test_classifier_num_classes():
    assert Classifier(MLP(out_features=7)).num_classes == 7
    assert Classifier(LinearModel(64, 1)).num_classes == 2  # binary
    with pytest.raises(ValueError, match="num_classes must be given"):
        Classifier(nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()))
    conv = Classifier(nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()), num_classes=10)
    assert conv.curvature_loss(digits_batch(flatten=False)).ndim == 0
    with pytest.raises(ValueError, match="expected"):
        Classifier(MLP(out_features=10), num_classes=3).curvature_loss(digits_batch())
    with pytest.raises(ValueError, match="net must be"):
        Classifier("MLP")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_classifier_trains_on_digits(loss):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x, y = dm.train_set.tensors
    x = dm._eval_transform(list(zip(x, y, strict=True)))[0]
    model = Classifier(MLP(64, (32,), 10), loss=loss, lr=0.5 if loss == "mse" else 0.1)
    with torch.no_grad():
        before = model.curvature_loss((x, y)).item()
    t = trainer(max_epochs=3)
    t.fit(model, datamodule=dm)
    with torch.no_grad():
        after = model.curvature_loss((x, y)).item()
    assert after < 0.7 * before
    # on_step and on_epoch: loggers get the _step/_epoch suffixed keys, callback_metrics the plain names too
    for key in (
        "train/loss_step",
        "train/acc_step",
        "train/loss_epoch",
        "train/acc_epoch",
        "val/loss",
        "val/acc",
    ):
        assert key in t.logged_metrics, key
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(t.callback_metrics)
    assert t.logged_metrics["val/acc"] > 0.5
    (result,) = t.test(model, datamodule=dm, verbose=False)
    assert set(result) == {"test/loss", "test/acc"}


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_binary_single_output(loss):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, classes=[0, 1])
    model = Classifier(LinearModel(64, 1), loss=loss, lr=0.02 if loss == "mse" else 0.1)  # MSE: h0 ≈ 70
    t = trainer(max_epochs=3)
    t.fit(model, datamodule=dm)
    assert t.logged_metrics["val/acc"] > 0.9
    x, y = next(iter(dm.val_dataloader()))
    out = model(x).squeeze(-1)
    expected = (
        torch.nn.functional.mse_loss(out, y.float())
        if loss == "mse"
        else torch.nn.functional.binary_cross_entropy_with_logits(out, y.float())
    )
    assert torch.allclose(model.curvature_loss((x, y)), expected)


def test_mse_uses_one_hot_targets():
    x, y = digits_batch()
    model = Classifier(MLP(), loss="mse")
    expected = ((model(x) - torch.nn.functional.one_hot(y, 10).float()) ** 2).mean()
    assert torch.allclose(model.curvature_loss((x, y)), expected)


def test_optimizer_settings():
    model = Classifier(MLP(), lr=0.3, momentum=0.9, weight_decay=5e-4, nesterov=True)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (
        0.3,
        0.9,
        5e-4,
        True,
    )


def test_cyclic_schedule_steps_every_step():
    class RecordLR(pl.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = Classifier(
        MLP(64, (8,), 10), lr_schedule="cyclic", cyclic_base_lr=0.01, cyclic_max_lr=0.1, cyclic_step_size=3
    )
    record = RecordLR()
    trainer(max_steps=10, callbacks=[record]).fit(model, datamodule=DigitsDataModule(batch_size=128))
    expected = [0.01, 0.04, 0.07, 0.1, 0.07, 0.04, 0.01, 0.04, 0.07, 0.1]
    assert record.lrs == pytest.approx(expected)

    default = Classifier(MLP(), lr=0.2, lr_schedule="cyclic").configure_optimizers()["lr_scheduler"]
    assert default["interval"] == "step"
    assert (default["scheduler"].base_lrs[0], default["scheduler"].max_lrs[0]) == pytest.approx((0.02, 0.2))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = MLP(64, (16,), 10, dropout=0.1, batchnorm=True)
    model = Classifier(net, loss="mse", lr=0.05, momentum=0.9, lr_schedule="cyclic", cyclic_step_size=5)
    t = trainer()
    t.fit(model, datamodule=DigitsDataModule(batch_size=256))
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    assert "net" not in torch.load(path, weights_only=False)["hyper_parameters"]
    loaded = Classifier.load_from_checkpoint(path, net=MLP(64, (16,), 10, dropout=0.1, batchnorm=True))
    assert dict(loaded.hparams) == dict(model.hparams)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # resuming restores the optimizer/scheduler state and keeps training
    resumed = Classifier(MLP(64, (16,), 10, dropout=0.1, batchnorm=True), **dict(model.hparams))
    trainer(max_epochs=2).fit(resumed, datamodule=DigitsDataModule(batch_size=256), ckpt_path=path)


def test_lightning_cli_builds_net_and_checkpoint_loads_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-chaos"])
    config = {
        "seed_everything": 0,
        "model": {
            "net": {"class_path": "lightning_chaos.models.SmallCNN", "init_args": {"channels": [4, 8]}},
            "lr": 0.05,
        },
        "data": {"batch_size": 256, "flatten": False},
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
        },
    }
    cli = LightningCLI(Classifier, DigitsDataModule, args=config, run=False, save_config_callback=None)
    assert isinstance(cli.model.net, SmallCNN)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = tmp_path / "cli.ckpt"
    cli.trainer.save_checkpoint(path)
    loaded = Classifier.load_from_checkpoint(path)
    assert isinstance(loaded.net, SmallCNN) and loaded.hparams.lr == 0.05
    for key, value in cli.model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_curvature_loss_equals_training_step_loss():
    torch.manual_seed(0)
    model = Classifier(MLP(64, (32, 32), 10, dropout=0.3, batchnorm=True))
    model.train()
    batch = digits_batch()
    metric_before = copy.deepcopy(model.train_acc.metric_state)
    state = torch.get_rng_state()
    probe = model.curvature_loss(batch)
    for name, value in model.train_acc.metric_state.items():  # no metric updates
        assert torch.equal(value, metric_before[name])
    torch.set_rng_state(state)
    step = model.training_step(batch, 0)
    assert torch.equal(probe, step)
    assert probe.requires_grad
    torch.set_rng_state(state)
    assert not torch.equal(model.curvature_loss(batch), model.curvature_loss(batch))  # dropout is live


def test_curvature_loss_matches_inside_trainer():
    class Probe(pl.Callback):
        def __init__(self):
            self.checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rng = torch.get_rng_state()
            self.batch = batch

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            after = torch.get_rng_state()
            torch.set_rng_state(self.rng)
            self.probe = pl_module.curvature_loss(self.batch).detach()
            torch.set_rng_state(after)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert torch.equal(self.probe, outputs["loss"])
            self.checked += 1

    torch.manual_seed(0)
    probe = Probe()
    model = Classifier(MLP(64, (32,), 10, dropout=0.5), lr=0.1)
    trainer(max_steps=5, callbacks=[probe]).fit(model, datamodule=DigitsDataModule(batch_size=128))
    assert probe.checked == 5
