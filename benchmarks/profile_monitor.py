"""Where the monitor's time goes beyond the probe's own forward and backward passes.

    python benchmarks/profile_monitor.py [--models mlp,small_resnet,resnet18] [--modes paper,defaults]
        [--steps S] [--out benchmarks/README.md --tag profile-cpu]

One Lightning run per model and mode, three kinds of steps interleaved by ``global_step % 3``: 0 monitored
(``HessianEigenvalueMonitor(every_n_steps=3)``), 1 the floor (:class:`~benchmarks.common.OneGradient`: one
extra ``torch.autograd.grad`` of the same loss on the same batch), 2 plain. So the monitor's added time, the
floor's added time and the plain step come from the same run, step by step, whatever else loads the
machine. Modes: ``paper`` is ``products="finite_difference", n_iter=1`` (exactly one extra gradient per
step), ``defaults`` the monitor's defaults, ``top4`` the paper mode with ``top_k=4`` (vmapped gradients).
The first steps (the defaults' warm-up at step 0) are left out of the medians.

The library's functions and context managers on the monitor's path are wrapped with wall-clock
accumulators (:data:`COMPONENTS`, nested: a parent's time includes its children; a context manager's row is
the time of its ``__enter__`` and ``__exit__`` only). Every row is the median over the monitored steps of
that component's total time in the step, next to its calls per step; "(rest)" rows are a parent's time
not spent in its listed children (inline tensor operations: arithmetic, norms, finiteness checks,
``float()`` conversions). The probe's forward passes (every call of the module's ``curvature_loss``) and
backward passes (every ``torch.autograd.grad``) are summed apart: what the monitor adds beyond them is its
overhead. Host synchronisations (``float``/``bool``/``int``/``item``/``tolist`` of a tensor inside the
monitor) are counted: each waits for the device on a GPU. The wrappers themselves cost about a microsecond
per call, which the monitored step pays and the others do not.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import lightning_chaos.callbacks._base as base_module  # noqa: E402
import lightning_chaos.callbacks._batch as batch_module  # noqa: E402
import lightning_chaos.callbacks.hessian_eigenvalue as monitor_module  # noqa: E402
import lightning_chaos.core.controlled_lyapunov as lyapunov_module  # noqa: E402
import lightning_chaos.core.functional_loss as loss_module  # noqa: E402
import lightning_chaos.core.operators as operators_module  # noqa: E402
import lightning_chaos.core.params as params_module  # noqa: E402
import lightning_chaos.core.step_curvature as curvature_module  # noqa: E402
from benchmarks.common import (  # noqa: E402
    OneGradient,
    StepTimer,
    make_trainer,
    markdown_table,
    median,
    progress,
    quiet,
    resolve_device,
    write_block,
)
from lightning_chaos import HessianEigenvalueMonitor  # noqa: E402
from lightning_chaos.data import DigitsDataModule, SyntheticDataModule  # noqa: E402
from lightning_chaos.models import MLP, Classifier, ResNet18, SmallResNet  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "paper": {"products": "finite_difference", "n_iter": 1},
    "defaults": {},
    "top4": {"products": "finite_difference", "n_iter": 1, "top_k": 4},
}
"""Monitor configurations: the paper's one-gradient mode, the defaults, top-k paper-style."""

MODELS: dict[str, tuple[str, int, int, int]] = {
    "mlp": ("digits MLP 64-32-10", 128, 301, 100),
    "small_resnet": ("small ResNet", 32, 61, 100),
    "resnet18": ("ResNet-18", 8, 19, 10),
}
"""Label, batch size, training steps and ``warmup_iters`` of each model (CPU sizes). ResNet-18 warms up
with 10 products instead of the default 100: a 100-column Krylov basis of its 11M parameters takes minutes
and about 10 GiB at step 0, which the profile leaves out anyway."""


@dataclass(frozen=True)
class Component:
    """A wrapped function or context manager ``owner.attr`` and its row label."""

    owner: Any
    attr: str
    label: str
    context: bool = False


FORWARD = "the loss (`curvature_loss`: probe forward)"
BACKWARD = "`torch.autograd.grad` (probe backward)"

