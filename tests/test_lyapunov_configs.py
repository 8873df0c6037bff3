"""The Lyapunov YAML configs parse and instantiate with LightningCLI (downloaded datasets swapped out)."""

import json
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_chaos import LyapunovSpectrumMonitor, TangentMapMonitor
from lightning_chaos.data import DigitsDataModule, SyntheticDataModule
from lightning_chaos.models import Classifier

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# input shape each config's network expects (what the real datamodule would serve)
DOWNLOADED = {
    "usps_mlp_sigmoid_lyapunov.yaml": [256],
    "usps_cnn_lyapunov.yaml": [1, 16, 16],
    "fashionmnist_mlp_relu_lyapunov.yaml": [784],
    "fashionmnist_cnn_lyapunov.yaml": [1, 28, 28],
}


def cli(config, *overrides):
    return LightningCLI(
        run=False,
        args=[
            "--config",
            str(EXAMPLES / config),
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            *overrides,
        ],
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
    )


def test_every_lyapunov_config_is_covered():
    configs = {p.name for p in EXAMPLES.glob("*_lyapunov.yaml")}
    assert configs == {*DOWNLOADED, "digits_mlp_lyapunov.yaml"}


@pytest.mark.parametrize("config, shape", DOWNLOADED.items())
def test_downloaded_dataset_configs_instantiate_on_synthetic_data(config, shape):
    synthetic = {
        "class_path": "lightning_chaos.data.SyntheticDataModule",
        "init_args": {"input_shape": shape, "num_classes": 10, "num_samples": 16, "batch_size": 8},
    }
    built = cli(config, f"--data={json.dumps(synthetic)}")
    assert isinstance(built.model, Classifier) and isinstance(built.datamodule, SyntheticDataModule)
    monitors = [c for c in built.trainer.callbacks if isinstance(c, LyapunovSpectrumMonitor)]
    tangents = [c for c in built.trainer.callbacks if isinstance(c, TangentMapMonitor)]
    assert monitors and len(tangents) == 1
    assert len({m.state_key for m in monitors}) == len(monitors)  # several monitors keep separate state
    built.datamodule.setup("fit")
    x, _ = next(iter(built.datamodule.train_dataloader()))
    assert built.model(x).shape == (8, 10)  # the network takes the dataset's input shape


def test_digits_config_trains_and_logs_the_chaos_keys():
    built = cli("digits_mlp_lyapunov.yaml", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false")
    assert isinstance(built.datamodule, DigitsDataModule)
    built.trainer.fit(built.model, built.datamodule)
    metrics = built.trainer.callback_metrics
    for key in ("n_chaotic", "n_stable", "lle_max", "spectrum_exact", "mlce", "mlce_bound", "ftle_0"):
        assert f"chaos/{key}" in metrics, key
    assert float(metrics["chaos/spectrum_exact"]) == 1.0
