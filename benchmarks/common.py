"""Shared plumbing of the benchmarks: devices, timers, statistics, Lightning trainers, markdown tables."""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

T = TypeVar("T")


_START = time.perf_counter()


def progress(message: str) -> None:
    """One line of progress on stderr (the tables go to stdout and ``--out``)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def quiet() -> None:
    """Silence Lightning's banners and the warnings that benchmark trainers trigger on purpose."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*The number of training batches.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        ".*Tensor Cores.*",
        ".*`training_step` returned `None`.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a device is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device: torch.device) -> str:
    """Human-readable name of the machine the numbers come from."""
    torch_info = f"torch {torch.__version__}, lightning {pl.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), "
            f"CUDA {torch.version.cuda}, {torch_info}"
        )
    return (
        f"CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs), {torch.get_num_threads()} torch thread(s), "
        f"{platform.system()} {platform.machine()}, {torch_info}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``fn`` once and return ``(result, seconds)``, synchronising CUDA on both ends."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def peak_memory(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``fn`` and return ``(result, peak bytes allocated above the level at entry)``; nan on CPU."""
    if device.type != "cuda":
        return fn(), math.nan
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    return out, float(torch.cuda.max_memory_allocated(device) - base)


class StepTimer(Callback):
    """Wall time (and CUDA peak memory) of every training step, from batch start to batch end.

    Put it first in the callback list: Lightning calls callback hooks in list order, so the window
    ``on_train_batch_start`` → ``on_train_batch_end`` then spans the other callbacks' batch-start hooks,
    the forward and backward pass, every ``on_before_optimizer_step`` (where the curvature probes run),
    the optimizer step and the module's logging. Data loading and host-to-device transfer of the batch
    happen before ``on_train_batch_start`` and are not included.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.peaks: list[float] = []
        self._start = 0.0
        self._base = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int):
        synchronize(self.device)
        if self.device.type == "cuda":
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        if self.device.type == "cuda":
            self.peaks.append(float(torch.cuda.max_memory_allocated(self.device) - self._base))


class OneGradient(Callback):
    """The floor of every probe: one extra ``torch.autograd.grad`` of the same loss on the same batch.

    On the optimizer steps with ``global_step % every_n_steps == phase``, in ``on_before_optimizer_step``
    (where the monitors probe), it evaluates ``pl_module.curvature_loss(batch)`` at the current θ and takes
    its gradient with respect to the trainable parameters, which it discards. Nothing a monitor needs
    beyond that (perturbed parameters, a functional call, the iteration, logging) is done: the time it adds
    is what one extra gradient costs, the least a one-gradient probe can add.
    """

    def __init__(self, every_n_steps: int = 2, phase: int = 0) -> None:
        self.every_n_steps = every_n_steps
        self.phase = phase
        self._batch: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int):
        self._batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any):
        if trainer.global_step % self.every_n_steps != self.phase:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        with torch.enable_grad():
            torch.autograd.grad(pl_module.curvature_loss(self._batch), params, allow_unused=True)


def make_trainer(callbacks: Sequence[Callback], max_steps: int, device: torch.device) -> pl.Trainer:
    """A bare Trainer: no logger, checkpoints, progress bar, summary or validation (nothing but steps)."""
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )


def median(values: Iterable[float]) -> float:
    """Median of the finite values (nan if none)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def quantile(values: Iterable[float], q: float) -> float:
    """Linear-interpolation quantile of the finite values (nan if none)."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    pos = q * (len(finite) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return finite[lo] + (finite[hi] - finite[lo]) * (pos - lo)


def relative_error(estimate: float, exact: float) -> float:
    """``|estimate − exact| / |exact|``."""
    return abs(estimate - exact) / abs(exact) if exact != 0 else math.nan


def fmt(value: Any, spec: str = ".3g") -> str:
    """Format a number for a table cell; nan/None become an en dash."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return format(value, spec)


def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage cell."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{100 * value:.{digits}f} %"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """GitHub markdown table (cells are str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_block(tag: str, sections: list[str]) -> str:
    return (
        f"<!-- BEGIN RESULTS: {tag} -->\n" + "\n\n".join(sections).strip() + f"\n<!-- END RESULTS: {tag} -->"
    )


def write_block(path: Path, tag: str, block: str) -> None:
    """Replace the results block of ``tag`` in ``path`` (or append it)."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(
        rf"^<!-- BEGIN RESULTS: {re.escape(tag)} -->$.*?^<!-- END RESULTS: {re.escape(tag)} -->$",
        re.DOTALL | re.MULTILINE,
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
