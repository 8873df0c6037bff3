"""The numerical core and CGD load without Lightning: checked in fresh interpreters, on ``sys.modules``."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_chaos.core

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "tensorboard"}
CORE_MODULES = sorted(m.name for m in pkgutil.iter_modules(lightning_chaos.core.__path__))


def loaded_after(statements):
    """Top-level packages in ``sys.modules`` after running ``statements`` in a fresh interpreter."""
    code = "\n".join(
        [
            "import json, sys",
            *statements,
            "import lightning_chaos",
            "print(json.dumps([lightning_chaos.__file__, sorted({m.split('.')[0] for m in sys.modules})]))",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, check=True
    )
    path, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(path).is_relative_to(ROOT)  # this checkout, not another installed copy
    return set(loaded)


def test_every_core_module_is_checked():
    expected = {"operators", "lanczos", "slq", "sgd", "stability", "counts", "tangent_map", "benettin"}
    assert expected <= set(CORE_MODULES)


def test_the_core_and_cgd_load_no_lightning_torchmetrics_or_tensorboard():
    # Importing more modules never unloads any: if all of them together load none of FORBIDDEN, neither does
    # any one of them alone (one interpreter instead of one per module: each start costs a torch import).
    statements = [
        "import lightning_chaos.core",
        "from lightning_chaos import CGD",
        *(f"import lightning_chaos.core.{name}" for name in CORE_MODULES),
    ]
    loaded = loaded_after(statements)
    assert "torch" in loaded  # the check itself works: the core did load
    assert not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)


def test_the_package_imports_lazily():
    loaded = loaded_after([])
    assert not loaded & (FORBIDDEN | {"torch"}), sorted(loaded & (FORBIDDEN | {"torch"}))
    loaded = loaded_after(["import lightning_chaos", "lightning_chaos.LyapunovSpectrumMonitor"])
    assert "lightning" in loaded  # the public names still resolve, loading Lightning only then
    import lightning_chaos as package

    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        package.Nope  # noqa: B018
