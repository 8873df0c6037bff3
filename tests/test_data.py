import bz2
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from lightning_chaos import data
from lightning_chaos.data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    SyntheticDataModule,
    USPSDataModule,
)

CIFAR_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


pytestmark = pytest.mark.usefixtures("no_network")


def batches(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------------------- CIFAR-10


def cifar_batch(n, offset, rng):
    """A batch dict as in the original files; sample i has label (offset + i) % 10 and its channels are
    filled with the constants 3*label, 3*label+1, 3*label+2 except for random noise in row 0."""
    labels = [(offset + i) % 10 for i in range(n)]
    images = np.repeat(np.array(labels, dtype=np.uint8)[:, None] * 3, 3, axis=1) + np.arange(
        3, dtype=np.uint8
    )
    images = np.repeat(images[:, :, None], 1024, axis=2)  # (n, 3, 1024): R plane, G plane, B plane
    images[:, :, :32] = rng.integers(0, 256, size=(n, 3, 32), dtype=np.uint8)
    return {
        b"batch_label": b"testing batch",
        b"labels": labels,
        b"data": images.reshape(n, 3072),
        b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)],
    }


def write_cifar(root, n=20, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(cifar_batch(n, 7 * i, rng), protocol=protocol))
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(n, 3, rng), protocol=protocol))
    meta = {b"num_cases_per_batch": n, b"label_names": CIFAR_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_parses_original_pickles(tmp_path, protocol):
    write_cifar(tmp_path, protocol=protocol)
    dm = CIFAR10DataModule(
        tmp_path, batch_size=16, augment=False, normalize=False, download=False, shuffle=False
    )
    assert (dm.num_classes, dm.input_shape, dm.num_features) == (10, (3, 32, 32), 3072)
    dm.setup("fit")
    x, y = batches(dm.train_dataloader())
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y[:20], (torch.arange(20) + 7) % 10)
    # channel layout: plane c of a sample with label l holds 3*l + c (rows 1.. are constant)
    expected = (3 * y[:, None] + torch.arange(3)).float() / 255
    assert torch.allclose(x[:, :, 1:, :].mean((2, 3)), expected)
    x_val, y_val = batches(dm.val_dataloader())
    assert len(y_val) == 20 and torch.equal(y_val, (torch.arange(20) + 3) % 10)
    assert dm.test_set is dm.val_set
    assert dm.class_names == [n.decode() for n in CIFAR_NAMES]


