"""``lightning-chaos``: config-driven runs with LightningCLI.

::

    lightning-chaos fit --config examples/digits_mlp_fixed_lr.yaml
    lightning-chaos fit --config examples/digits_mlp_quasi_newton.yaml --trainer.max_epochs 5
    lightning-chaos validate --config examples/digits_mlp_fixed_lr.yaml --ckpt_path last.ckpt
    lightning-chaos fit --config examples/digits_mlp_fixed_lr.yaml --print_config

Subcommands ``fit``, ``validate``, ``test`` (and ``predict``) as in any LightningCLI. Everything is chosen by
class path (short names work for classes already imported, e.g. ``MLP``, ``DigitsDataModule``):

- ``model``: :class:`~lightning_chaos.models.Classifier` or a subclass; its ``net`` is any ``nn.Module``,
  e.g. the reference networks of :mod:`lightning_chaos.models`;
- ``data``: any ``LightningDataModule``, e.g. those of :mod:`lightning_chaos.data`;
- ``trainer.callbacks``: any callbacks, e.g. the chaos callbacks of :mod:`lightning_chaos`.

Defaults (all overridable): the embedded digits (``DigitsDataModule``) and a ``Classifier`` with the
default 64-64-64-10 ReLU ``MLP``, so ``lightning-chaos fit`` alone trains something in seconds on a CPU; a
``TensorBoardLogger`` under ``chaos_logs/`` (the chaos callbacks write their custom-scalars dashboard
into it), logging every step, seed 0, and 20 epochs for a run that sets none of ``max_epochs``,
``max_steps`` and ``max_time`` (a config's ``max_steps`` or ``max_time`` alone is what stops its run). The
resolved configuration is saved next to the logs (``config.yaml``, overwritten on reruns).

The datamodule's ``num_classes`` (when it has one) is passed to ``Classifier(num_classes=...)`` at
instantiation, so a network whose outputs do not match the data fails with a clear error at the first
batch instead of training against the wrong number of classes; setting ``model.init_args.num_classes``
by hand (in a config or on the command line) is therefore an error. The value a ``--ckpt_path``
checkpoint saved is not hand-set: it is accepted, and replaced by the datamodule's like any other.
Input sizes are not linked: the networks name them differently (``in_features``, ``in_channels``), so
configs state them, and a mismatch raises an error naming the expected and the received shape.

Learning rate with :class:`~lightning_chaos.InverseCurvatureLR`: ``Classifier.lr`` is then only the rate
the optimizer is created with. The callback warms the curvature estimate up at the initial point and
writes ``scale / h0`` into the optimizer before the first update, so no update ever uses ``lr`` and a
quasi-Newton config leaves it out.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import NoReturn

from jsonargparse import lazy_instance
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_chaos
from lightning_chaos import data, models
from lightning_chaos.models import Classifier

DEFAULT_LOG_DIR = "chaos_logs"
DEFAULT_MAX_EPOCHS = 20
"""Epochs of a run that sets none of ``max_epochs``, ``max_steps`` and ``max_time``."""
DESCRIPTION = (
    "Train, validate or test lightning_chaos models from YAML configs (see examples/); "
    "model, data and callbacks are chosen by class path."
)


def _ready_made(module: ModuleType, base: type) -> list[str]:
    """Class paths of the public subclasses of ``base`` in ``module`` that build from defaults alone.

    (Building blocks such as ``BasicBlock``, which need constructor arguments, are left out.)
    """
    return [
        f"{module.__name__}.{name}"
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == module.__name__
        if not name.startswith("_")
        and all(
            p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in inspect.signature(obj).parameters.values()
        )
    ]


def known_classes() -> str:
    """The package's classes that a config can name, one line per config key.

    Returns:
        A human-readable listing, appended to class-path errors.
    """
    networks = _ready_made(models, nn.Module)
    exported = [getattr(lightning_chaos, name) for name in lightning_chaos.__all__]
    callbacks = [
        f"lightning_chaos.{c.__name__}" for c in exported if inspect.isclass(c) and issubclass(c, Callback)
    ]
    return "\n".join(
        [
            "Classes of lightning_chaos that a config can name:",
            f"  model:                 {models.__name__}.Classifier (or a subclass)",
            f"  model.init_args.net:   {', '.join(networks)} (or any torch.nn.Module)",
            f"  data:                  {', '.join(_ready_made(data, LightningDataModule))}"
            " (or any LightningDataModule)",
            f"  trainer.callbacks:     {', '.join(callbacks)} (or any lightning.pytorch Callback)",
        ]
    )


class ChaosArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose class-path errors also list the classes this package provides."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Report ``message`` (plus :func:`known_classes` for class-path problems) and exit.

        Args:
            message: the parser's error message.
            ex: the exception behind it.
        """
        listing = known_classes()
        if ("class_path" in message or "Import path" in message) and listing not in message:
            message = f"{message}\n{listing}"
        super().error(message, ex)


