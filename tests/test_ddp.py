"""DDP on two CPU processes (gloo): one estimate of the global-batch Hessian, identical on every rank."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_chaos import HessianEigenvalueMonitor


class LeastSquares(pl.LightningModule):
    """Linear regression: the Hessian (2/n)[X 1]ᵀ[X 1] is known exactly from the batch."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x).squeeze(-1) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def exact_h0(x):
    design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    return torch.linalg.eigvalsh(2 * design.T @ design / x.shape[0])[-1].item()


class CheckGlobal(Callback):
    """Placed after the monitor: records its estimate, the other rank's and the exact global-batch h0.

    The records go to one JSON file per rank, which the test reads in the main process: a hook that never
    ran (or a worker that died) fails the test instead of passing silently.
    """

    def __init__(self, monitor, directory):
        self.monitor, self.directory = monitor, str(directory)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.x = batch[0]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        est = self.monitor.latest
        values = torch.tensor([est.h0, est.beta, float(est.converged)], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(values)
        x = trainer.strategy.all_gather(self.x).reshape(-1, 6)
        record = {
            "step": trainer.global_step,
            "valid": est.valid,
            "ranks": gathered.tolist(),
            "global_h0": exact_h0(x),
            "local_h0": exact_h0(self.x),
        }
        with open(f"{self.directory}/rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class DestroyProcessGroup(Callback):
    """Destroys the gloo process group in each worker after the Trainer's teardown.

    Lightning registers this only for NCCL; a gloo group left to interpreter shutdown intermittently
    aborted a worker ("terminate called without an active exception") after ``fit`` had finished.
    """

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@pytest.fixture
def file_system_sharing():
    """Tensors reach the spawned workers through shared memory; fd passing is refused in some sandboxes."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(previous)


def test_ddp_estimate_is_the_global_batch_hessian_on_every_rank(file_system_sharing, tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen) * torch.linspace(0.5, 3.0, 6)
    y = torch.randn(64, generator=gen)
    monitor = HessianEigenvalueMonitor(warmup_iters=500, warmup_tol=1e-6, tol=1e-6, budget=math.inf, n_iter=7)
    callbacks = [monitor, CheckGlobal(monitor, tmp_path), DestroyProcessGroup()]
    tr = trainer(callbacks, strategy="ddp_spawn", devices=2, max_steps=3)
    tr.fit(LeastSquares(), DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    records = [
        [json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert [[r["step"] for r in rank] for rank in records] == [[0, 1, 2]] * 2  # the hook ran on every step
    for rank in records:
        for r in rank:
            assert r["valid"]
            (h0_a, beta_a, conv_a), (h0_b, beta_b, conv_b) = r["ranks"]
            assert (h0_a, beta_a, conv_a) == (h0_b, beta_b, conv_b)  # identical on both ranks
            # 7 exact products span the whole 7-dimensional Hessian: the global batch's h0, not a rank's
            assert (
                abs(r["local_h0"] - r["global_h0"]) / r["global_h0"] > 0.01
            )  # the check can tell them apart
            assert conv_a == 1.0 and abs(h0_a - r["global_h0"]) / r["global_h0"] < 1e-4, r
    strip = [[{k: v for k, v in r.items() if k != "local_h0"} for r in rank] for rank in records]
    assert strip[0] == strip[1]  # the same estimates, the same global batch, on both ranks