def test_cifar_two_classes_and_relabelling(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(tmp_path, classes="planes_cars", augment=False, normalize=False, download=False)
    assert dm.num_classes == 2
    dm.setup()
    x, y = dm.train_set.tensors
    assert len(y) == 20 and set(y.tolist()) == {0, 1}
    assert torch.equal(x[y == 1][:, :, 1:].float().mean((0, 2, 3)), torch.tensor([3.0, 4.0, 5.0]))  # cars
    assert dm.class_names == ["airplane", "automobile"]

    dm = CIFAR10DataModule(tmp_path, classes=[9, 3], augment=False, normalize=False, download=False)
    dm.setup()
    x, y = dm.train_set.tensors
    assert set(y.tolist()) == {0, 1} and dm.class_names == ["truck", "cat"]
    assert (x[y == 0][:, 0, 1:] == 27).all() and (x[y == 1][:, 0, 1:] == 9).all()


def test_cifar_normalisation_augmentation_and_flatten(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(tmp_path, batch_size=100, download=False, shuffle=False, augment=False)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)

    torch.manual_seed(0)
    dm = CIFAR10DataModule(
        tmp_path, batch_size=100, download=False, shuffle=False, augment=True, normalize=False
    )
    dm.setup()
    clean = dm.train_set.tensors[0].float() / 255
    augmented, _ = next(iter(dm.train_dataloader()))
    assert augmented.shape == clean.shape and not torch.equal(augmented, clean)
    # every augmented image is a shifted (zero-padded), possibly mirrored, copy of the original
    padded = torch.nn.functional.pad(clean, (4, 4, 4, 4))
    for a, p in zip(augmented[:10], padded[:10], strict=True):
        crops = [p[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.allclose(a, c) or torch.allclose(a, c.flip(-1)) for c in crops)
    val_x, _ = next(iter(dm.val_dataloader()))  # no augmentation outside training
    assert torch.allclose(val_x, dm.val_set.tensors[0].float() / 255)

    dm = CIFAR10DataModule(tmp_path, batch_size=8, download=False, flatten=True, classes=[0, 1])
    assert dm.input_shape == (3072,)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3072) and y.max() <= 1


def test_cifar_missing_files_raise_clear_error(tmp_path):
    dm = CIFAR10DataModule(tmp_path / "nowhere", download=False)
    dm.prepare_data()  # download=False: nothing to do, and no network
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py" / "data_batch_1") in message
    assert "cifar-10-python.tar.gz" in message and "download=True" in message


def cifar_archive(tmp_path):
    source = write_cifar(tmp_path / "src")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    return buffer.getvalue()


class FakeResponse(io.BytesIO):
    pass


def test_cifar_download_verifies_and_extracts(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return FakeResponse(archive)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    resource = data._Resource(
        "cifar-10-python.tar.gz", ("https://example.invalid/c.tgz",), hashlib.md5(archive).hexdigest()
    )
    monkeypatch.setattr(data, "_CIFAR10_ARCHIVE", resource)
    dm = CIFAR10DataModule(tmp_path / "data", augment=False)
    dm.prepare_data()
    assert requested == ["https://example.invalid/c.tgz"]
    dm.setup()
    assert len(dm.train_set) == 100
    dm.prepare_data()  # files present: no second download
    assert len(requested) == 1


def test_cifar_download_failures(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(archive))
    monkeypatch.setattr(
        data, "_CIFAR10_ARCHIVE", data._Resource("c.tar.gz", ("https://example.invalid/c",), "0" * 32)
    )
    with pytest.raises(DatasetNotFoundError, match="does not match the expected") as info:
        CIFAR10DataModule(tmp_path / "a").prepare_data()
    assert "by hand" in str(info.value)
    assert not list((tmp_path / "a").glob("*.part")) and not (tmp_path / "a" / "c.tar.gz").exists()

    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="no route to host"):
        CIFAR10DataModule(tmp_path / "b").prepare_data()


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    dm = CIFAR10DataModule(tmp_path, download=False)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        dm.setup()


@pytest.mark.parametrize(
    "classes, match",
    [
        ("trucks", "planes_cars"),
        ([0], "at least two"),
        ([1, 1], "distinct"),
        ([0, 10], r"0\.\.9"),
        ([0, True], "class indices"),
    ],
)
def test_class_selection_validation(classes, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule("unused", classes=classes)


# ------------------------------------------------------------------------------------------ FashionMNIST


def write_idx(path, array):
    magic = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(magic + dims + array.astype(np.uint8).tobytes())


def write_fashion(root, n_train=30, n_test=10):
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28))
        images[:, 0, 0] = labels  # tag each image with its label
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_idx_magic_numbers(tmp_path):
    folder = write_fashion(tmp_path)
    with gzip.open(folder / "train-images-idx3-ubyte.gz") as f:
        assert f.read(4) == b"\x00\x00\x08\x03"
    with gzip.open(folder / "train-labels-idx1-ubyte.gz") as f:
        assert f.read(4) == b"\x00\x00\x08\x01"


def test_fashion_parses_idx_files(tmp_path):
    write_fashion(tmp_path)
    dm = FashionMNISTDataModule(tmp_path, batch_size=8, normalize=False, download=False, shuffle=False)
    assert (dm.num_classes, dm.input_shape, dm.num_features) == (10, (1, 28, 28), 784)
    dm.setup()
    x, y = batches(dm.train_dataloader())
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.arange(30) % 10)
    assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())
    assert 0 <= x.min() and x.max() <= 1
    assert len(dm.val_set) == 10 and dm.class_names[0] == "T-shirt/top"

    dm = FashionMNISTDataModule(tmp_path, batch_size=64, flatten=True, classes=[4, 2], download=False)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 784) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert dm.class_names == ["Coat", "Pullover"]


