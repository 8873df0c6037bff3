import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).parents[1] / "examples" / "demo.py"


def test_demo_runs_and_writes_logs_and_figures(tmp_path):
    out = subprocess.run(
        [sys.executable, str(DEMO), "--epochs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "digits_mlp" / "version_0"
    assert (run / "curvature.png").stat().st_size > 10_000
    assert (run / "loss.png").exists()
    assert list(run.glob("events.out.tfevents.*"))
    assert "h0 logged on 12 steps" in out.stdout