# what is wrapped (whatever of it the code has: the same list profiles the code before and after
# issue 12); the nesting of the rows is the observed call tree
COMPONENTS: list[Component] = [
    Component(base_module, "record_batch", "record_batch (RNG capture; every step, at batch start)"),
    Component(monitor_module.HessianEigenvalueMonitor, "estimate", "HessianEigenvalueMonitor.estimate"),
    Component(monitor_module, "step_curvature", "step_curvature (build the step's curvature)"),
    Component(batch_module, "trainable_parameters", "trainable_parameters (named_parameters walk)"),
    Component(batch_module, "skipped_backward", "skipped_backward"),
    Component(batch_module, "loss_closure", "loss_closure"),
    Component(batch_module, "_metrics", "_metrics (modules() walk for torchmetrics)"),
    Component(params_module.ModuleLayout, "of", "ModuleLayout.of (cached layout, checked)"),
    Component(batch_module, "metric_guard", "metric_guard"),
    Component(loss_module.FunctionalLoss, "__init__", "FunctionalLoss.__init__ (names, ties, buffers)"),
    Component(curvature_module.StepCurvature, "g0", "StepCurvature.g0 (flatten p.grad)"),
    Component(curvature_module.StepCurvature, "g0_tensors", "StepCurvature.g0_tensors (p.grad)"),
    Component(lyapunov_module, "_host_norms", "_host_norms (finiteness of g0, ‖θ‖)"),
    Component(lyapunov_module, "_theta_norm", "_theta_norm"),
    Component(lyapunov_module.HessianEigenEstimator, "step", "HessianEigenEstimator.step"),
    Component(lyapunov_module.HessianEigenEstimator, "_check", "_check (periodic Δq check)"),
    Component(lyapunov_module.HessianEigenEstimator, "_calibrate", "_calibrate (Δq after the warm-up)"),
    Component(lyapunov_module.HessianEigenEstimator, "_representable", "_representable (θ + Δq·u test)"),
    Component(loss_module.FunctionalLoss, "theta", "FunctionalLoss.theta (flatten θ)"),
    Component(lyapunov_module.HessianEigenEstimator, "_max_products", "_max_products (budget)"),
    Component(lyapunov_module.ControlledLyapunov, "step", "ControlledLyapunov.step"),
    Component(loss_module.FunctionalLoss, "gradient", "FunctionalLoss.gradient (one gradient)"),
    Component(loss_module.FunctionalLoss, "gradients", "FunctionalLoss.gradients (k gradients)"),
    Component(loss_module.FunctionalLoss, "_grad", "FunctionalLoss._grad (at θ + q)"),
    Component(loss_module.FunctionalLoss, "_pieces", "FunctionalLoss._pieces (views of q)"),
    Component(loss_module.FunctionalLoss, "_vmapped", "FunctionalLoss._vmapped (vmap)"),
    Component(loss_module, "unflatten", "unflatten (a vector into tensors)"),
    Component(loss_module.FunctionalLoss, "__call__", "FunctionalLoss.__call__ (the loss)"),
    Component(loss_module.RNGState, "replay", "RNGState.replay (enter + exit)", context=True),
    Component(torch.func, "functional_call", "torch.func.functional_call"),
    Component(getattr(loss_module, "_Call", None), "forward", "the loss closure"),
    Component(batch_module, "preserved_metrics", "preserved_metrics (enter + exit)", context=True),
    Component(getattr(batch_module, "MetricGuard", None), "__enter__", "MetricGuard.__enter__"),
    Component(getattr(batch_module, "MetricGuard", None), "__exit__", "MetricGuard.__exit__"),
    Component(batch_module, "muted_logging", "muted_logging (enter + exit)", context=True),
    Component(Classifier, "curvature_loss", FORWARD),
    Component(torch.autograd, "grad", BACKWARD),
    Component(loss_module, "filled", "filled (zeros for unused parameters)"),
    Component(loss_module, "flatten", "flatten (tensors into a vector)"),
    Component(operators_module.HessianOperator, "matmat", "HessianOperator.matmat (exact products)"),
    Component(operators_module, "_flat_grad_with_graph", "_flat_grad_with_graph (the gradient graph)"),
    Component(operators_module, "_once_differentiable", "_once_differentiable (graph walk)"),
    Component(operators_module, "_vjp_of_grad", "_vjp_of_grad (double backward)"),
    Component(operators_module, "second_order_context", "second_order_context (enter + exit)", context=True),
    Component(lyapunov_module.ControlledLyapunov, "_exponents", "_exponents (λ)"),
    Component(lyapunov_module.ControlledLyapunov, "_control", "_control (β)"),
    Component(lyapunov_module, "_direction_statistics", "_direction_statistics (ρ, ‖Bu‖², residual)"),
    Component(lyapunov_module.ControlledLyapunov, "_ritz", "ControlledLyapunov._ritz (Rayleigh–Ritz, j ≥ 2)"),
    Component(lyapunov_module, "_rayleigh_ritz", "_rayleigh_ritz (eigh of Vᵀ(HV), float64)"),
    Component(
        getattr(lyapunov_module, "_KrylovSpace", None), "rayleigh_ritz", "_KrylovSpace.rayleigh_ritz (eigh)"
    ),
    Component(
        getattr(lyapunov_module, "_KrylovSpace", None), "append", "_KrylovSpace.append (row of Vᵀ(HV))"
    ),
    Component(lyapunov_module, "_orthogonal_extension", "_orthogonal_extension (Krylov step)"),
    Component(lyapunov_module.ControlledLyapunov, "_next_block", "_next_block (warm start)"),
    Component(lyapunov_module, "positive_qr", "positive_qr (QR of N × k)"),
    Component(lyapunov_module.FiniteDifferenceScale, "calibrate", "FiniteDifferenceScale.calibrate"),
    Component(lyapunov_module.HessianEigenEstimator, "_count", "_count (cost bookkeeping)"),
    Component(monitor_module.HessianEigenvalueMonitor, "_loggable", "_loggable (values dict)"),
    Component(monitor_module, "log_values", "log_values"),
    Component(monitor_module.HessianEigenvalueMonitor, "_warn", "_warn (once-per-run warnings)"),
]