def test_fashion_validation_split_is_stratified_and_seeded(tmp_path):
    write_fashion(tmp_path, n_train=200)
    dm = FashionMNISTDataModule(tmp_path, val_fraction=0.1, seed=3, download=False)
    dm.setup()
    assert len(dm.train_set) == 180 and len(dm.val_set) == 20 and len(dm.test_set) == 10
    assert torch.equal(torch.bincount(dm.val_set.tensors[1]), torch.full((10,), 2))
    other = FashionMNISTDataModule(tmp_path, val_fraction=0.1, seed=3, download=False)
    other.setup()
    assert torch.equal(other.val_set.tensors[0], dm.val_set.tensors[0])
    moved = FashionMNISTDataModule(tmp_path, val_fraction=0.1, seed=4, download=False)
    moved.setup()
    assert not torch.equal(moved.val_set.tensors[0], dm.val_set.tensors[0])


def test_fashion_rejects_corrupt_files(tmp_path):
    folder = write_fashion(tmp_path)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"\x00" * 12)  # image magic in a label file
    with pytest.raises(ValueError, match="magic"):
        FashionMNISTDataModule(tmp_path, download=False).setup()
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(7) % 10)  # 10 images, 7 labels
    with pytest.raises(ValueError, match="10 images but 7 labels"):
        FashionMNISTDataModule(tmp_path, download=False).setup()


def test_fashion_missing_files(tmp_path):
    folder = write_fashion(tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        FashionMNISTDataModule(tmp_path, download=False).setup()
    message = str(info.value)
    assert str(folder / "t10k-images-idx3-ubyte.gz") in message and "train-images" not in message
    assert "fashion-mnist" in message


# -------------------------------------------------------------------------------------------------- USPS


def usps_line(label, values, sparse=False):
    items = [f"{i + 1}:{v:.6f}" for i, v in enumerate(values) if not (sparse and v == 0)]
    return f"{label} " + " ".join(items) + " \n"


def write_usps(root, n_train=20, n_test=10):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name, n in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        lines = []
        for i in range(n):
            values = rng.uniform(-1, 1, 256).round(6)
            values[::7] = 0.0  # sparse lines omit these
            values[3] = (i % 10) / 10  # tag: label-dependent pixel (row 0, column 3)
            lines.append(usps_line(i % 10 + 1, values, sparse=i % 2 == 1))
        with bz2.open(root / name, "wt") as f:
            f.writelines(lines)


def test_usps_parses_libsvm_files(tmp_path):
    write_usps(tmp_path)
    dm = USPSDataModule(tmp_path, batch_size=32, normalize=False, download=False, shuffle=False)
    assert (dm.num_classes, dm.input_shape, dm.num_features) == (10, (1, 16, 16), 256)
    dm.setup()
    x, y = batches(dm.train_dataloader())
    assert x.shape == (20, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.arange(20) % 10)  # labels 1..10 -> 0..9
    assert torch.allclose(x[:, 0, 0, 3], y.float() / 10)
    assert (x.flatten(1)[:, ::7] == 0).all()  # omitted sparse features are zero
    assert -1 <= x.min() and x.max() <= 1
    x_test, _ = batches(dm.test_dataloader())
    assert x_test.shape == (10, 1, 16, 16)

    dm = USPSDataModule(tmp_path, flatten=True, classes=[0, 9], download=False)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 256) and sorted(y.tolist()) == [0, 0, 1, 1]


def test_usps_rejects_bad_lines_and_labels(tmp_path):
    write_usps(tmp_path)
    with bz2.open(tmp_path / "usps.t.bz2", "wt") as f:
        f.write(usps_line(11, np.zeros(256)))
    with pytest.raises(ValueError, match="1..10"):
        USPSDataModule(tmp_path, download=False).setup()
    with bz2.open(tmp_path / "usps.t.bz2", "wt") as f:
        f.write("3 1:0.5 257:0.1\n")
    with pytest.raises(ValueError, match="line 1"):
        USPSDataModule(tmp_path, download=False).setup()


