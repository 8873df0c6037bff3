"""Cost of the per-step monitor against a plain training step and against the competitors' methods.

Step times are measured on real Lightning ``Trainer`` runs (what users run), with :class:`StepTimer` first in
the callback list: the window is ``on_train_batch_start`` → ``on_train_batch_end`` (forward, backward, every
``on_before_optimizer_step`` including the probe, optimizer step, the module's own logging; not data
loading), CUDA-synchronised at both ends. Every run trains a freshly seeded model for ``steps`` steps and
drops the first ``skip`` (the monitor's warm-up at step 0, allocator and kernel warm-up). Monitors run with
``every_n_steps=2``, so each monitor run alternates monitored and unmonitored steps: the headline ratio is
the median monitored step over the median unmonitored step *of the same run*, a paired measurement that
load from other processes cannot bias towards one side. Configurations are interleaved round by round
(plain, monitor, top-k, quarter, plain, …); tables give the median over rounds with the range, and, for
transparency, the unpaired ratios against the separate plain runs.

The competitors run in a separate *reference run* (monitors warmed up as users run them) at the same point
θ and batch where the monitors estimate: :class:`ReferencePoint`, last in the callback list, takes the shared
probe in ``on_before_optimizer_step`` and times PyHessian-style power iteration (double-backward HVPs,
tol 1e-3) and 20 Lanczos steps, and computes a 100-step Lanczos reference (plus ``eigvalsh`` where the model
is small enough), against which every method's top eigenvalue is compared.
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
from lightning_chaos import HessianEigenvalueMonitor
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.data import DigitsDataModule, SyntheticDataModule
from lightning_chaos.models import MLP, Classifier, ResNet18, SmallResNet


@dataclass
class Case:
    """One network of the timing table and the sizes it runs at on this device."""

    key: str
    label: str
    make_model: Callable[[], pl.LightningModule]
    make_data: Callable[[], pl.LightningDataModule]
    batch: int
    steps: int = 30  # per timing run
    rounds: int = 3
    skip: int = 3
    reference_steps: tuple[int, ...] = (20,)  # steps of the reference run where the competitors run
    warmup_iters: int = 100  # warm-up of the monitors in the reference run
    lanczos_steps: int = 100  # reference
    competitor_lanczos_steps: int = 20
    reference_monitors: tuple[str, ...] = ("monitor", "top_k=4", "quarter")  # monitors of the reference run


@dataclass
class Config:
    """A monitor configuration whose step time is compared with the plain step (``None``: no monitor)."""

    key: str
    label: str
    monitor: dict[str, Any] | None

    def callbacks(self, every_n_steps: int) -> list[Callback]:
        """The callbacks of one timing run; the monitor computes on every ``every_n_steps``-th step."""
        if self.monitor is None:
            return []
        return [HessianEigenvalueMonitor(every_n_steps=every_n_steps, **self.monitor)]


CONFIGS = [
    Config("plain", "plain step", None),
    Config("monitor", "monitor (n_iter 1, top_k 1)", {"warmup_iters": 5}),
    Config("top_k=4", "monitor top_k 4", {"top_k": 4, "warmup_iters": 2}),
    Config("quarter", "monitor, quarter-batch probe", {"probe_fraction": 0.25, "warmup_iters": 5}),
]


def cases(device: torch.device, smoke: bool) -> list[Case]:
    """The three networks, sized for the device (CPU sizes keep a full run within ~15 minutes)."""
    cuda = device.type == "cuda"
    if smoke:

        def tiny_resnet(depth: str) -> Callable[[], pl.LightningModule]:
            cls = SmallResNet if depth == "small" else ResNet18
            return lambda: Classifier(cls(width=2), lr=0.05)

        def tiny_images() -> pl.LightningDataModule:
            return SyntheticDataModule(input_shape=(3, 8, 8), num_samples=32, batch_size=8, num_val_samples=8)

        common = dict(steps=3, rounds=1, skip=1, reference_steps=(1,), warmup_iters=3, lanczos_steps=8)
        return [
            Case(
                "mlp",
                "digits MLP 64-8-10",
                lambda: Classifier(MLP(64, (8,), 10), lr=0.1),
                lambda: DigitsDataModule(batch_size=32, drop_last=True),
                32,
                competitor_lanczos_steps=4,
                **common,
            ),
            Case(
                "small_resnet",
                "small ResNet (width 2)",
                tiny_resnet("small"),
                tiny_images,
                8,
                **common,
                competitor_lanczos_steps=4,
            ),
            Case(
                "resnet18",
                "ResNet-18 (width 2)",
                tiny_resnet("18"),
                tiny_images,
                8,
                **common,
                competitor_lanczos_steps=4,
            ),
        ]

    def images(batch: int) -> Callable[[], pl.LightningDataModule]:
        return lambda: SyntheticDataModule(
            input_shape=(3, 32, 32), num_samples=4 * batch, batch_size=batch, num_val_samples=batch
        )

    small_batch = 512 if cuda else 32
    r18_batch = 512 if cuda else 8
    return [
        Case(
            "mlp",
            "digits MLP 64-32-10 ReLU",
            lambda: Classifier(MLP(64, (32,), 10), lr=0.1),
            lambda: DigitsDataModule(batch_size=128, drop_last=True),
            128,
            steps=100,
            rounds=7 if not cuda else 5,
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
            warmup_iters=100 if cuda else 10,
            reference_monitors=("monitor", "top_k=4", "quarter") if cuda else ("monitor", "quarter"),
        ),
    ]


# --------------------------------------------------------------------------------------------- step times


@dataclass
class RunTimes:
    """Medians of one timing run (seconds; CUDA peaks in bytes above the step's start, nan on CPU).

    A monitor run computes on even steps only (``every_n_steps=2``): ``computed`` and ``skipped`` are the
    medians of its even and odd steps, so their ratio compares a monitored with an unmonitored step of the
    same run, interleaved step by step (the paired measurement). A plain run has only ``skipped`` steps.
    """

    computed: float
    skipped: float
    peak_computed: float
    peak_skipped: float


def time_config(case: Case, config: Config, device: torch.device, seed: int = 0) -> RunTimes:
    """Train ``case.steps`` steps with one configuration; medians of the steps after ``case.skip``."""
    pl.seed_everything(seed, verbose=False)
    timer = StepTimer(device)
    trainer = make_trainer([timer, *config.callbacks(every_n_steps=2)], case.steps, device)
    trainer.fit(case.make_model(), case.make_data())
    indices = range(case.skip, len(timer.times))
    peaks = timer.peaks or [math.nan] * len(timer.times)
    if config.monitor is None:
        plain = median(timer.times[i] for i in indices)
        return RunTimes(math.nan, plain, math.nan, median(peaks[i] for i in indices))
    even = [i for i in indices if i % 2 == 0]
    odd = [i for i in indices if i % 2 == 1]
    return RunTimes(
        median(timer.times[i] for i in even),
        median(timer.times[i] for i in odd),
        median(peaks[i] for i in even),
        median(peaks[i] for i in odd),
    )


@dataclass
class StepTimes:
    """Every configuration's :class:`RunTimes`, one per round."""

    runs: dict[str, list[RunTimes]] = field(default_factory=dict)

    def plain(self) -> list[float]:
        """Per-round plain step (s) from the plain runs."""
        return [r.skipped for r in self.runs["plain"]]

    def computed(self, key: str) -> list[float]:
        """Per-round median monitored step (s) of a configuration."""
        return [r.computed for r in self.runs[key]]

    def paired_ratios(self, key: str) -> list[float]:
        """Per-round monitored ÷ unmonitored step of the same run (the headline ratio)."""
        return [r.computed / r.skipped for r in self.runs[key]]

    def separate_ratios(self, key: str) -> list[float]:
        """Per-round monitored step ÷ the plain run's step of the same round."""
        return [r.computed / p for r, p in zip(self.runs[key], self.plain())]

    def extra_peak(self, key: str) -> float:
        """Median over rounds of the monitored steps' CUDA peak above the unmonitored steps' (bytes)."""
        return median(r.peak_computed - r.peak_skipped for r in self.runs[key])


def measure_steps(case: Case, device: torch.device, configs: list[Config] = CONFIGS) -> StepTimes:
    """Interleaved rounds of all configurations."""
    out = StepTimes()
    for round_ in range(case.rounds):
        for config in configs:
            run = time_config(case, config, device)
            out.runs.setdefault(config.key, []).append(run)
            what = (
                f"{1e3 * run.skipped:.1f} ms/step"
                if config.monitor is None
                else f"{1e3 * run.computed:.1f} ms/step monitored, {1e3 * run.skipped:.1f} unmonitored"
            )
            progress(f"{case.key}: round {round_ + 1}/{case.rounds}, {config.key}: {what}")
    return out


# ------------------------------------------------------------------------------------ reference points


@dataclass
class MethodResult:
    """One method's estimate of h0 at a reference point, with its cost."""

    value: float
    seconds: float = math.nan
    hvps: int = 0
    peak_bytes: float = math.nan
    note: str = ""


class ReferencePoint(Callback):
    """Competitors and references at given steps, on the monitors' probe (same θ, batch and RNG).

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
        probe = step_curvature(trainer, pl_module)
        loss = probe.loss
        dim, dtype = loss.dim, loss.params[0].dtype
        self.num_params = dim
        point: dict[str, MethodResult] = {}
        for key, monitor in self.monitors.items():
            est = monitor.latest
            valid = est is not None and est.valid
            point[key] = MethodResult(est.h0 if valid else math.nan)
            point[key + " (Rayleigh)"] = MethodResult(est.h0_rayleigh if valid else math.nan)

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
            exact = exact_spectrum(probe.dense()).h0
            point["eigvalsh"] = MethodResult(exact, time.perf_counter() - start)
        self.points.append(point)


def reference_run(case: Case, device: torch.device, seed: int = 0) -> ReferencePoint:
    """Train with warmed-up monitors and run the competitors at ``case.reference_steps``."""
    pl.seed_everything(seed, verbose=False)
    kwargs = {"monitor": {}, "top_k=4": {"top_k": 4}, "quarter": {"probe_fraction": 0.25}}
    monitors = {
        key: HessianEigenvalueMonitor(warmup_iters=case.warmup_iters, log_prefix=f"{key}/", **kwargs[key])
        for key in case.reference_monitors
    }
    progress(
        f"{case.key}: reference run, monitors {list(monitors)} warm up ({case.warmup_iters} iterations max)"
    )
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


def run_case(case: Case, device: torch.device) -> CaseResult:
    """Step times of every configuration, then the reference run."""
    start = time.perf_counter()
    times = measure_steps(case, device)
    reference = reference_run(case, device)
    return CaseResult(case, reference.num_params, times, reference, time.perf_counter() - start)


def _ratio_cell(ratios: list[float]) -> str:
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}×"
    return f"{median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def _best_cell(result: CaseResult, key: str) -> str:
    """Fastest round's monitored step ÷ fastest plain run: the quiet-machine estimate."""
    return f"{min(result.times.computed(key)) / min(result.times.plain()):.2f}×"


def timing_table(results: list[CaseResult]) -> str:
    """Markdown table: step-time ratios and competitors' cost in training-step units."""
    rows = []
    for r in results:
        plain = r.plain()
        overhead = median(run.computed - run.skipped for run in r.times.runs["monitor"])
        power = r.method("power iteration", "seconds")
        lanczos_key = f"Lanczos {r.case.competitor_lanczos_steps}"
        rows.append(
            [
                r.case.label,
                f"{r.num_params:,}",
                str(r.case.batch),
                fmt(1e3 * plain, ".1f"),
                _ratio_cell(r.times.paired_ratios("monitor")),
                _ratio_cell(r.times.paired_ratios("top_k=4")),
                _ratio_cell(r.times.paired_ratios("quarter")),
                f"{power / plain:.1f} ({fmt(r.method('power iteration', 'hvps'), '.0f')} HVPs)",
                f"{r.method(lanczos_key, 'seconds') / plain:.1f}",
                f"{r.method('reference', 'seconds') / plain:.1f}",
                fmt(power / overhead, ".0f") if overhead > 0 else "–",
            ]
        )
    header = [
        "network",
        "parameters",
        "batch",
        "plain step (ms)",
        "monitor n_iter 1, top_k 1",
        "top_k 4",
        "quarter-batch probe",
        "power iteration (steps)",
        "Lanczos 20 (steps)",
        "Lanczos 100 (steps)",
        "power iteration ÷ monitor overhead",
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
                pct(r.error("monitor"), 2),
                pct(r.error("monitor (Rayleigh)"), 2),
                pct(r.error("top_k=4"), 2),
                pct(r.error("quarter"), 2),
                pct(r.error("power iteration"), 2),
                pct(r.error(lanczos_key), 2),
                pct(exact, 4) if math.isfinite(exact) else "–",
            ]
        )
    header = [
        "network",
        "points",
        "reference h0 (Lanczos 100)",
        "monitor (e^λ−1)/β",
        "monitor Rayleigh",
        "top_k 4",
        "quarter-batch probe",
        "power iteration",
        "Lanczos 20",
        "Lanczos 100 vs eigvalsh",
    ]
    return markdown_table(header, rows)


