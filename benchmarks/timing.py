"""What each curvature callback adds to a training step, in units of what one extra gradient adds.

Step times are measured on real Lightning ``Trainer`` runs, with :class:`StepTimer` first in the callback
list: the window is ``on_train_batch_start`` → ``on_train_batch_end`` (forward, backward, every
``on_before_optimizer_step`` including the probe, optimizer step, the module's own logging; not data
loading), CUDA-synchronised at both ends. Every run trains a freshly seeded model and drops its first
``skip`` steps (the monitors' warm-up at step 0, allocator and kernel warm-up). Every callback computes on
even steps only (``every_n_steps=2``), so each run alternates computed and left-out steps: what a
configuration adds is the median computed step minus the median left-out step *of the same run*, a
paired measurement that load from other processes cannot bias towards one side. Configurations are
interleaved round by round; tables give the median over rounds and the range.

**The floor** (:class:`~benchmarks.common.OneGradient`) computes one extra ``torch.autograd.grad`` of the
same loss on the same batch: the least a probe that needs one gradient can add. Every configuration's
added time is stated as a multiple of the floor's added time in the same round, next to the cost the
configuration counts for itself (``CurvatureEstimate.cost``, logged as ``chaos/probe_cost``: gradients,
plus ``HVP_COST`` per exact Hessian-vector product and ``GRAPH_COST`` per gradient graph); where the
counted cost is right, the added time is that many floors. :class:`ProductCosts` measures what the
constants stand for: on each step's own batch and θ, one gradient of the library's ``FunctionalLoss``,
the first exact product (which builds the gradient graph) and a second one.

The competitors run in a separate *reference run* (monitors warmed up as users run them) at the same
point θ and batch where the monitors estimate: :class:`ReferencePoint`, last in the callback list, takes
the shared step curvature in ``on_before_optimizer_step`` and times PyHessian-style power iteration
(double-backward HVPs, tol 1e-3) and 20 Lanczos steps, and computes a 100-step Lanczos reference (plus
``eigvalsh`` where the model is small enough), against which every method's top eigenvalue is compared.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from benchmarks.common import (
    OneGradient,
    StepTimer,
    fmt,
    make_trainer,
    markdown_table,
    median,
    pct,
    peak_memory,
    progress,
    relative_error,
    timed,
)
from benchmarks.reference import exact_spectrum, hessian_operator, lanczos_top, power_iteration
from lightning_chaos import CGD, CGDCurvature, HessianEigenvalueMonitor, LyapunovSpectrumMonitor
from lightning_chaos.callbacks._batch import record_batch, step_curvature
from lightning_chaos.core.controlled_lyapunov import GRAPH_COST, HVP_COST
from lightning_chaos.core.operators import HessianOperator
from lightning_chaos.data import DigitsDataModule, SyntheticDataModule
from lightning_chaos.models import MLP, Classifier, ResNet18, SmallResNet

CGD_K = 2
"""Eigenpairs per end of the spectrum that ``CGD(method="lanczos")`` removes in the timing runs."""


@dataclass
class Case:
    """One network of the timing tables and the sizes it runs at on this device."""

    key: str
    label: str
    make_model: Callable[[], pl.LightningModule]
    make_data: Callable[[], pl.LightningDataModule]
    batch: int
    steps: int = 30  # per timing run
    rounds: int = 3
    skip: int = 3
    warmup_iters: int = 10  # of the monitors in the timing runs (step 0, left out of the medians)
    reference_steps: tuple[int, ...] = (20,)  # steps of the reference run where the competitors run
    reference_warmup_iters: int = 100  # of the monitors in the reference run
    lanczos_steps: int = 100  # reference
    competitor_lanczos_steps: int = 20
    spectrum: dict[str, Any] = field(default_factory=dict)  # LyapunovSpectrumMonitor arguments
    heavy: bool = True  # run the spectrum monitor and CGD (minutes per computed step on ResNet-18, CPU)


@dataclass
class Config:
    """A configuration whose step time is compared with the plain step and the floor.

    ``make(case)`` returns the callbacks of one timing run (computing on every other step); ``cgd`` runs
    the model with :class:`~lightning_chaos.CGD` as its optimizer.
    """

    key: str
    label: str
    make: Callable[[Case], list[Callback]]
    cgd: bool = False
    heavy: bool = False


class CostRecorder(Callback):
    """After a monitor: the counted cost (gradient-equivalents) of each of its computed steps."""

    def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
        self.monitor = monitor
        self.costs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any):
        estimate = self.monitor.latest
        if trainer.global_step % self.monitor.every_n_steps == 0 and estimate is not None:
            self.costs[trainer.global_step] = estimate.cost


def _monitor(**kwargs: Any) -> Callable[[Case], list[Callback]]:
    def make(case: Case) -> list[Callback]:
        monitor = HessianEigenvalueMonitor(every_n_steps=2, warmup_iters=case.warmup_iters, **kwargs)
        return [monitor, CostRecorder(monitor)]

    return make


def _spectrum(case: Case) -> list[Callback]:
    return [LyapunovSpectrumMonitor(method="lanczos", every_n_steps=2, **case.spectrum)]


def spectrum_products(case: Case) -> int:
    """Exact products of one computed step of the spectrum monitor: its Lanczos run and the SLQ probes."""
    monitor = LyapunovSpectrumMonitor(method="lanczos", **case.spectrum)
    return monitor.lanczos_steps + monitor.slq_probes * monitor.slq_steps


def cgd_products() -> int:
    """Exact products of one refresh of ``CGD(strategy="chaotic", method="lanczos", k=CGD_K)``."""
    return 3 * 2 * CGD_K + 30  # core.pruning: a Lanczos run of 3·k_total + 30 steps, k_total = 2k


CONFIGS = [
    Config("plain", "plain step", lambda case: []),
    Config("floor", "floor: one extra `torch.autograd.grad`", lambda case: [OneGradient(every_n_steps=2)]),
    Config("defaults", "`HessianEigenvalueMonitor()` (defaults)", _monitor()),
    Config(
        "paper",
        'paper mode (`products="finite_difference", n_iter=1`)',
        _monitor(products="finite_difference", n_iter=1),
    ),
    Config(
        "top_k=4",
        "paper-style top-4 (`…, top_k=4`)",
        _monitor(products="finite_difference", n_iter=1, top_k=4),
    ),
    Config("exact", '`products="exact"`', _monitor(products="exact")),
    Config("spectrum", '`LyapunovSpectrumMonitor(method="lanczos")`', _spectrum, heavy=True),
    Config(
        "cgd",
        f'`CGD(method="lanczos", k={CGD_K})` + `CGDCurvature`',
        lambda case: [CGDCurvature()],
        cgd=True,
        heavy=True,
    ),
]


def cases(device: torch.device, smoke: bool) -> list[Case]:
    """The three networks, sized for the device (CPU sizes keep a run of both small ones near 10 minutes)."""
    cuda = device.type == "cuda"
    if smoke:

        def tiny_resnet(depth: str) -> Callable[[], pl.LightningModule]:
            cls = SmallResNet if depth == "small" else ResNet18
            return lambda: Classifier(cls(width=2), lr=0.05)

        def tiny_images() -> pl.LightningDataModule:
            return SyntheticDataModule(input_shape=(3, 8, 8), num_samples=32, batch_size=8, num_val_samples=8)

        common: dict[str, Any] = dict(
            steps=4,
            rounds=1,
            skip=2,
            warmup_iters=2,
            reference_steps=(1,),
            reference_warmup_iters=3,
            lanczos_steps=8,
            competitor_lanczos_steps=4,
            spectrum={"num_eigenpairs": 1, "slq_probes": 1, "slq_steps": 4},
        )
        return [
            Case(
                "mlp",
                "digits MLP 64-8-10",
                lambda: Classifier(MLP(64, (8,), 10), lr=0.1),
                lambda: DigitsDataModule(batch_size=32, drop_last=True),
                32,
                **common,
            ),
            Case("small_resnet", "small ResNet (width 2)", tiny_resnet("small"), tiny_images, 8, **common),
            Case("resnet18", "ResNet-18 (width 2)", tiny_resnet("18"), tiny_images, 8, **common),
        ]

    def images(batch: int) -> Callable[[], pl.LightningDataModule]:
        return lambda: SyntheticDataModule(
            input_shape=(3, 32, 32), num_samples=4 * batch, batch_size=batch, num_val_samples=batch
        )

    small_batch = 512 if cuda else 32
    r18_batch = 512 if cuda else 8
    # on a CPU the spectrum monitor's defaults (10 probes × 80 steps + 90 Lanczos steps: 890 products)
    # take minutes per computed step on the ResNets; there it runs 2 probes × 20 steps + 42 Lanczos steps
    light_spectrum = {} if cuda else {"num_eigenpairs": 2, "slq_probes": 2, "slq_steps": 20}
    return [
        Case(
            "mlp",
            "digits MLP 64-32-10 ReLU",
            lambda: Classifier(MLP(64, (32,), 10), lr=0.1),
            lambda: DigitsDataModule(batch_size=128, drop_last=True),
            128,
            steps=100,
            rounds=5,
            skip=6,
            reference_steps=(20, 40, 60),
        ),
        Case(
            "small_resnet",
            "small ResNet (CIFAR-shaped, synthetic)",
            lambda: Classifier(SmallResNet(), lr=0.05),
            images(small_batch),
            small_batch,
            steps=20 if cuda else 12,
            rounds=3,
            skip=4 if cuda else 2,
            reference_steps=(10, 15, 20) if cuda else (10, 20),
            spectrum=light_spectrum,
        ),
        Case(
            "resnet18",
            "ResNet-18 (CIFAR-shaped, synthetic)",
            lambda: Classifier(ResNet18(), lr=0.05),
            images(r18_batch),
            r18_batch,
            steps=20 if cuda else 6,
            rounds=3 if cuda else 2,
            skip=4 if cuda else 2,
            reference_steps=(10, 15, 20) if cuda else (2,),
            reference_warmup_iters=100 if cuda else 10,
            spectrum=light_spectrum,
            heavy=cuda,
        ),
    ]


# --------------------------------------------------------------------------------------------- step times


@dataclass
class RunTimes:
    """Medians of one timing run (seconds; CUDA peaks in bytes above the step's start, nan on CPU).

    ``computed`` and ``skipped`` are the medians of the run's even (computed) and odd (left-out) steps;
    a plain run has only ``skipped`` steps. ``cost``: mean counted cost of the computed steps (monitors).
    """

    computed: float
    skipped: float
    peak_computed: float
    peak_skipped: float
    cost: float = math.nan

    @property
    def added(self) -> float:
        """What the configuration adds to a step (computed − left-out, the same run)."""
        return self.computed - self.skipped


def _with_cgd(module: pl.LightningModule) -> pl.LightningModule:
    """The module stepping with ``CGD(<its own optimizer>, method="lanczos", k=CGD_K, every_n_steps=2)``."""
    own = module.configure_optimizers

    def configure_optimizers() -> Optimizer:
        return CGD(own(), strategy="chaotic", method="lanczos", k=CGD_K, every_n_steps=2)

    module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
    return module


def time_config(case: Case, config: Config, device: torch.device, seed: int = 0) -> RunTimes:
    """Train ``case.steps`` steps with one configuration; medians of the steps after ``case.skip``."""
    pl.seed_everything(seed, verbose=False)
    timer = StepTimer(device)
    callbacks = config.make(case)
    trainer = make_trainer([timer, *callbacks], case.steps, device)
    model = case.make_model()
    trainer.fit(_with_cgd(model) if config.cgd else model, case.make_data())
    indices = range(case.skip, len(timer.times))
    peaks = timer.peaks or [math.nan] * len(timer.times)
    if not callbacks:
        plain = median(timer.times[i] for i in indices)
        return RunTimes(math.nan, plain, math.nan, median(peaks[i] for i in indices))
    even = [i for i in indices if i % 2 == 0]
    odd = [i for i in indices if i % 2 == 1]
    recorders = [c for c in callbacks if isinstance(c, CostRecorder)]
    costs = [cost for r in recorders for step, cost in r.costs.items() if step >= case.skip]
    return RunTimes(
        median(timer.times[i] for i in even),
        median(timer.times[i] for i in odd),
        median(peaks[i] for i in even),
        median(peaks[i] for i in odd),
        sum(costs) / len(costs) if costs else math.nan,
    )


@dataclass
class StepTimes:
    """Every configuration's :class:`RunTimes`, one per round."""

    runs: dict[str, list[RunTimes]] = field(default_factory=dict)

    def plain(self) -> list[float]:
        """Per-round plain step (s) from the plain runs."""
        return [r.skipped for r in self.runs["plain"]]

    def added(self, key: str) -> list[float]:
        """Per-round added time (s) of a configuration."""
        return [r.added for r in self.runs[key]]

    def floors(self, key: str) -> list[float]:
        """Per-round added time ÷ the floor's added time of the same round."""
        return [r.added / f.added for r, f in zip(self.runs[key], self.runs["floor"])]

    def paired_ratios(self, key: str) -> list[float]:
        """Per-round computed ÷ left-out step of the same run."""
        return [r.computed / r.skipped for r in self.runs[key]]

    def costs(self, key: str) -> list[float]:
        """Per-round mean counted cost (gradient-equivalents per computed step)."""
        return [r.cost for r in self.runs[key]]

    def extra_peak(self, key: str) -> float:
        """Median over rounds of the computed steps' CUDA peak above the left-out steps' (bytes)."""
        return median(r.peak_computed - r.peak_skipped for r in self.runs[key])


def measure_steps(case: Case, device: torch.device, configs: list[Config] = CONFIGS) -> StepTimes:
    """Interleaved rounds of all configurations (the heavy ones only where the case runs them)."""
    out = StepTimes()
    chosen = [c for c in configs if case.heavy or not c.heavy]
    for round_ in range(case.rounds):
        for config in chosen:
            run = time_config(case, config, device)
            out.runs.setdefault(config.key, []).append(run)
            what = (
                f"{1e3 * run.skipped:.1f} ms/step"
                if config.key == "plain"
                else f"{1e3 * run.computed:.1f} ms computed, {1e3 * run.skipped:.1f} left out"
            )
            progress(f"{case.key}: round {round_ + 1}/{case.rounds}, {config.key}: {what}")
    return out


# ------------------------------------------------------------------------------ what the constants stand for


class ProductCosts(Callback):
    """On each step's own batch and θ: one gradient, the first exact product (graph + product), a second.

    The gradient is the library's (``FunctionalLoss.gradient``: what a finite-difference product costs);
    the exact products are those of ``HessianOperator`` (double backward, as the monitor's exact products):
    the first builds the gradient graph (``create_graph=True``), the second costs one backward pass through
    it. Seconds per step, CUDA-synchronised.

    Args:
        device: for synchronisation.
        skip: steps left out at the start.
    """

    def __init__(self, device: torch.device, skip: int) -> None:
        self.device = device
        self.skip = skip
        self.gradient: list[float] = []
        self.graph: list[float] = []
        self.hvp: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int):
        record_batch(trainer, batch, idx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any):
        if trainer.global_step < self.skip:
            return
        loss = step_curvature(trainer, pl_module).loss
        generator = torch.Generator().manual_seed(trainer.global_step)
        v = torch.randn(loss.dim, generator=generator).to(loss.params[0])
        operator = HessianOperator(loss, loss.params)
        _, gradient = timed(loss.gradient, self.device)
        _, first = timed(lambda: operator.matvec(v), self.device)
        _, second = timed(lambda: operator.matvec(v), self.device)
        self.gradient.append(gradient)
        self.graph.append(first - second)
        self.hvp.append(second)


