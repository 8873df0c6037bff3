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
from lightning_chaos.core.functional_loss import FunctionalLoss  # noqa: E402
from lightning_chaos.core.params import unflatten  # noqa: E402


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
    return markdown.read_text(), _strict_json(raw.read_text())


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
    from benchmarks.timing import CONFIGS

    text, raw = smoke
    assert text.startswith("# Benchmarks\n\nhand-written text stays")
    assert "<!-- BEGIN RESULTS: smoke-cpu -->" in text and "<!-- END RESULTS: smoke-cpu -->" in text
    networks = ["digits MLP 64-8-10", "small ResNet (width 2)", "ResNet-18 (width 2)"]
    # one timing table per network: every configuration, the floor, multiples of the floor's added time
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("| configuration | computed step |")]
    assert len(starts) == len(networks)
    for start in starts:
        rows = table_rows("\n".join(lines[start:]), "| configuration | computed step |")
        assert [row[0] for row in rows] == [config.label for config in CONFIGS]
        floor = next(row for row in rows if row[0].startswith("floor"))
        assert floor[4].startswith("1.00×") and floor[5] == "1.00"
        assert all(
            row[4].endswith("×") and row[6].endswith("×") for row in rows[1:]
        )  # multiples of the floor
    products = table_rows(text, "| network | one gradient (ms) |")
    assert [row[0] for row in products] == networks
    competitors = table_rows(text, "| network | parameters | batch |")
    assert [row[0] for row in competitors] == networks
    assert all("HVPs" in row[4] for row in competitors)  # power iteration, in training steps
    errors = table_rows(text, "| network | points | reference h0")
    assert len(errors) == 3
    exact_slq = table_rows(text, "| network | lr | N | points |")
    assert [row[:4] for row in exact_slq] == [["digits MLP 64-8-10 relu", "0.1", "610", "2"]]
    assert all(cell.endswith("%") for cell in exact_slq[0][4:9])  # median / max error per tolerance
    large = table_rows(text, "| network | N | step |")
    assert [row[2] for row in large] == ["0", "2"]
    assert {"date", "command", "git", "machine", "timing", "slq"} <= set(raw)
    assert [case["label"] for case in raw["timing"]] == networks
    assert set(raw["timing"][0]["runs"]) == {config.key for config in CONFIGS}
    assert {"graph_over_gradient", "hvp_over_gradient"} <= set(raw["timing"][0]["products"])
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


# ------------------------------------------------------------------ per-step h0 suite (benchmarks/suite.py)


def _strict_json(text):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def suite_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    markdown, raw = out / "README.md", out / "suite.json"
    markdown.write_text("# Benchmarks\n\nhand-written text stays\n")
    monitors = ["--monitor", "{}", "--monitor", '{"n_iter": 2, "label": "two"}']
    subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--smoke", "--out", str(markdown), "--json", str(raw)]
        + monitors,
        check=True,
        cwd=ROOT,
        timeout=600,
        capture_output=True,
    )
    return markdown.read_text(), _strict_json(raw.read_text())


