"""Datamodules: scikit-learn's embedded 8×8 digits, the papers' datasets, and synthetic data.

Every datamodule yields ``(inputs, labels)`` tuples: ``inputs`` float32 of shape ``(B, *input_shape)``,
``labels`` int64 class indices in ``0 .. num_classes - 1``. ``num_classes``, ``input_shape`` and
``num_features`` are known right after construction (before ``setup``), so LightningCLI can link them to
the model's arguments.

The paper datasets (CIFAR-10, FashionMNIST, USPS) are read from their original distribution files with
the standard library and numpy only (no torchvision), in torchvision's on-disk layout so existing
downloads are reused:

- ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
- ``<data_dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``
- ``<data_dir>/usps.bz2`` and ``<data_dir>/usps.t.bz2``

Missing files are downloaded in ``prepare_data`` when ``download=True`` (checksums verified); otherwise,
or when the download fails, ``DatasetNotFoundError`` says which files are expected where and where to get
them.

Loaders shuffle with their own ``torch.Generator`` seeded from ``seed``: data order never draws from, or
depends on, the global RNG, and the training generator's state is part of the datamodule's
``state_dict`` (saved in checkpoints), so a run resumed at an epoch boundary sees the same batches.
Random augmentation runs batch-wise in the collate function and draws from the global torch RNG of the
process that collates (the main process, or a worker seeded by the loader).
"""

import bz2
import codecs
import gzip
import hashlib
import http.client
import math
import pickle
import shutil
import struct
import tarfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are missing and could not (or may not) be downloaded."""


@dataclass(frozen=True)
class _Resource:
    """One file of a dataset distribution: its name, download mirrors (tried in order) and MD5."""

    filename: str
    urls: tuple[str, ...]
    md5: str


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(resource: _Resource, directory: Path, timeout: float = 60.0) -> Path:
    """Download ``resource`` into ``directory``, verify its MD5, and return the file's path.

    Raises:
        DatasetNotFoundError: when no mirror delivers a file with the expected checksum.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / resource.filename
    partial = target.with_name(target.name + ".part")
    failures = []
    for url in resource.urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
                shutil.copyfileobj(response, out)
        except (OSError, http.client.HTTPException) as err:
            failures.append(f"{url}: {err}")
            continue
        digest = _md5(partial)
        if digest == resource.md5:
            partial.replace(target)
            return target
        failures.append(f"{url}: MD5 {digest} does not match the expected {resource.md5}")
    partial.unlink(missing_ok=True)
    raise DatasetNotFoundError(
        f"could not download {resource.filename} into {directory}:\n  "
        + "\n  ".join(failures)
        + f"\nDownload it by hand from {resource.urls[0]} (MD5 {resource.md5}) and place it at {target}."
    )


def _missing_files_error(dataset: str, directory: Path, files: Sequence[str], sources: str) -> str:
    listing = "\n  ".join(str(directory / f) for f in files)
    return (
        f"{dataset} files are missing. Expected:\n  {listing}\n"
        f"Pass download=True to fetch them (on a machine with internet access), or get them from {sources} "
        f"and place them there."
    )


