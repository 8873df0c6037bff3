"""The benchmark script runs end to end in smoke mode; its reference routines are correct (no timing)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Quadratic
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reference import (  # noqa: E402
    exact_spectrum,
    hessian_operator,
    lanczos_top,
    power_iteration,
)
from benchmarks.run import write_block  # noqa: E402
from lightning_chaos.core.params import unflatten  # noqa: E402
from lightning_chaos.core.probe import FunctionalLoss  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    markdown, raw = out / "README.md", out / "raw.json"
    markdown.write_text("# Benchmarks\n\nhand-written text stays\n")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--device", "cpu"]
        + ["--out", str(markdown), "--json", str(raw)],
        check=True,
        cwd=ROOT,
        timeout=300,
        capture_output=True,
    )
    return markdown.read_text(), json.loads(raw.read_text())


def table_rows(text, header_start):
    """Data rows of the markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_smoke_run_writes_every_table(smoke):
    text, raw = smoke
    assert text.startswith("# Benchmarks\n\nhand-written text stays")
    assert "<!-- BEGIN RESULTS: smoke-cpu -->" in text and "<!-- END RESULTS: smoke-cpu -->" in text
    accuracy = table_rows(text, "| network | monitor configuration |")
    configurations = {row[1] for row in accuracy}
    assert {
        "n_iter=1 (default)",
        "n_iter=2",
        "n_iter=4",
        "probe_fraction=0.25",
        "top_k=4: h0",
    } <= configurations
    assert {row[0] for row in accuracy} == {"digits MLP 64-8-10 relu", "digits MLP 64-8-10 tanh"}
    # gradients per step as documented: n_iter (top_k), +1 for g(θ) on a sub-batch
    grads = {(row[0], row[1]): row[2] for row in accuracy}
    assert grads[("digits MLP 64-8-10 relu", "n_iter=4")] == "4"
    assert grads[("digits MLP 64-8-10 relu", "probe_fraction=0.25")] == "2"
    bias = table_rows(text, "| network | Δq |")
    assert len(bias) == 2 * 5
    timing = table_rows(text, "| network | parameters | batch |")
    assert [row[0] for row in timing] == [
        "digits MLP 64-8-10",
        "small ResNet (width 2)",
        "ResNet-18 (width 2)",
    ]
    assert all(row[4].endswith("×") for row in timing)  # a ratio for the monitor on every network
    errors = table_rows(text, "| network | points | reference h0")
    assert len(errors) == 3
    exact_slq = table_rows(text, "| network | lr | N | points |")
    assert [row[:4] for row in exact_slq] == [["digits MLP 64-8-10 relu", "0.1", "610", "2"]]
    assert all(cell.endswith("%") for cell in exact_slq[0][4:9])  # median / max error per tolerance
    large = table_rows(text, "| network | N | step |")
    assert [row[2] for row in large] == ["0", "2"]
    assert len(raw["timing"]) == 3 and len(raw["accuracy"]) == 2
    assert len(raw["slq"]["exact"]) == 1 and len(raw["slq"]["large"]["points"]) == 2


def test_results_block_is_replaced_not_duplicated(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("intro\n\n<!-- BEGIN RESULTS: cpu -->\nold\n<!-- END RESULTS: cpu -->\n\noutro\n")
    write_block(path, "cpu", "<!-- BEGIN RESULTS: cpu -->\nnew\n<!-- END RESULTS: cpu -->")
    write_block(path, "cuda", "<!-- BEGIN RESULTS: cuda -->\ngpu\n<!-- END RESULTS: cuda -->")
    text = path.read_text()
    assert "old" not in text and text.count("new") == 1 and text.index("outro") < text.index("gpu")
    assert text.startswith("intro")


def test_competitors_find_the_planted_top_eigenvalue():
    eigenvalues = torch.linspace(-1.0, 3.0, 30, dtype=torch.float64)
    eigenvalues[0] = 10.0  # h0 = 10, gap to 3 makes power iteration converge quickly
    model = Quadratic(eigenvalues)
    loss = FunctionalLoss(model, model)
    hvp = hessian_operator(loss)
    torch.testing.assert_close(hvp.matvec(torch.eye(30, dtype=torch.float64)[:, 3]), model.A[:, 3])
    power = power_iteration(hvp.matvec, 30, tol=1e-8, dtype=torch.float64)
    assert power.converged and power.eigenvalue == pytest.approx(10.0, rel=1e-6)
    assert lanczos_top(hvp, 30) == pytest.approx(10.0, rel=1e-10)
    assert lanczos_top(hvp, 30, reorthogonalize=False) == pytest.approx(10.0, rel=1e-8)
    assert lanczos_top(hvp, 3) < 10.0  # from inside the spectrum before it converged


def test_exact_spectrum_of_a_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    loss = FunctionalLoss(net, lambda: nn.functional.mse_loss(net(x), y))
    hessian = torch.func.hessian(lambda theta: loss(unflatten(theta, loss.params)))(loss.theta())
    torch.testing.assert_close(hessian_operator(loss).to_dense(), hessian)
    spectrum = exact_spectrum(hessian)
    torch.testing.assert_close(spectrum.eigenvalues, torch.linalg.eigvalsh(hessian).flip(0))
    assert spectrum.top_vector_residual < 1e-8
    assert abs(float(spectrum.top_vector @ torch.linalg.eigh(hessian).eigenvectors[:, -1])) == pytest.approx(
        1.0
    )