def test_suite_smoke_writes_every_table_and_a_strict_json_record(suite_smoke):
    from benchmarks.suite import CASES, DELTA_QS

    text, raw = suite_smoke
    assert text.startswith("# Benchmarks\n\nhand-written text stays")
    assert (
        "<!-- BEGIN RESULTS: smoke-cpu-suite -->" in text and "<!-- END RESULTS: smoke-cpu-suite -->" in text
    )
    labels = [f"{case.label} (smoke size)" for case in CASES.values()]
    main = table_rows(text, "| model | monitor | N | points |")
    assert [(row[0], row[1]) for row in main] == [(label, m) for label in labels for m in ("defaults", "two")]
    assert all(row[4].endswith("%") and row[-1] for row in main)  # a median error and a verdict everywhere
    warm = table_rows(text, "| model | monitor | step | exact h0 |")
    assert [row[2] for row in warm] == ["0"] * len(main)
    fd = table_rows(text, "| model | points | Δq |")
    assert [row[0] for row in fd] == [label for label in labels for _ in DELTA_QS]
    spectrum = table_rows(text, "| model | points | exact h0 |")
    assert [row[0] for row in spectrum] == labels
    assert {"date", "command", "git", "machine", "settings", "criteria", "monitors", "cases"} <= set(raw)
    assert [m["label"] for m in raw["monitors"]] == ["defaults", "two"]
    assert [c["key"] for c in raw["cases"]] == list(CASES)
    for case in raw["cases"]:
        assert set(case["summaries"]) == {"defaults", "two"}
        summary = case["summaries"]["defaults"]
        assert {
            "points",
            "median_abs_err",
            "p90_abs_err",
            "flagged_share",
            "flagged_median_abs_err",
            "flagged_p90_abs_err",
            "flagged_off_share",
            "off_share",
            "mean_gradients",
            "warmup",
            "criteria",
        } <= set(summary)
        assert summary["points"] == 3  # 4 steps, the first is the warm-up
        records = case["records"]
        assert [r["step"] for r in records] == [0, 1, 2, 3]
        assert all(r["eig_residual"] < 1e-8 for r in records)
        assert {"defaults", "two"} == set(records[0]["monitors"])
        assert {"h0", "h0_rayleigh", "h0_residual", "num_gradients", "converged"} <= set(
            records[0]["monitors"]["defaults"]
        )
        diag = [r["diag"] for r in records if r["diag"] is not None]
        assert len(diag) == 1 and len(diag[0]["by_delta_q"]) == len(DELTA_QS)
        cross = records[0]["crosscheck"]  # smoke sizes: every model is cross-checked densely
        assert cross is not None and cross["h0_rel_diff"] < 1e-8


@pytest.mark.parametrize("key", ["bn_cnn", "transformer"])
def test_suite_reference_leaves_training_bit_identical(key):
    from benchmarks.suite import CASES, monitor_specs, run_case

    states = []
    for with_reference in (True, False):
        _, module = run_case(
            CASES[key],
            monitor_specs([{}]),
            steps=3,
            every=1,
            skip=1,
            diag_points=1,
            hmin="all",
            dtype=torch.float64,
            crosscheck_max_n=10**9,
            smoke=True,
            seed=0,
            device=torch.device("cpu"),
            with_reference=with_reference,
        )
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_suite_oracle_finds_the_closed_form_spectrum_of_the_linear_model():
    from benchmarks.exact import BatchLoss, ExactHessian, top_eigen
    from benchmarks.suite_models import BoringLinear, boring_loss

    torch.manual_seed(0)
    module = BoringLinear()
    x = torch.randn(4, 32)
    # mean over 4 samples × 2 outputs of (w_o·x + b_o − 1)²: each output's block is ZᵀZ / 4, z = (x, 1)
    z = torch.cat([x, torch.ones(4, 1)], 1).double()
    gram = torch.linalg.eigvalsh(z.T @ z / 4)
    eig = top_eigen(ExactHessian(BatchLoss(module, (x,), boring_loss, torch.float64)), k=2, smallest=True)
    assert eig.h0 == pytest.approx(float(gram[-1]), rel=1e-10)
    assert eig.h1 == pytest.approx(float(gram[-1]), rel=1e-10)  # both outputs: a double eigenvalue
    assert abs(eig.h_min) < 1e-10  # rank 4 per block in 33 dimensions
    assert eig.residual < 1e-12


def test_suite_oracle_matches_finite_differences_through_layernorm_and_batchnorm():
    from benchmarks.exact import BatchLoss, ExactHessian, dense_crosscheck, top_eigen

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss = BatchLoss(net, (x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), torch.float64)
    hessian = ExactHessian(loss)
    n = hessian.dim
    dense = torch.stack([hessian.matvec(e) for e in torch.eye(n, dtype=torch.float64)], 1)
    theta, h = loss.theta(), 1e-5
    fd = torch.stack(
        [
            (loss.gradient(theta + h * e) - loss.gradient(theta - h * e)) / (2 * h)
            for e in torch.eye(n).double()
        ],
        1,
    )
    torch.testing.assert_close(dense, fd, rtol=1e-6, atol=1e-7)
    eig = top_eigen(hessian, k=2, smallest=True)
    exact = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
    assert eig.h0 == pytest.approx(float(exact[-1]), rel=1e-9)
    assert eig.h1 == pytest.approx(float(exact[-2]), rel=1e-9)
    assert eig.h_min == pytest.approx(float(exact[0]), rel=1e-9)
    cross = dense_crosscheck(loss, theta)
    assert cross["autograd"]["h0"] == pytest.approx(float(exact[-1]), rel=1e-10)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # running stats untouched


