"""Reference networks of the source papers and the ``Classifier`` LightningModule that trains them.

The networks are plain ``nn.Module`` s with PyTorch's default initialisation everywhere (the divergence
experiments compute their baselines from the actual initialisation). Every network maps a batch of inputs
``(B, ...)`` to logits ``(B, num_outputs)``.

``Classifier`` wraps any of them (or any other ``nn.Module``) for SGD training on ``(inputs, labels)``
batches, with integer class labels. It implements the curvature protocol of lightning_chaos:
``curvature_loss(batch)`` returns exactly the loss that ``training_step`` optimises, without logging or
metric updates, so callbacks can re-evaluate the training loss at perturbed parameters.
"""

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}
_LOSSES = ("cross_entropy", "mse")
_LR_SCHEDULES = ("constant", "cyclic")


def _make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


class MLP(nn.Module):
    """Fully connected net: ``[Linear -> (BatchNorm) -> activation -> (Dropout)] * len(hidden) -> Linear``.

    Inputs of any shape ``(B, ...)`` are flattened to ``(B, in_features)``.

    Args:
        in_features: number of input features after flattening (64 for 8×8 digits, 3072 for CIFAR-10).
        hidden: widths of the hidden layers; empty gives a linear model.
        out_features: number of outputs (classes).
        activation: one of ``"relu"``, ``"tanh"``, ``"gelu"``, ``"sigmoid"``, ``"softplus"``.
        dropout: dropout probability after each hidden activation, in ``[0, 1)``; 0 adds no dropout layer.
        batchnorm: add ``BatchNorm1d`` after each hidden linear layer.
        bias: give the linear layers a bias.

    Raises:
        ValueError: on a non-positive width, an unknown activation or a dropout outside ``[0, 1)``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (64, 64),
        out_features: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        hidden = tuple(hidden)
        for i, width in enumerate(hidden):
            _check_positive_int(f"hidden[{i}]", width)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        _make_activation(activation)  # validates the name before any layer is built
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=bias))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(_make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Flatten ``x`` to ``(B, in_features)`` and return the logits ``(B, out_features)``."""
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_features} features per sample after flattening, "
                f"got a flattened input of shape {tuple(x.shape)}"
            )
        return self.layers(x)


class LinearModel(MLP):
    """Affine map of the flattened input; with ``Classifier(loss="mse")`` it is least-squares regression.

    Args:
        in_features: number of input features after flattening.
        out_features: number of outputs. With one output and two classes ``Classifier`` regresses the
            label itself (0 or 1); with ``num_classes`` outputs it regresses the one-hot target.
        bias: include the intercept.
    """

    def __init__(self, in_features: int = 64, out_features: int = 10, bias: bool = True) -> None:
        super().__init__(in_features=in_features, hidden=(), out_features=out_features, bias=bias)