def measure_products(case: Case, device: torch.device, seed: int = 0) -> ProductCosts:
    """A plain run (``case.steps`` steps) with :class:`ProductCosts`."""
    pl.seed_everything(seed, verbose=False)
    costs = ProductCosts(device, case.skip)
    make_trainer([costs], case.steps, device).fit(case.make_model(), case.make_data())
    progress(
        f"{case.key}: gradient {1e3 * median(costs.gradient):.1f} ms, graph ÷ gradient "
        f"{median(costs.graph) / median(costs.gradient):.2f}, HVP ÷ gradient "
        f"{median(costs.hvp) / median(costs.gradient):.2f}"
    )
    return costs


# ------------------------------------------------------------------------------------ reference points


@dataclass
class MethodResult:
    """One method's estimate of h0 at a reference point, with its cost."""

    value: float
    seconds: float = math.nan
    hvps: int = 0
    peak_bytes: float = math.nan


REFERENCE_MONITORS = {
    "defaults": {},
    "paper": {"products": "finite_difference", "n_iter": 1},
    "top_k=4": {"products": "finite_difference", "n_iter": 1, "top_k": 4},
    "exact": {"products": "exact"},
}
"""The monitors of the reference run, whose h0 is compared with the Lanczos reference."""


class ReferencePoint(Callback):
    """Competitors and references at given steps, on the monitors' step curvature (same θ, batch, RNG).

    Args:
        monitors: ``{key: monitor}`` placed before this callback.
        steps: optimizer steps at which to run.
        device: for synchronisation and memory statistics.
        lanczos_steps: steps of the reference Lanczos run.
        competitor_lanczos_steps: steps of the competitor Lanczos run.
        exact_limit: also compute ``eigvalsh`` of the dense Hessian when ``N`` is at most this.
        reorth_bytes: full reorthogonalisation only while the Lanczos basis fits in this many bytes.
    """

    def __init__(
        self,
        monitors: dict[str, HessianEigenvalueMonitor],
        steps: tuple[int, ...],
        device: torch.device,
        lanczos_steps: int = 100,
        competitor_lanczos_steps: int = 20,
        exact_limit: int = 3000,
        reorth_bytes: float = 2**30,
    ) -> None:
        self.monitors = monitors
        self.steps = set(steps)
        self.device = device
        self.lanczos_steps = lanczos_steps
        self.competitor_lanczos_steps = competitor_lanczos_steps
        self.exact_limit = exact_limit
        self.reorth_bytes = reorth_bytes
        self.points: list[dict[str, MethodResult]] = []
        self.num_params = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if trainer.global_step not in self.steps:
            return
        curvature = step_curvature(trainer, pl_module)
        loss = curvature.loss
        dim, dtype = loss.dim, loss.params[0].dtype
        self.num_params = dim
        point: dict[str, MethodResult] = {}
        for key, monitor in self.monitors.items():
            est = monitor.latest
            point[key] = MethodResult(est.h0 if est is not None and est.valid else math.nan)

        def run_power() -> tuple[float, int]:
            hvp = hessian_operator(loss)
            result = power_iteration(hvp.matvec, dim, tol=1e-3, max_iter=100, dtype=dtype, device=self.device)
            return result.eigenvalue, hvp.num_hvps

        def run_lanczos(steps: int) -> Callable[[], tuple[float, int]]:
            def go() -> tuple[float, int]:
                hvp = hessian_operator(loss)
                reorth = steps * dim * torch.finfo(dtype).bits / 8 <= self.reorth_bytes
                return lanczos_top(hvp, steps, reorthogonalize=reorth), hvp.num_hvps

            return go

        for key, fn in (
            ("power iteration", run_power),
            (f"Lanczos {self.competitor_lanczos_steps}", run_lanczos(self.competitor_lanczos_steps)),
            ("reference", run_lanczos(self.lanczos_steps)),
        ):
            ((value, hvps), peak), seconds = timed(lambda fn=fn: peak_memory(fn, self.device), self.device)
            point[key] = MethodResult(value, seconds, hvps, peak)
            progress(f"step {trainer.global_step}: {key}: h0 {value:.4g}, {hvps} HVPs, {seconds:.1f} s")
        if dim <= self.exact_limit:
            start = time.perf_counter()
            exact = exact_spectrum(curvature.dense()).h0
            point["eigvalsh"] = MethodResult(exact, time.perf_counter() - start)
        self.points.append(point)