def test_suite_summary_counts_flags_errors_and_cost():
    from benchmarks.suite import CaseResult, StepRecord, summarize

    def rec(step, h0, estimate, converged):
        m = {"fresh": True, "valid": True, "h0": estimate, "logged_h0": estimate, "h0_rayleigh": estimate}
        m.update(h0_residual=0.0, num_gradients=2.0, converged=converged, warmup_iterations=7)
        return StepRecord(step, h0, 0.5 * h0, -1.0, 0.0, 20, 0.0, None, 0.0, 0.0, {"m": m})

    estimates = [(2.0, 1.0, True), (1.0, 1.0, True), (1.0, 1.05, True), (1.0, 1.5, True), (1.0, 0.5, False)]
    records = [rec(i, h, e, c) for i, (h, e, c) in enumerate(estimates)]
    computed = [{"step": r.step, "m": r.monitors["m"]} for r in records]
    result = CaseResult("k", "k", 1, 5, 1, "float64", False, 0.0, 0.0, records, computed)
    s = summarize(result, "m", skip=1)
    assert s["points"] == 4 and s["warmup"]["abs_err"] == pytest.approx(0.5)
    assert s["warmup"]["warmup_iterations"] == 7
    assert s["median_abs_err"] == pytest.approx(0.275)  # errors 0, 0.05, 0.5, 0.5
    assert s["flagged_share"] == pytest.approx(0.75)
    assert s["flagged_median_abs_err"] == pytest.approx(0.05)
    assert s["flagged_off_share"] == pytest.approx(0.25) and s["off_share"] == pytest.approx(0.5)
    assert s["mean_gradients"] == pytest.approx(2.0)
    assert s["criteria"] == {
        "median": False,
        "p90": False,
        "converged": False,
        "flagged_off": False,
        "cost": True,
    }
    for r in records:  # without a `converged` attribute every valid estimate counts as flagged
        r.monitors["m"]["converged"] = None
    s = summarize(result, "m", skip=1)
    assert s["flagged_share"] is None and s["flagged_off_share"] == pytest.approx(0.5)
    assert s["criteria"]["converged"] is None


def test_suite_reads_estimates_before_and_after_the_flag_and_a_renamed_count():
    from types import SimpleNamespace

    from benchmarks.suite import MemoryLogger, SameBatchReference, Settings

    logger = MemoryLogger()
    old = SimpleNamespace(valid=True, h0=2.0, h0_rayleigh=1.9, h0_residual=0.1, num_gradients=1)
    new = SimpleNamespace(
        valid=True, h0=2.0, h0_rayleigh=1.9, h0_residual=0.1, probe_gradients=3, converged=False
    )
    monitors = {"old": (SimpleNamespace(latest=old), "a/"), "new": (SimpleNamespace(latest=new), "b/")}
    settings = Settings(1, torch.float64, frozenset(), frozenset(), frozenset(), 0)
    reference = SameBatchReference(monitors, logger, None, settings)
    logger.log_metrics({"a/h0": 2.0, "b/h0": 2.0, "b/h0_converged": 0.0})
    read = {label: reference._read(label, m, prefix) for label, (m, prefix) in monitors.items()}
    assert read["old"]["num_gradients"] == 1 and read["old"]["converged"] is None
    assert read["new"]["num_gradients"] == 3 and read["new"]["converged"] is False
    assert read["new"]["logged_h0"] == 2.0
    assert reference._read("old", *monitors["old"]) == {"fresh": False}  # the same estimate again: stale


def test_krylov_growth_runs_its_full_step(capsys):
    from benchmarks import krylov_growth

    krylov_growth.main(["--dim", "500", "--products", "6", "--repeats", "1"])
    assert "N = 500, 6 products" in capsys.readouterr().out