class SmallCNN(nn.Module):
    """Small convolutional network that runs on 8×8 digits as well as 16/28/32-px images.

    ``[Conv3×3(padding 1) -> (BatchNorm) -> activation -> MaxPool2] * len(channels)``, then adaptive average
    pooling to 2×2 and a linear classifier. The defaults have 1,898 parameters with one input channel
    (any image size): small enough for exact Hessians.

    Args:
        in_channels: input channels (1 for digits/FashionMNIST/USPS, 3 for CIFAR-10).
        num_classes: number of outputs.
        channels: output channels of the convolutional blocks. The input side must be at least
            ``2 ** len(channels)`` pixels.
        activation: one of ``"relu"``, ``"tanh"``, ``"gelu"``, ``"sigmoid"``, ``"softplus"``.
        batchnorm: add ``BatchNorm2d`` after each convolution.

    Raises:
        ValueError: on non-positive sizes, an empty ``channels`` or an unknown activation.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (8, 16),
        activation: str = "relu",
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels must name at least one convolutional block, got ()")
        for i, c in enumerate(channels):
            _check_positive_int(f"channels[{i}]", c)
        _make_activation(activation)
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers.append(nn.Conv2d(width, c, kernel_size=3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers += [_make_activation(activation), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear(width * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


class LeNet1(nn.Module):
    """LeNet-1 (LeCun et al., 1998): two 5×5 convolutions with 4 and 12 feature maps and average pooling.

    ``Conv5×5(4) -> act -> AvgPool2 -> Conv5×5(12) -> act -> AdaptiveAvgPool(4×4) -> Linear(192, classes)``.
    On 28×28 inputs this is exactly the original layout (24 -> 12 -> 8 -> 4); the adaptive pooling lets
    32×32 CIFAR-10 images through as well. The second convolution connects to all four maps (the original
    used a sparse connection table), and ``activation`` defaults to ReLU as in the ICLR paper.
    For 16×16 USPS and 8×8 digits use ``padding=2`` so that the convolutions keep the spatial size
    (16 -> 8 -> 8 -> 4); without it a 16×16 input reaches the adaptive pooling as 2×2 and is upsampled.

    Args:
        in_channels: input channels.
        num_classes: number of outputs.
        activation: one of ``"relu"``, ``"tanh"``, ``"gelu"``, ``"sigmoid"``, ``"softplus"``.
        padding: zero padding of both convolutions (0 in the original).

    Raises:
        ValueError: on non-positive sizes, a negative padding or an unknown activation.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, activation: str = "relu", padding: int = 0
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 4, kernel_size=5, padding=padding),
            _make_activation(activation),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 12, kernel_size=5, padding=padding),
            _make_activation(activation),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(12 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``."""
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions and a shortcut (1×1 projection when the shape changes).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution and of the projection.
        batchnorm: use ``BatchNorm2d`` after each convolution (convolutions then have no bias).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, batchnorm: bool = True) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = norm()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not batchnorm)
        self.bn2 = norm()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not batchnorm), norm()
            )

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(F(x) + shortcut(x))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem without max pooling, stages of basic blocks, global average pooling."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int,
        stages: Sequence[tuple[int, int, int]],
        batchnorm: bool,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("width", width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=not batchnorm),
            nn.BatchNorm2d(width) if batchnorm else nn.Identity(),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        channels = width
        for multiplier, num_blocks, stride in stages:
            for i in range(num_blocks):
                blocks.append(BasicBlock(channels, width * multiplier, stride if i == 0 else 1, batchnorm))
                channels = width * multiplier
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``."""
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class SmallResNet(_ResNet):
    """The ICLR paper's "small ResNet with two residual blocks".

    3×3 stem with ``width`` channels, a basic block at ``width`` channels, a basic block at ``2 * width``
    channels with stride 2, global average pooling and a linear classifier (≈20k parameters at width 16
    on CIFAR-10).

    Args:
        in_channels: input channels.
        num_classes: number of outputs.
        width: channels of the stem and first block.
        batchnorm: use batch normalisation (set False for BatchNorm-free curvature experiments).

    Raises:
        ValueError: on non-positive sizes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, batchnorm: bool = True):
        super().__init__(in_channels, num_classes, width, [(1, 1, 1), (2, 1, 2)], batchnorm)


class ResNet18(_ResNet):
    """ResNet-18 (He et al., 2016), CIFAR variant: 3×3 stem, no max pooling, stages [2, 2, 2, 2].

    With the default width 64 and 10 classes it has 11,173,962 parameters.

    Args:
        in_channels: input channels.
        num_classes: number of outputs.
        width: channels of the first stage (stages use 1, 2, 4, 8 times this).
        batchnorm: use batch normalisation.

    Raises:
        ValueError: on non-positive sizes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, batchnorm: bool = True):
        super().__init__(
            in_channels, num_classes, width, [(1, 2, 1), (2, 2, 2), (4, 2, 2), (8, 2, 2)], batchnorm
        )


def _output_width(net: nn.Module) -> int | None:
    """``out_features`` of the last ``nn.Linear`` registered in ``net`` (None if it has none)."""
    width = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            width = module.out_features
    return width