class ChaosCLI(LightningCLI):
    """LightningCLI over the ``Classifier`` family and any ``LightningDataModule`` (both by class path).

    Args:
        args: command-line arguments (``None``: ``sys.argv[1:]``), e.g. ``["fit", "--config", path]``.
        run: run the subcommand; with ``False`` the arguments have no subcommand and only the model,
            datamodule and trainer are built.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=Classifier,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": lazy_instance(TensorBoardLogger, save_dir=DEFAULT_LOG_DIR),
                "log_every_n_steps": 1,
            },
            seed_everything_default=0,
            parser_class=ChaosArgumentParser,
            parser_kwargs={"description": DESCRIPTION},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Default to the digits MLP; pass the datamodule's number of classes to the model."""
        parser.set_defaults(
            {
                "model": {
                    "class_path": f"{models.__name__}.Classifier",
                    "init_args": {"net": {"class_path": f"{models.__name__}.MLP"}},
                },
                "data": {"class_path": f"{data.__name__}.DigitsDataModule"},
            }
        )
        parser.link_arguments(
            "data", "model.init_args.num_classes", compute_fn=_num_classes, apply_on="instantiate"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse the arguments and refuse a hand-set ``model.init_args.num_classes``.

        The check runs on what the user gave (configs, command line, defaults), before LightningCLI merges
        the hyper-parameters saved in a ``--ckpt_path`` checkpoint: those include the ``num_classes`` the
        link set when the checkpoint was trained, and the link sets it again from the datamodule.

        Args:
            parser: the CLI's parser.
            args: the arguments, as given to :class:`ChaosCLI`.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        given = (self.config[subcommand] if subcommand else self.config).get("model.init_args.num_classes")
        if given is not None:
            parser.error(
                f"model.init_args.num_classes={given!r} cannot be set: it is taken from the datamodule's "
                "`num_classes` (or, for a datamodule without one, from the network's output width)."
            )

    def before_instantiate_classes(self) -> None:
        """Limit a run that nothing else limits to :data:`DEFAULT_MAX_EPOCHS` epochs.

        A run with ``max_steps`` or ``max_time`` and no ``max_epochs`` gets ``max_epochs=-1``, as Lightning
        would, so that its own limit is what stops it; an explicit ``max_epochs`` is kept.
        """
        trainer = self._get(self.config, "trainer")
        if trainer.max_epochs is None:
            unbounded = trainer.max_steps == -1 and trainer.max_time is None
            trainer.max_epochs = DEFAULT_MAX_EPOCHS if unbounded else -1


def _num_classes(datamodule: LightningDataModule | None) -> int | None:
    """The datamodule's ``num_classes``, or ``None`` (the model infers it) when it has none."""
    return getattr(datamodule, "num_classes", None)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-chaos`` console script.

    Args:
        args: command-line arguments (``None``: ``sys.argv[1:]``).
    """
    ChaosCLI(args=args)


if __name__ == "__main__":
    main()