def test_usps_missing_files_and_download(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        USPSDataModule(tmp_path, download=False).setup()
    assert str(tmp_path / "usps.bz2") in str(info.value) and "csie.ntu.edu.tw" in str(info.value)

    write_usps(tmp_path / "src")
    payloads = {name: (tmp_path / "src" / name).read_bytes() for name in ("usps.bz2", "usps.t.bz2")}
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(payloads[url.rsplit("/", 1)[1]])
    )
    resources = tuple(
        data._Resource(r.filename, r.urls, hashlib.md5(payloads[r.filename]).hexdigest())
        for r in data._USPS_RESOURCES
    )
    monkeypatch.setattr(USPSDataModule, "_resources", resources)
    dm = USPSDataModule(tmp_path / "dl")
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10


# ------------------------------------------------------------------------------------ digits and synthetic


def test_digits_shapes_split_and_normalisation():
    dm = DigitsDataModule()
    assert (dm.num_classes, dm.input_shape, dm.num_features) == (10, (64,), 64)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 360
    assert dm.test_set is dm.val_set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    full = DigitsDataModule(batch_size=2000)
    full.setup()
    x_all, _ = next(iter(full.train_dataloader()))
    assert abs(x_all.mean()) < 1e-5 and abs(x_all.std(unbiased=False) - 1) < 1e-4

    image = DigitsDataModule(flatten=False, normalize=False)
    assert image.input_shape == (1, 8, 8)
    image.setup()
    x, _ = next(iter(image.val_dataloader()))
    assert x.shape == (128, 1, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_digits_split_is_deterministic_and_loaders_leave_global_rng_alone():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])
    state = torch.get_rng_state()
    torch.manual_seed(123)
    first = [y for _, y in a.train_dataloader()]
    torch.manual_seed(456)
    second = [y for _, y in b.train_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))  # order depends on seed only
    torch.set_rng_state(state)
    batches(a.train_dataloader())
    batches(a.val_dataloader())
    assert torch.equal(torch.get_rng_state(), state)  # no draws from the global generator
    epochs = a.train_dataloader()
    assert not torch.equal(next(iter(epochs))[1], next(iter(epochs))[1])  # new order every epoch


def test_digits_and_synthetic_validation():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        DigitsDataModule(num_workers=-1)
    with pytest.raises(ValueError, match="input_shape"):
        SyntheticDataModule(input_shape=(3, 0, 32))
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDataModule(num_classes=1)
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


def test_synthetic():
    dm = SyntheticDataModule(
        input_shape=(3, 8, 8), num_classes=4, num_samples=100, batch_size=32, num_val_samples=20
    )
    assert (dm.num_classes, dm.input_shape, dm.num_features) == (4, (3, 8, 8), 192)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.max() < 4
    assert len(dm.train_set) == 100 and len(dm.val_set) == 20
    again = SyntheticDataModule(
        input_shape=(3, 8, 8), num_classes=4, num_samples=100, batch_size=32, num_val_samples=20
    )
    again.setup()
    assert torch.equal(again.train_set.tensors[0], dm.train_set.tensors[0])
    flat = SyntheticDataModule(input_shape=[64], num_samples=10)
    flat.setup()
    assert next(iter(flat.val_dataloader()))[0].shape == (256, 64)


def test_batch_transform_is_picklable_for_worker_processes(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(tmp_path, download=False)
    dm.setup()
    clone = pickle.loads(pickle.dumps(dm.train_dataloader().collate_fn))
    torch.manual_seed(0)
    x, _ = clone([dm.train_set[i] for i in range(4)])
    assert x.shape == (4, 3, 32, 32)


def test_resumed_run_sees_the_same_batches(tmp_path):
    import lightning.pytorch as pl

    from lightning_chaos.models import MLP, Classifier

    class Record(pl.Callback):
        def __init__(self):
            self.labels = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.labels.append(batch[1].clone())

    def fit(epochs, ckpt_path=None, save=None):
        torch.manual_seed(0)
        record = Record()
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[record],
            limit_val_batches=0,
        )
        model = Classifier(MLP(64, (8,), 10))
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=256), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return model, record.labels

    straight, labels = fit(2)
    fit(1, save=tmp_path / "epoch1.ckpt")
    resumed, resumed_labels = fit(2, ckpt_path=tmp_path / "epoch1.ckpt")
    assert len(resumed_labels) == len(labels) // 2
    assert all(torch.equal(a, b) for a, b in zip(resumed_labels, labels[len(resumed_labels) :], strict=True))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