def _channel_stats(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``x * scale`` for ``x`` of shape ``(N, C, ...)``, in float64 chunks."""
    dims = [0, *range(2, x.ndim)]
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in x.split(4096):
        c = chunk.to(torch.float64) * scale
        total += c.sum(dims)
        total_sq += (c * c).sum(dims)
    count = x.numel() / x.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float(), std.float()


def _random_crop(x: Tensor, padding: int) -> Tensor:
    """Zero-pad images ``(B, C, H, W)`` by ``padding`` and crop each back to ``H×W`` at a random offset."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = torch.randint(0, 2 * padding + 1, (b, 1)) + torch.arange(h)
    cols = torch.randint(0, 2 * padding + 1, (b, 1)) + torch.arange(w)
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def _random_hflip(x: Tensor) -> Tensor:
    """Flip each image ``(B, C, H, W)`` horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class _BatchTransform:
    """Collate ``(input, label)`` samples and transform the batch: scale, augment, normalise, flatten.

    Args:
        scale: factor applied to the raw stored values (e.g. 1/255 for uint8 images).
        mean: per-channel mean subtracted after scaling (None: no normalisation).
        std: per-channel std divided out after subtracting ``mean``.
        crop_padding: random-crop padding in pixels (0: no cropping).
        flip: random horizontal flips.
        flatten: return ``(B, prod(shape))`` inputs.
    """

    def __init__(
        self,
        scale: float,
        mean: Tensor | None,
        std: Tensor | None,
        crop_padding: int = 0,
        flip: bool = False,
        flatten: bool = False,
    ) -> None:
        self.scale = scale
        self.mean = mean
        self.std = std
        self.crop_padding = crop_padding
        self.flip = flip
        self.flatten = flatten

    def __call__(self, samples: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([s[0] for s in samples]).to(torch.float32)
        y = torch.stack([s[1] for s in samples])
        if self.scale != 1:
            x = x * self.scale
        if self.crop_padding:
            x = _random_crop(x, self.crop_padding)
        if self.flip:
            x = _random_hflip(x)
        if self.mean is not None and self.std is not None:
            shape = (-1,) + (1,) * (x.ndim - 2)
            x = (x - self.mean.view(shape)) / self.std.view(shape)
        if self.flatten:
            x = x.flatten(1)
        return x, y


def _resolve_classes(
    classes: str | Sequence[int] | None, total: int, aliases: dict[str, tuple[int, ...]]
) -> tuple[int, ...] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        if classes not in aliases:
            raise ValueError(
                f"classes must be None, a list of class indices or one of {sorted(aliases)}, got {classes!r}"
            )
        return aliases[classes]
    selected = tuple(classes)
    if (
        len(selected) < 2
        or len(set(selected)) != len(selected)
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < total for c in selected)
    ):
        raise ValueError(
            f"classes must list at least two distinct class indices in 0..{total - 1}, got {classes!r}"
        )
    return selected


class _ArrayDataModule(pl.LightningDataModule):
    """In-memory image datamodule: subclasses load raw tensors; this class splits, selects and serves them.

    Args:
        image_shape: shape of one raw sample, ``(C, H, W)`` for images.
        total_classes: number of classes of the full dataset.
        classes: subset of classes to keep, relabelled ``0..k-1`` in the given order (None: all).
        batch_size: samples per batch.
        val_fraction: fraction of the training split held out (stratified) for validation; 0 validates
            on the test split.
        seed: seed of the validation split and of the loaders' generators.
        flatten: serve ``(B, prod(image_shape))`` instead of ``(B, *image_shape)``.
        normalize: standardise each channel with the mean/std of the (selected) training split.
        augment: random crop (4-px padding) and horizontal flip of training batches.
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training loader.
        drop_last: drop the last incomplete training batch.
        class_aliases: names accepted for ``classes``.
    """

    _scale: float = 1.0  # factor from the stored raw values to the input range before normalisation

    def __init__(
        self,
        *,
        image_shape: tuple[int, ...],
        total_classes: int,
        classes: str | Sequence[int] | None,
        batch_size: int,
        val_fraction: float,
        seed: int,
        flatten: bool,
        normalize: bool,
        augment: bool,
        num_workers: int,
        shuffle: bool,
        drop_last: bool,
        class_aliases: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.image_shape = tuple(image_shape)
        self.selected_classes = _resolve_classes(classes, total_classes, class_aliases or {})
        self.total_classes = total_classes
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.flatten = flatten
        self.normalize = normalize
        self.augment = augment
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.class_names: list[str] | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._train_transform: _BatchTransform | None = None
        self._eval_transform: _BatchTransform | None = None
        self._train_generator: torch.Generator | None = None
        self._restored_generator_state: Tensor | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes served (after class selection)."""
        return len(self.selected_classes) if self.selected_classes else self.total_classes

    @property
    def num_features(self) -> int:
        """Number of input values per sample (``prod(input_shape)``)."""
        return math.prod(self.image_shape)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample as served: ``(num_features,)`` when flattened, else the image shape."""
        return (self.num_features,) if self.flatten else self.image_shape

    def _load(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, list[str]]:
        """Raw ``(x_train, y_train, x_test, y_test, class_names)``; the test split may be None."""
        raise NotImplementedError

    def _select(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.selected_classes is None:
            return x, y
        lookup = torch.full((self.total_classes,), -1, dtype=torch.int64)
        lookup[list(self.selected_classes)] = torch.arange(len(self.selected_classes))
        new = lookup[y]
        keep = new >= 0
        return x[keep], new[keep]

    def setup(self, stage: str | None = None) -> None:
        """Load the files once, select classes, split off validation data and fit the normalisation.

        Args:
            stage: Lightning stage (unused: all splits are prepared together).
        """
        if self.train_set is not None:
            return
        x_train, y_train, x_test, y_test, names = self._load()
        x_train, y_train = self._select(x_train, y_train)
        if x_test is not None and y_test is not None:
            x_test, y_test = self._select(x_test, y_test)
        self.class_names = [names[c] for c in self.selected_classes] if self.selected_classes else names
        if self.val_fraction > 0:
            train_idx, val_idx = train_test_split(
                np.arange(len(y_train)),
                test_size=self.val_fraction,
                random_state=self.seed,
                stratify=y_train.numpy(),
            )
            train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
            self.val_set = TensorDataset(x_train[val_idx], y_train[val_idx])
            x_train, y_train = x_train[train_idx], y_train[train_idx]
            self.test_set = (
                self.val_set if x_test is None or y_test is None else TensorDataset(x_test, y_test)
            )
        elif x_test is None or y_test is None:  # the subclasses without a test split require val_fraction > 0
            raise ValueError(f"{type(self).__name__} has no test split: val_fraction must be > 0")
        else:
            self.val_set = self.test_set = TensorDataset(x_test, y_test)
        self.train_set = TensorDataset(x_train, y_train)
        mean, std = _channel_stats(x_train, self._scale) if self.normalize else (None, None)
        padding, flip = (4, True) if self.augment else (0, False)
        self._train_transform = _BatchTransform(self._scale, mean, std, padding, flip, self.flatten)
        self._eval_transform = _BatchTransform(self._scale, mean, std, flatten=self.flatten)

    def _loader(
        self,
        dataset: TensorDataset | None,
        transform: _BatchTransform | None,
        train: bool,
        generator: torch.Generator,
    ) -> DataLoader:
        if dataset is None or transform is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and self.shuffle,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            collate_fn=transform,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Return the training loader (shuffled and augmented as configured).

        Its generator continues from a restored checkpoint's state, so a run resumed at an epoch boundary
        sees the same batches as the uninterrupted run.
        """
        generator = torch.Generator().manual_seed(self.seed)
        if self._restored_generator_state is not None:
            generator.set_state(self._restored_generator_state)
            self._restored_generator_state = None
        self._train_generator = generator
        return self._loader(self.train_set, self._train_transform, True, generator)

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader (fixed order)."""
        return self._loader(
            self.val_set, self._eval_transform, False, torch.Generator().manual_seed(self.seed)
        )

    def test_dataloader(self) -> DataLoader:
        """Return the test loader (fixed order)."""
        return self._loader(
            self.test_set, self._eval_transform, False, torch.Generator().manual_seed(self.seed)
        )

    def state_dict(self) -> dict[str, Tensor]:
        """Return the training loader's generator state (saved in Lightning checkpoints)."""
        return {} if self._train_generator is None else {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restore the generator state for the next ``train_dataloader()``.

        Args:
            state_dict: as returned by ``state_dict``.
        """
        self._restored_generator_state = state_dict.get("train_generator")


class DigitsDataModule(_ArrayDataModule):
    """scikit-learn's bundled 8×8 digits (1,797 samples, 10 classes): no download, embedded default data.

    Pixel values 0..16 are scaled to [0, 1]; with ``normalize`` they are then standardised with the
    training split's mean and std. The split is stratified and deterministic in ``seed``. There is no
    separate test set: the test dataloader serves the validation split.

    Args:
        batch_size: samples per batch.
        val_fraction: fraction held out for validation (and test), in ``(0, 1)``.
        seed: seed of the split and of the shuffling generator.
        flatten: serve ``(B, 64)`` inputs; otherwise ``(B, 1, 8, 8)``.
        normalize: standardise with the training split's mean and std.
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training loader.
        drop_last: drop the last incomplete training batch.
        classes: subset of the digits to keep, relabelled ``0..k-1`` in the given order (None: all ten).

    Raises:
        ValueError: on invalid arguments (``val_fraction`` must be positive here).
    """

    _scale = 1.0 / 16.0

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = True,
        normalize: bool = True,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        classes: list[int] | None = None,
    ) -> None:
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in (0, 1) for digits (no separate test set), got {val_fraction!r}"
            )
        super().__init__(
            image_shape=(1, 8, 8),
            total_classes=10,
            classes=classes,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            flatten=flatten,
            normalize=normalize,
            augment=False,
            num_workers=num_workers,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.save_hyperparameters()

    def _load(self) -> tuple[Tensor, Tensor, None, None, list[str]]:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return x, torch.as_tensor(y, dtype=torch.int64), None, None, [str(d) for d in range(10)]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a foreign file in the data directory cannot run code."""

    _reconstruct = np.ndarray((0,)).__reduce__()[0]
    _frombuffer = np.ndarray((0,)).__reduce_ex__(5)[0]
    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")
        return self._allowed[(module, name)]


def _load_cifar_pickle(path: Path) -> dict:
    with path.open("rb") as f:
        return _RestrictedUnpickler(f, encoding="bytes").load()


_CIFAR10_ARCHIVE = _Resource(
    "cifar-10-python.tar.gz",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    "c58f30108f718f92721af3b95e74349a",
)
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN, "test_batch", "batches.meta")


class CIFAR10DataModule(_ArrayDataModule):
    """CIFAR-10 from the python-pickle batches, optionally restricted to some classes.

    The ICLR paper's two-class problem is ``classes="planes_cars"`` (classes 0 and 1, airplane and
    automobile); a list of indices keeps those classes relabelled ``0..k-1`` in the given order.
    Inputs are scaled to [0, 1], standardised per channel with the training split's statistics, and
    training batches get the standard augmentation (random crop with 4-px zero padding, horizontal flip).
    Files are read from ``<data_dir>/cifar-10-batches-py/``; ``download`` fetches and unpacks
    ``cifar-10-python.tar.gz`` there.

    Args:
        data_dir: directory that holds (or receives) ``cifar-10-batches-py/``.
        classes: None (all ten), ``"planes_cars"``, or a list of class indices.
        batch_size: samples per batch (512 in the paper).
        augment: random crop and horizontal flip of training batches.
        flatten: serve ``(B, 3072)`` instead of ``(B, 3, 32, 32)``.
        normalize: standardise each channel.
        val_fraction: fraction of the training set held out for validation; 0 validates on the test set.
        seed: seed of the split and of the shuffling generator.
        download: download missing files in ``prepare_data``.
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training loader.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: on invalid arguments.
        DatasetNotFoundError: from ``prepare_data``/``setup`` when the files are missing and cannot be
            downloaded.
    """

    _scale = 1.0 / 255.0

    def __init__(
        self,
        data_dir: str = "data",
        classes: str | list[int] | None = None,
        batch_size: int = 512,
        augment: bool = True,
        flatten: bool = False,
        normalize: bool = True,
        val_fraction: float = 0.0,
        seed: int = 0,
        download: bool = True,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            image_shape=(3, 32, 32),
            total_classes=10,
            classes=classes,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            flatten=flatten,
            normalize=normalize,
            augment=augment,
            num_workers=num_workers,
            shuffle=shuffle,
            drop_last=drop_last,
            class_aliases={"planes_cars": (0, 1)},
        )
        self.data_dir = Path(data_dir)
        self.download = download
        self.save_hyperparameters()

    @property
    def _folder(self) -> Path:
        return self.data_dir / _CIFAR10_FOLDER

    def _missing(self) -> list[str]:
        return [f for f in _CIFAR10_FILES if not (self._folder / f).is_file()]

    def prepare_data(self) -> None:
        """Download and unpack the archive when files are missing and ``download`` is set."""
        if not self._missing() or not self.download:
            return
        archive = self.data_dir / _CIFAR10_ARCHIVE.filename
        if not archive.is_file() or _md5(archive) != _CIFAR10_ARCHIVE.md5:
            _download(_CIFAR10_ARCHIVE, self.data_dir)
        self._folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for name in _CIFAR10_FILES:  # extract the known members by name only: no path traversal
                try:
                    source = tar.extractfile(f"{_CIFAR10_FOLDER}/{name}")
                except KeyError:
                    source = None
                if source is None:
                    raise DatasetNotFoundError(f"{archive} has no regular file {_CIFAR10_FOLDER}/{name}")
                (self._folder / name).write_bytes(source.read())

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        missing = self._missing()
        if missing:
            raise DatasetNotFoundError(
                _missing_files_error(
                    "CIFAR-10", self._folder, missing, _CIFAR10_ARCHIVE.urls[0] + " (unpack it)"
                )
            )

        def read(names: Sequence[str]) -> tuple[Tensor, Tensor]:
            xs, ys = [], []
            for name in names:
                batch = _load_cifar_pickle(self._folder / name)
                xs.append(torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
                ys.append(torch.as_tensor(batch[b"labels"], dtype=torch.int64))
            return torch.cat(xs), torch.cat(ys)

        x_train, y_train = read(_CIFAR10_TRAIN)
        x_test, y_test = read(["test_batch"])
        meta = _load_cifar_pickle(self._folder / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
        return x_train, y_train, x_test, y_test, names


def _read_idx(path: Path, ndim: int) -> Tensor:
    """Parse a gzip-compressed idx file of unsigned bytes with ``ndim`` dimensions."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != ndim:
        expected = 0x800 + ndim
        raise ValueError(
            f"{path} is not an unsigned-byte idx file with {ndim} dimensions (magic {expected:#010x})"
        )
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = data[4 + 4 * ndim :]
    if len(payload) != math.prod(dims):
        raise ValueError(f"{path}: header announces shape {dims} but holds {len(payload)} values")
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).reshape(dims).copy())


_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_FASHION_RESOURCES = tuple(
    _Resource(name, tuple(m + name for m in _FASHION_MIRRORS), md5) for name, md5 in _FASHION_FILES.items()
)
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class _DownloadedDataModule(_ArrayDataModule):
    """Datamodule whose files are independent downloads into ``_folder`` (FashionMNIST, USPS)."""

    _resources: tuple[_Resource, ...] = ()
    _dataset_name = ""
    _folder: Path
    download: bool

    def _missing(self) -> list[_Resource]:
        return [r for r in self._resources if not (self._folder / r.filename).is_file()]

    def prepare_data(self) -> None:
        """Download missing files when ``download`` is set."""
        if self.download:
            for resource in self._missing():
                _download(resource, self._folder)

    def _check_files(self) -> None:
        missing = self._missing()
        if missing:
            sources = ", ".join(r.urls[0] for r in missing)
            raise DatasetNotFoundError(
                _missing_files_error(self._dataset_name, self._folder, [r.filename for r in missing], sources)
            )


class FashionMNISTDataModule(_DownloadedDataModule):
    """FashionMNIST (28×28 grey images, 10 classes) from the original gzip idx files.

    Files are read from ``<data_dir>/FashionMNIST/raw/`` (torchvision's layout); ``download`` fetches them
    from Zalando's release mirrors. Inputs are scaled to [0, 1] and standardised with the training split's
    mean and std.

    Args:
        data_dir: directory that holds (or receives) ``FashionMNIST/raw/``.
        classes: None (all ten) or a list of class indices, relabelled ``0..k-1`` in the given order.
        batch_size: samples per batch.
        flatten: serve ``(B, 784)`` instead of ``(B, 1, 28, 28)``.
        normalize: standardise with the training split's statistics.
        val_fraction: fraction of the training set held out for validation; 0 validates on the test set.
        seed: seed of the split and of the shuffling generator.
        download: download missing files in ``prepare_data``.
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training loader.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: on invalid arguments.
        DatasetNotFoundError: when the files are missing and cannot be downloaded.
    """

    _resources = _FASHION_RESOURCES
    _dataset_name = "FashionMNIST"
    _scale = 1.0 / 255.0

    def __init__(
        self,
        data_dir: str = "data",
        classes: list[int] | None = None,
        batch_size: int = 128,
        flatten: bool = False,
        normalize: bool = True,
        val_fraction: float = 0.0,
        seed: int = 0,
        download: bool = True,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            image_shape=(1, 28, 28),
            total_classes=10,
            classes=classes,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            flatten=flatten,
            normalize=normalize,
            augment=False,
            num_workers=num_workers,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.data_dir = Path(data_dir)
        self.download = download
        self._folder = self.data_dir / "FashionMNIST" / "raw"
        self.save_hyperparameters()

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        self._check_files()

        def read(prefix: str) -> tuple[Tensor, Tensor]:
            images = _read_idx(self._folder / f"{prefix}-images-idx3-ubyte.gz", 3)
            labels = _read_idx(self._folder / f"{prefix}-labels-idx1-ubyte.gz", 1).long()
            if len(images) != len(labels):
                raise ValueError(f"FashionMNIST {prefix}: {len(images)} images but {len(labels)} labels")
            if len(labels) and labels.max() >= 10:
                raise ValueError(f"FashionMNIST {prefix}: label {labels.max().item()} outside 0..9")
            return images.unsqueeze(1), labels

        return *read("train"), *read("t10k"), list(_FASHION_CLASSES)


def _read_libsvm_bz2(path: Path, num_features: int) -> tuple[Tensor, Tensor]:
    """Parse a bz2-compressed LIBSVM file (``label index:value ...``, 1-based indices, absent = 0)."""
    rows, labels = [], []
    with bz2.open(path, "rt") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split(None, 1)
            if not fields:
                continue
            row = np.zeros(num_features, dtype=np.float32)
            try:
                labels.append(int(float(fields[0])))
                pairs = np.array(
                    fields[1].replace(":", " ").split() if len(fields) > 1 else [], dtype=np.float64
                )
                index = pairs.reshape(-1, 2)[:, 0]
                if len(index) and (index.min() < 1 or index.max() > num_features or (index % 1).any()):
                    raise ValueError("feature index out of range")
                row[index.astype(np.int64) - 1] = pairs[1::2]
            except ValueError as err:
                raise ValueError(
                    f"{path}, line {line_no}: not a LIBSVM line with {num_features} features ({err})"
                ) from err
            rows.append(row)
    x = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, num_features)
    return x, torch.as_tensor(labels, dtype=torch.int64)


_USPS_BASE = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"
_USPS_RESOURCES = (
    _Resource("usps.bz2", (_USPS_BASE + "usps.bz2",), "ec16c51db3855ca6c91edd34d0e9b197"),
    _Resource("usps.t.bz2", (_USPS_BASE + "usps.t.bz2",), "8ea070ee2aca1ac39742fdd1ef5ed118"),
)


class USPSDataModule(_DownloadedDataModule):
    """USPS handwritten digits (16×16, values in [-1, 1], 7,291 train / 2,007 test) from the LIBSVM files.

    Files ``usps.bz2`` and ``usps.t.bz2`` are read from ``<data_dir>`` (torchvision's layout); labels
    1..10 become 0..9. With ``normalize`` the inputs are standardised with the training split's mean and
    std; otherwise they stay in [-1, 1].

    Args:
        data_dir: directory that holds (or receives) ``usps.bz2`` and ``usps.t.bz2``.
        classes: None (all ten) or a list of digits, relabelled ``0..k-1`` in the given order.
        batch_size: samples per batch.
        flatten: serve ``(B, 256)`` instead of ``(B, 1, 16, 16)``.
        normalize: standardise with the training split's statistics.
        val_fraction: fraction of the training set held out for validation; 0 validates on the test set.
        seed: seed of the split and of the shuffling generator.
        download: download missing files in ``prepare_data``.
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training loader.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: on invalid arguments.
        DatasetNotFoundError: when the files are missing and cannot be downloaded.
    """

    _resources = _USPS_RESOURCES
    _dataset_name = "USPS"

    def __init__(
        self,
        data_dir: str = "data",
        classes: list[int] | None = None,
        batch_size: int = 128,
        flatten: bool = False,
        normalize: bool = True,
        val_fraction: float = 0.0,
        seed: int = 0,
        download: bool = True,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            image_shape=(1, 16, 16),
            total_classes=10,
            classes=classes,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            flatten=flatten,
            normalize=normalize,
            augment=False,
            num_workers=num_workers,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.data_dir = Path(data_dir)
        self.download = download
        self._folder = self.data_dir
        self.save_hyperparameters()

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        self._check_files()

        def read(name: str) -> tuple[Tensor, Tensor]:
            x, y = _read_libsvm_bz2(self._folder / name, 256)
            if len(y) and (y.min() < 1 or y.max() > 10):
                raise ValueError(
                    f"USPS {name}: labels must lie in 1..10, found {y.min().item()}..{y.max().item()}"
                )
            return x.reshape(-1, 1, 16, 16), y - 1

        return *read("usps.bz2"), *read("usps.t.bz2"), [str(d) for d in range(10)]


class SyntheticDataModule(_ArrayDataModule):
    """Random Gaussian inputs and uniform random labels, for benchmarks and configuration smoke tests.

    The training set has ``num_samples`` samples; validation and test share one further draw of
    ``num_val_samples``. Everything is generated from ``seed``.

    Args:
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)`` or ``(64,)``.
        num_classes: number of classes.
        num_samples: training samples.
        batch_size: samples per batch.
        seed: seed of the data and of the shuffling generator.
        num_val_samples: validation (= test) samples.
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training loader.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: on non-positive sizes.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        num_samples: int = 1024,
        batch_size: int = 512,
        seed: int = 0,
        num_val_samples: int = 256,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        input_shape = tuple(input_shape)
        for name, value in (("num_samples", num_samples), ("num_val_samples", num_val_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not input_shape or not all(isinstance(s, int) and s >= 1 for s in input_shape):
            raise ValueError(
                f"input_shape must be a non-empty sequence of positive integers, got {input_shape!r}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        super().__init__(
            image_shape=input_shape,
            total_classes=num_classes,
            classes=None,
            batch_size=batch_size,
            val_fraction=0.0,
            seed=seed,
            flatten=False,
            normalize=False,
            augment=False,
            num_workers=num_workers,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.num_samples = num_samples
        self.num_val_samples = num_val_samples
        self.save_hyperparameters()

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        generator = torch.Generator().manual_seed(self.seed)
        n = self.num_samples + self.num_val_samples
        x = torch.randn((n, *self.image_shape), generator=generator)
        y = torch.randint(0, self.total_classes, (n,), generator=generator)
        k = self.num_samples
        return x[:k], y[:k], x[k:], y[k:], [str(c) for c in range(self.total_classes)]


__all__ = [
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "SyntheticDataModule",
    "USPSDataModule",
]