SYNCS = ("__float__", "__bool__", "__int__", "item", "tolist")
"""Tensor methods that return a Python value: a host synchronisation on a GPU."""

Path_ = tuple[str, ...]


class Recorder:
    """Per-step totals (seconds) and calls of every wrapped component, by call path and ``global_step``."""

    def __init__(self) -> None:
        self.step = -1
        self.stack: list[str] = []
        self.seconds: dict[Path_, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[Path_, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.syncs: dict[int, int] = defaultdict(int)
        self.order: dict[Path_, int] = {}  # first appearance of each path

    def push(self, label: str) -> Path_:
        self.stack.append(label)
        path = tuple(self.stack)
        self.order.setdefault(path, len(self.order))
        return path

    def pop(self, path: Path_, seconds: float) -> None:
        self.stack.pop()
        self.seconds[path][self.step] += seconds
        self.calls[path][self.step] += 1

    @property
    def inside_monitor(self) -> bool:
        return bool(self.stack) and any(label.startswith("HessianEigenvalueMonitor") for label in self.stack)


def _wrap_function(func: Callable[..., Any], label: str, recorder: Recorder) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        path = recorder.push(label)
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            recorder.pop(path, time.perf_counter() - start)

    return wrapper


def _wrap_context(func: Callable[..., Any], label: str, recorder: Recorder) -> Callable[..., Any]:
    """A context manager whose ``__enter__`` and ``__exit__`` (not its body) are timed under ``label``."""

    @functools.wraps(func)
    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        path = recorder.push(label)
        start = time.perf_counter()
        manager = func(*args, **kwargs)
        value = manager.__enter__()
        recorder.pop(path, time.perf_counter() - start)
        try:
            yield value
        except BaseException:
            path = recorder.push(label)
            start = time.perf_counter()
            suppress = manager.__exit__(*sys.exc_info())
            recorder.pop(path, time.perf_counter() - start)
            recorder.calls[path][recorder.step] -= 1  # one call, timed in two parts
            if not suppress:
                raise
        else:
            path = recorder.push(label)
            start = time.perf_counter()
            manager.__exit__(None, None, None)
            recorder.pop(path, time.perf_counter() - start)
            recorder.calls[path][recorder.step] -= 1

    return wrapper


def _patch(owner: Any, attr: str, make: Callable[[Any], Any]) -> Callable[[], None]:
    """Replace ``owner.attr`` by ``make(original)``; returns the undo function."""
    own = attr in vars(owner)
    original = vars(owner)[attr] if own else getattr(owner, attr)
    func = original.__func__ if isinstance(original, (classmethod, staticmethod)) else original
    replacement = make(func)
    if isinstance(original, (classmethod, staticmethod)):
        replacement = type(original)(replacement)
    setattr(owner, attr, replacement)
    return (lambda: setattr(owner, attr, original)) if own else (lambda: delattr(owner, attr))


@contextlib.contextmanager
def instrumented(recorder: Recorder, components: list[Component]) -> Iterator[None]:
    """Wrap every component and count the host synchronisations inside the monitor."""
    undo: list[Callable[[], None]] = []

    def synchronising(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if recorder.inside_monitor:
                recorder.syncs[recorder.step] += 1
            return func(*args, **kwargs)

        return wrapper

    try:
        for c in components:
            if c.owner is None or c.attr not in vars(c.owner) and not hasattr(c.owner, c.attr):
                continue  # not in the code of this commit
            wrap = _wrap_context if c.context else _wrap_function
            undo.append(_patch(c.owner, c.attr, lambda f, c=c, wrap=wrap: wrap(f, c.label, recorder)))
        for name in SYNCS:
            undo.append(_patch(torch.Tensor, name, synchronising))
        yield
    finally:
        for fn in reversed(undo):
            fn()


class StepIndex(Callback):
    """First in the callback list: tells the recorder which optimizer step the next calls belong to."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int):
        self.recorder.step = trainer.global_step


def build(model: str, batch: int) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The networks of the timing table: ``mlp`` (digits 64-32-10), ``small_resnet``, ``resnet18``."""
    if model == "mlp":
        return Classifier(MLP(64, (32,), 10), lr=0.1), DigitsDataModule(batch_size=batch, drop_last=True)
    net = SmallResNet() if model == "small_resnet" else ResNet18()
    data = SyntheticDataModule(input_shape=(3, 32, 32), num_samples=4 * batch, batch_size=batch)
    return Classifier(net, lr=0.05), data


@dataclass
class Profile:
    """One run's per-step times: the kinds of steps, and every call path of the monitored steps."""

    model: str
    plain: float
    floor_added: float
    monitor_added: float
    forward: float
    backward: float
    syncs: float
    rows: dict[Path_, tuple[float, float]]  # path: (seconds per monitored step, calls per monitored step)
    rests: dict[Path_, float]  # path: its seconds not spent in its wrapped children


def profile(model: str, mode: str, device: torch.device, steps: int | None = None, skip: int = 6) -> Profile:
    """Train one model with the monitor every third step and the floor one step later; see the module doc."""
    label, batch, default_steps, warmup = MODELS[model]
    recorder = Recorder()
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(device)
    monitor = HessianEigenvalueMonitor(every_n_steps=3, warmup_iters=warmup, **MODES[mode])
    callbacks = [StepIndex(recorder), timer, monitor, OneGradient(every_n_steps=3, phase=1)]
    with instrumented(recorder, COMPONENTS):
        make_trainer(callbacks, steps or default_steps, device).fit(*build(model, batch))
    kept = range(skip, len(timer.times))
    monitored = [i for i in kept if i % 3 == 0]
    by_kind = [median(timer.times[i] for i in kept if i % 3 == r) for r in range(3)]

    def per_step(table: dict[int, float] | dict[int, int]) -> float:
        return median(float(table.get(i, 0)) for i in monitored)

    paths = sorted(recorder.order, key=recorder.order.__getitem__)
    rows = {path: (per_step(recorder.seconds[path]), per_step(recorder.calls[path])) for path in paths}
    rests = {}
    for path in paths:
        children = [p for p in paths if len(p) == len(path) + 1 and p[: len(path)] == path]
        if children:
            rests[path] = median(
                recorder.seconds[path].get(i, 0.0) - sum(recorder.seconds[c].get(i, 0.0) for c in children)
                for i in monitored
            )

    def total(label: str) -> float:
        return median(
            sum(recorder.seconds[p].get(i, 0.0) for p in paths if p[-1] == label) for i in monitored
        )

    progress(f"profile {model} {mode}: monitored {1e3 * by_kind[0]:.2f} ms, plain {1e3 * by_kind[2]:.2f} ms")
    return Profile(
        model=label,
        plain=by_kind[2],
        floor_added=by_kind[1] - by_kind[2],
        monitor_added=by_kind[0] - by_kind[2],
        forward=total(FORWARD),
        backward=total(BACKWARD),
        syncs=per_step(recorder.syncs),
        rows=rows,
        rests=rests,
    )


def _ms(seconds: float) -> str:
    """Milliseconds with three significant digits and no exponent."""
    value = 1e3 * seconds
    if value == 0:
        return "0"
    digits = max(0, 2 - int(f"{abs(value):e}".split("e")[1]))
    return f"{value:.{digits}f}"


def table(profiles: list[Profile]) -> str:
    """One markdown table for one mode: a column pair (ms, share of the monitor's added time) per model."""
    header = ["component (nested; per monitored step, median)", "calls"]
    for p in profiles:
        header += [f"{p.model}: ms", "% of added"]

    def line(label: str, values: list[float], calls: str = "", shares: bool = True) -> list[str]:
        row = [label, calls]
        for p, v in zip(profiles, values, strict=True):
            share = f"{100 * v / p.monitor_added:.0f} %" if shares and p.monitor_added > 0 else ""
            row += [_ms(v), share]
        return row

    rows = [
        line("plain step (steps 3i + 2)", [p.plain for p in profiles], shares=False),
        line(
            "floor: one extra `torch.autograd.grad` (steps 3i + 1), added", [p.floor_added for p in profiles]
        ),
        line("**monitor (steps 3i), added**", [p.monitor_added for p in profiles]),
        ["**monitor added ÷ floor added**", ""]
        + [cell for p in profiles for cell in (f"**{p.monitor_added / p.floor_added:.2f}×**", "")],
        line("probe forward passes (the loss)", [p.forward for p in profiles]),
        line("probe backward passes (`torch.autograd.grad`)", [p.backward for p in profiles]),
        line(
            "**beyond the probe's forward + backward**",
            [p.monitor_added - p.forward - p.backward for p in profiles],
        ),
        ["host synchronisations in the monitor", ""]
        + [cell for p in profiles for cell in (f"{p.syncs:.0f}", "")],
    ]
    first: dict[Path_, int] = {}  # first appearance over the profiles: prefixes come before their paths
    for p in profiles:
        for path in p.rows:
            first.setdefault(path, len(first))
    paths = sorted(first, key=lambda path: [first[path[: k + 1]] for k in range(len(path))])
    indent = "&nbsp;&nbsp;"
    for path in paths:
        values = [p.rows.get(path, (0.0, 0.0))[0] for p in profiles]
        calls = sorted({p.rows.get(path, (0.0, 0.0))[1] for p in profiles})
        if calls == [0]:
            continue  # called on other steps only (the warm-up, the floor's own passes)
        rows.append(line(indent * (len(path) - 1) + path[-1], values, "/".join(f"{c:g}" for c in calls)))
        if any(path in p.rests for p in profiles):
            rests = [p.rests.get(path, 0.0) for p in profiles]
            rows.append(line(indent * len(path) + "(the rest: inline code)", rests))
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mlp,small_resnet,resnet18")
    parser.add_argument("--modes", default="paper,defaults")
    parser.add_argument("--steps", type=int, help="training steps per run (default: per model)")
    parser.add_argument("--skip", type=int, default=6, help="first steps left out of the medians")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="markdown file whose results block --tag is (re)written")
    parser.add_argument("--tag", default="profile-cpu")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sections = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        profiles = [profile(model, mode, device, args.steps, args.skip) for model in models]
        settings = ", ".join(f"{k}={v!r}" for k, v in MODES[mode].items()) or "defaults"
        batches = ", ".join(f"{MODELS[m][0]} batch {MODELS[m][1]}" for m in models)
        sections += [f"Mode `{mode}` (`HessianEigenvalueMonitor({settings})`; {batches}):", table(profiles)]
    text = "\n\n".join(sections)
    if args.out is not None:
        write_block(
            args.out,
            args.tag,
            f"<!-- BEGIN RESULTS: {args.tag} -->\n{text}\n<!-- END RESULTS: {args.tag} -->",
        )
    print(text)
    return text


if __name__ == "__main__":
    main()