def separate_table(results: list[CaseResult]) -> str:
    """Markdown table: the same ratios against the separate plain runs (unpaired), and the fastest rounds."""
    rows = []
    for r in results:
        row = [r.case.label]
        for key in ("monitor", "top_k=4", "quarter"):
            row += [_ratio_cell(r.times.separate_ratios(key)), _best_cell(r, key)]
        rows.append(row)
    header = ["network"]
    for label in ("monitor", "top_k 4", "quarter-batch probe"):
        header += [f"{label}: ÷ plain run", f"{label}: fastest ÷ fastest"]
    return markdown_table(header, rows)


def memory_table(results: list[CaseResult]) -> str:
    """Markdown table: CUDA peak memory of each callback above the plain step, and of each competitor."""
    rows = []
    for r in results:
        lanczos_key = f"Lanczos {r.case.competitor_lanczos_steps}"
        rows.append(
            [
                r.case.label,
                fmt(median(run.peak_skipped for run in r.times.runs["plain"]) / 2**20, ".0f"),
                fmt(r.times.extra_peak("monitor") / 2**20, ".0f"),
                fmt(r.times.extra_peak("top_k=4") / 2**20, ".0f"),
                fmt(r.times.extra_peak("quarter") / 2**20, ".0f"),
                fmt(r.method("power iteration", "peak_bytes") / 2**20, ".0f"),
                fmt(r.method(lanczos_key, "peak_bytes") / 2**20, ".0f"),
                fmt(r.method("reference", "peak_bytes") / 2**20, ".0f"),
            ]
        )
    header = [
        "network",
        "plain step peak (MiB)",
        "monitor extra (MiB)",
        "top_k 4 extra",
        "quarter-batch extra",
        "power iteration",
        "Lanczos 20",
        "Lanczos 100",
    ]
    return markdown_table(header, rows)


def raw(result: CaseResult) -> dict[str, Any]:
    """JSON-friendly record of one case."""
    return {
        "label": result.case.label,
        "parameters": result.num_params,
        "batch": result.case.batch,
        "runs": {key: [vars(run) for run in runs] for key, runs in result.times.runs.items()},
        "points": [{k: vars(v) for k, v in p.items()} for p in result.reference.points],
        "wall_seconds": result.seconds,
    }