def reference_run(case: Case, device: torch.device, seed: int = 0) -> ReferencePoint:
    """Train with warmed-up monitors and run the competitors at ``case.reference_steps``."""
    pl.seed_everything(seed, verbose=False)
    monitors = {
        key: HessianEigenvalueMonitor(
            warmup_iters=case.reference_warmup_iters, log_prefix=f"{key}/", **kwargs
        )
        for key, kwargs in REFERENCE_MONITORS.items()
    }
    progress(f"{case.key}: reference run, monitors warm up ({case.reference_warmup_iters} products at most)")
    reference = ReferencePoint(
        monitors,
        case.reference_steps,
        device,
        lanczos_steps=case.lanczos_steps,
        competitor_lanczos_steps=case.competitor_lanczos_steps,
        reorth_bytes=(8 if device.type == "cuda" else 1) * 2**30,
    )
    trainer = make_trainer([*monitors.values(), reference], max(case.reference_steps) + 1, device)
    trainer.fit(case.make_model(), case.make_data())
    return reference


@dataclass
class CaseResult:
    """Everything measured for one network."""

    case: Case
    num_params: int
    times: StepTimes
    products: ProductCosts
    reference: ReferencePoint
    seconds: float

    def plain(self) -> float:
        """Median plain step (s) over rounds."""
        return median(self.times.plain())

    def method(self, key: str, attr: str) -> float:
        """Median over reference points of one attribute of one method."""
        return median(getattr(p[key], attr) for p in self.reference.points if key in p)

    def error(self, key: str, against: str = "reference") -> float:
        """Median relative error of a method's value against the reference Lanczos value."""
        return median(
            relative_error(p[key].value, p[against].value)
            for p in self.reference.points
            if key in p and against in p
        )

    def ratio(self, which: str) -> float:
        """Median over steps of the graph's or an exact product's time ÷ one gradient's."""
        times = self.products.graph if which == "graph" else self.products.hvp
        return median(t / g for t, g in zip(times, self.products.gradient, strict=True))