class Classifier(pl.LightningModule):
    """SGD classification of ``(inputs, labels)`` batches, labels being int64 class indices.

    Losses: ``"cross_entropy"`` is softmax cross entropy; ``"mse"`` is ``F.mse_loss`` between the outputs
    and the one-hot targets, averaged over batch *and* classes (PyTorch's default reduction). A net with a
    single output and ``num_classes=2`` is treated as binary: the output is a logit for class 1
    (``binary_cross_entropy_with_logits``) or, with ``"mse"``, a regression onto the label 0/1
    (least squares), predicting class 1 above 0.5.

    Logged: ``train/loss``, ``train/acc`` (per step and per epoch, so loggers receive them as
    ``train/loss_step``/``train/loss_epoch`` etc.), ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``
    (per epoch). Accuracy is micro-averaged ``MulticlassAccuracy``; losses are averaged over DDP ranks.

    Checkpoints: ``net`` is not stored in the hyperparameters (its weights are in the state dict), so load
    with ``Classifier.load_from_checkpoint(path, net=MLP(...))``. A module built by ``LightningCLI`` stores
    the ``class_path``/``init_args`` of ``net`` instead and loads without it.

    Args:
        net: the network; outputs ``(B, num_classes)`` (or ``(B, 1)`` for binary).
        loss: ``"cross_entropy"`` or ``"mse"``.
        lr: SGD learning rate; with ``lr_schedule="cyclic"`` the default peak of the cycle.
        momentum: SGD heavy-ball momentum.
        weight_decay: SGD weight decay (inside the optimizer, not in the loss).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        lr_schedule: ``"constant"`` or ``"cyclic"`` (triangular ``CyclicLR`` stepped every optimizer step).
        cyclic_base_lr: lowest learning rate of the cycle; default ``cyclic_max_lr / 10``.
        cyclic_max_lr: highest learning rate of the cycle; default ``lr``.
        cyclic_step_size: optimizer steps from the lowest to the highest learning rate (half a cycle).
        num_classes: number of classes; default: ``out_features`` of the last ``nn.Linear`` in ``net``
            (2 when that is 1).

    Raises:
        ValueError: on an unknown loss or schedule, negative rates, inconsistent cyclic bounds, Nesterov
            without momentum, or when ``num_classes`` is neither given nor inferable.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        lr_schedule: Literal["constant", "cyclic"] = "constant",
        cyclic_base_lr: float | None = None,
        cyclic_max_lr: float | None = None,
        cyclic_step_size: int = 100,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {list(_LOSSES)}, got {loss!r}")
        if lr_schedule not in _LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(_LR_SCHEDULES)}, got {lr_schedule!r}")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            _check_non_negative(name, value)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        _check_positive_int("cyclic_step_size", cyclic_step_size)
        max_lr = lr if cyclic_max_lr is None else cyclic_max_lr
        base_lr = max_lr / 10 if cyclic_base_lr is None else cyclic_base_lr
        _check_non_negative("cyclic_max_lr", max_lr)
        _check_non_negative("cyclic_base_lr", base_lr)
        if base_lr > max_lr:
            raise ValueError(f"cyclic_base_lr ({base_lr}) must not exceed cyclic_max_lr ({max_lr})")
        if num_classes is None:
            width = _output_width(net)
            if width is None:
                raise ValueError("num_classes must be given: net has no nn.Linear to infer it from")
            num_classes = 2 if width == 1 else width
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")

        self.save_hyperparameters(ignore=["net"])
        if "_instantiator" in self.hparams:
            # Built by LightningCLI: the hyperparameters hold net's class_path/init_args (a plain config, not
            # the module), which lets load_from_checkpoint rebuild it.
            self.save_hyperparameters("net")
        self.net = net
        self.num_classes = num_classes
        self.cyclic_bounds = (base_lr, max_lr)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of ``net`` for the inputs ``x``."""
        return self.net(x)

    def _forward_loss(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Compute ``(loss, outputs, labels)``: the one place where the training loss is defined."""
        x, y = batch
        out = self.net(x)
        binary = self.num_classes == 2 and out.shape[-1] == 1
        if not binary and out.shape[-1] != self.num_classes:
            raise ValueError(
                f"net returned outputs of shape {tuple(out.shape)}, expected (batch, {self.num_classes})"
                + (" or (batch, 1)" if self.num_classes == 2 else "")
            )
        if binary:
            out = out.squeeze(-1)
            target = y.to(out.dtype)
        elif self.hparams["loss"] == "mse":
            target = F.one_hot(y, self.num_classes).to(out.dtype)
        else:
            target = y
        if self.hparams["loss"] == "mse":
            loss = F.mse_loss(out, target)
        elif binary:
            loss = F.binary_cross_entropy_with_logits(out, target)
        else:
            loss = F.cross_entropy(out, target)
        return loss, out, y

    def _predictions(self, out: Tensor) -> Tensor:
        """Predicted class indices from the outputs of ``_forward_loss``."""
        if out.ndim == 1:  # binary: logit (cross entropy) or regressed label (mse)
            threshold = 0.5 if self.hparams["loss"] == "mse" else 0.0
            return (out.detach() > threshold).long()
        return out.detach().argmax(dim=-1)

    def curvature_loss(self, batch: Sequence[Tensor]) -> Tensor:
        """Curvature protocol: the scalar loss that ``training_step`` optimises on ``batch``.

        Same forward and loss function as ``training_step`` (both go through one helper), but no logging
        and no metric updates, so callbacks may call it at perturbed parameters as often as they need.

        Args:
            batch: ``(inputs, labels)`` as yielded by the datamodules.

        Returns:
            The scalar loss tensor, attached to the autograd graph.
        """
        return self._forward_loss(batch)[0]

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Compute the loss, update and log the training metrics.

        Args:
            batch: ``(inputs, labels)``.
            batch_idx: index of the batch in the epoch.

        Returns:
            The loss tensor that the optimizer minimises.
        """
        loss, out, y = self._forward_loss(batch)
        self.train_acc(self._predictions(out), y)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True
        )
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: Sequence[Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        loss, out, y = self._forward_loss(batch)
        metric(self._predictions(out), y)
        self.log(
            f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=len(y), sync_dist=True
        )
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val", batch_size=len(y))
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Log ``val/loss`` and ``val/acc``; returns the loss."""
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Log ``test/loss`` and ``test/acc``; returns the loss."""
        return self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """SGD with the configured hyperparameters, plus a per-step ``CyclicLR`` for ``lr_schedule="cyclic"``.

        Returns:
            The optimizer, or Lightning's optimizer/scheduler dict with ``interval="step"``.
        """
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
            nesterov=hp["nesterov"],
        )
        if hp["lr_schedule"] == "constant":
            return optimizer
        base_lr, max_lr = self.cyclic_bounds
        scheduler = torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=base_lr,
            max_lr=max_lr,
            step_size_up=hp["cyclic_step_size"],
            mode="triangular",
            cycle_momentum=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