def run_case(case: Case, device: torch.device) -> CaseResult:
    """Step times of every configuration, the product costs, then the reference run."""
    start = time.perf_counter()
    times = measure_steps(case, device)
    products = measure_products(case, device)
    reference = reference_run(case, device)
    return CaseResult(case, reference.num_params, times, products, reference, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- tables


def _cell(values: list[float], spec: str = ".2f", suffix: str = "×") -> str:
    """Median over rounds with the range, e.g. ``1.23× (1.20–1.31)``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    if len(finite) == 1:
        return f"{finite[0]:{spec}}{suffix}"
    return f"{median(finite):{spec}}{suffix} ({min(finite):{spec}}–{max(finite):{spec}})"


def _counted(result: CaseResult, key: str) -> float:
    """Counted gradient-equivalents per computed step: the monitors' own count, the products otherwise."""
    if key == "floor":
        return 1.0
    if key == "spectrum":
        return GRAPH_COST + HVP_COST * spectrum_products(result.case)
    if key == "cgd":
        return GRAPH_COST + HVP_COST * cgd_products()
    return median(result.times.costs(key))


def timing_table(result: CaseResult) -> str:
    """Markdown table of one network: every configuration against the plain step and the floor."""
    times = result.times
    rows = []
    for config in CONFIGS:
        if config.key not in times.runs:
            continue
        if config.key == "plain":
            rows.append(
                [config.label, _cell([1e3 * t for t in times.plain()], ".2f", " ms"), "1", "–", "–", "–", "–"]
            )
            continue
        counted = _counted(result, config.key)
        per_cost = [f / counted for f in times.floors(config.key)] if counted > 0 else []
        rows.append(
            [
                config.label,
                _cell([1e3 * r.computed for r in times.runs[config.key]], ".2f", " ms"),
                _cell(times.paired_ratios(config.key)),
                _cell([1e3 * a for a in times.added(config.key)], ".2f", " ms"),
                _cell(times.floors(config.key)),
                fmt(counted, ".2f"),
                _cell(per_cost),
            ]
        )
    header = [
        "configuration",
        "computed step",
        "÷ left-out step (same run)",
        "added",
        "added ÷ floor's added",
        "counted cost (gradient-eq.)",
        "added ÷ (cost × floor)",
    ]
    return markdown_table(header, rows)


def product_table(results: list[CaseResult]) -> str:
    """Markdown table: what one gradient graph and one exact product cost, in gradients."""
    rows = []
    for r in results:
        rows.append(
            [
                r.case.label,
                fmt(1e3 * median(r.products.gradient), ".1f"),
                fmt(r.ratio("graph"), ".2f"),
                fmt(r.ratio("hvp"), ".2f"),
                str(len(r.products.gradient)),
            ]
        )
    header = [
        "network",
        "one gradient (ms)",
        f"gradient graph ÷ gradient (charged {GRAPH_COST:g})",
        f"exact product ÷ gradient (charged {HVP_COST:g})",
        "steps",
    ]
    return markdown_table(header, rows)


def competitor_table(results: list[CaseResult]) -> str:
    """Markdown table: the competitors' cost in training-step units and against the monitor's overhead."""
    rows = []
    for r in results:
        plain = r.plain()
        power = r.method("power iteration", "seconds")
        lanczos_key = f"Lanczos {r.case.competitor_lanczos_steps}"

        def versus(key: str, r: CaseResult = r, power: float = power) -> str:
            added = median(r.times.added(key))
            return fmt(power / added, ".0f") if added > 0 else "–"

        rows.append(
            [
                r.case.label,
                f"{r.num_params:,}",
                str(r.case.batch),
                fmt(1e3 * plain, ".1f"),
                f"{power / plain:.1f} ({fmt(r.method('power iteration', 'hvps'), '.0f')} HVPs)",
                f"{r.method(lanczos_key, 'seconds') / plain:.1f}",
                f"{r.method('reference', 'seconds') / plain:.1f}",
                versus("paper"),
                versus("defaults"),
            ]
        )
    header = [
        "network",
        "parameters",
        "batch",
        "plain step (ms)",
        "power iteration (steps)",
        "Lanczos 20 (steps)",
        "Lanczos 100 (steps)",
        "power iteration ÷ paper-mode overhead",
        "power iteration ÷ defaults overhead",
    ]
    return markdown_table(header, rows)


def error_table(results: list[CaseResult]) -> str:
    """Markdown table: relative error of each method's h0 against the 100-step Lanczos reference."""
    rows = []
    for r in results:
        lanczos_key = f"Lanczos {r.case.competitor_lanczos_steps}"
        exact = (
            r.error("reference", against="eigvalsh")
            if any("eigvalsh" in p for p in r.reference.points)
            else math.nan
        )
        rows.append(
            [
                r.case.label,
                str(len(r.reference.points)),
                fmt(r.method("reference", "value"), ".4g"),
                *[pct(r.error(key), 2) for key in REFERENCE_MONITORS],
                pct(r.error("power iteration"), 2),
                pct(r.error(lanczos_key), 2),
                pct(exact, 4) if math.isfinite(exact) else "–",
            ]
        )
    header = [
        "network",
        "points",
        "reference h0 (Lanczos 100)",
        *[f"monitor {key}" for key in REFERENCE_MONITORS],
        "power iteration",
        "Lanczos 20",
        "Lanczos 100 vs eigvalsh",
    ]
    return markdown_table(header, rows)


def memory_table(results: list[CaseResult]) -> str:
    """Markdown table: CUDA peak memory each configuration adds, and that of each competitor."""
    keys = [c.key for c in CONFIGS if c.key != "plain"]
    rows = []
    for r in results:
        lanczos_key = f"Lanczos {r.case.competitor_lanczos_steps}"
        rows.append(
            [
                r.case.label,
                fmt(median(run.peak_skipped for run in r.times.runs["plain"]) / 2**20, ".0f"),
                *[fmt(r.times.extra_peak(k) / 2**20, ".0f") if k in r.times.runs else "–" for k in keys],
                fmt(r.method("power iteration", "peak_bytes") / 2**20, ".0f"),
                fmt(r.method(lanczos_key, "peak_bytes") / 2**20, ".0f"),
                fmt(r.method("reference", "peak_bytes") / 2**20, ".0f"),
            ]
        )
    header = ["network", "plain step peak (MiB)", *[f"{k} extra" for k in keys]]
    header += ["power iteration", "Lanczos 20", "Lanczos 100"]
    return markdown_table(header, rows)


def notes(result: CaseResult) -> str:
    """The run's sizes and the settings of the configurations that depart from their defaults."""
    case = result.case
    light = (
        "its defaults"
        if not case.spectrum
        else ", ".join(f"{k}={v}" for k, v in case.spectrum.items())
        + f" ({spectrum_products(case)} exact products per computed step)"
    )
    heavy = (
        f"; the spectrum monitor with {light}, CGD refreshing its directions ({cgd_products()} exact "
        "products) on every other step"
        if case.heavy
        else "; the spectrum monitor and CGD not run (minutes per computed step on this device)"
    )
    return (
        f"{case.label}: N = {result.num_params:,}, batch {case.batch}, {case.rounds} rounds × {case.steps} "
        f"steps per configuration (first {case.skip} left out), monitors warmed up with "
        f"{case.warmup_iters} products at step 0{heavy}; {result.seconds:.0f} s."
    )


def raw(result: CaseResult) -> dict[str, Any]:
    """JSON-friendly record of one case (NaN where nothing was measured; made strict by the caller)."""
    return {
        "key": result.case.key,
        "label": result.case.label,
        "parameters": result.num_params,
        "batch": result.case.batch,
        "runs": {
            key: [{**vars(run), "added": run.added} for run in runs]
            for key, runs in result.times.runs.items()
        },
        "counted_cost": {key: _counted(result, key) for key in result.times.runs if key != "plain"},
        "products": {
            "gradient_seconds": result.products.gradient,
            "graph_seconds": result.products.graph,
            "hvp_seconds": result.products.hvp,
            "graph_over_gradient": result.ratio("graph"),
            "hvp_over_gradient": result.ratio("hvp"),
            "charged": {"GRAPH_COST": GRAPH_COST, "HVP_COST": HVP_COST},
        },
        "points": [{k: vars(v) for k, v in p.items()} for p in result.reference.points],
        "wall_seconds": result.seconds,
    }
