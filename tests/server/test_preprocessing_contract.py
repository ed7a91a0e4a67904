"""The served embedding of an image file equals what timm's / open_clip's own code computes from
the same file: the server's preprocessing is the model library's eval transform, nothing of ours."""

import base64
import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import selora.compat  # noqa: F401  (before timm/open_clip)
import open_clip
import timm
from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from selora.models import load_backbone
from selora.models.catalog import named_config
from selora.runtime.batch import forward_mixed
from tests.helpers import make_app, resident, run_with_client, write_adapter

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> bytes:
    """A real photo (not square, so resize and centre crop both matter) as PNG file bytes."""
    path = tmp_path_factory.mktemp("photo") / "cat.png"
    Image.fromarray(skdata.chelsea()).save(path)
    return path.read_bytes()


def _served(backbone, root, photo: bytes, model="base") -> np.ndarray:
    body = {"model": model, "input": "data:image/png;base64," + base64.b64encode(photo).decode(), "normalize": False}
    response = run_with_client(make_app(backbone, root), lambda client: client.post("/v1/embeddings", json=body))
    assert response.status_code == 200, response.text
    return np.array(response.json()["data"][0]["embedding"])


def test_timm_served_embedding_equals_timm_eval_pipeline(tmp_path, photo):
    cfg = named_config("tiny-vit")
    torch.manual_seed(7)
    reference = timm.create_model(cfg["arch"], pretrained=False, num_classes=0, **cfg["kwargs"]).eval()
    save_file(reference.state_dict(), tmp_path / "vit.safetensors")
    data_cfg = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=reference)
    assert data_cfg["crop_pct"] == 0.9  # the model's own: resize the shorter side to 35, crop 32
    transform = timm.data.create_transform(**data_cfg)
    with torch.no_grad():
        expected = reference(transform(Image.open(io.BytesIO(photo)).convert("RGB"))[None])[0].numpy()
    served = _served(load_backbone("tiny-vit", str(tmp_path / "vit.safetensors")), tmp_path / "adapters", photo)
    assert np.abs(served - expected).max() <= 1e-5


def test_open_clip_served_embedding_equals_open_clip_preprocess(tmp_path, photo):
    open_clip.factory._MODEL_CONFIGS["selora-tiny-clip"] = named_config("tiny-clip")["model_cfg"]
    torch.manual_seed(8)
    reference, _, preprocess = open_clip.create_model_and_transforms("selora-tiny-clip")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "clip.safetensors")
    with torch.no_grad():
        expected = reference.eval().encode_image(preprocess(Image.open(io.BytesIO(photo)))[None])[0].numpy()
    served = _served(load_backbone("tiny-clip", str(tmp_path / "clip.safetensors")), tmp_path / "adapters", photo)
    assert np.abs(served - expected).max() <= 1e-5


def test_adapter_rows_run_at_its_own_size_as_timm_set_input_size(tmp_path, tiny_vit, photo):
    """An adapter trained at 16 px: its rows are timm's eval transform at 16 px through the model
    resized by timm's own ``set_input_size``; base rows stay at 32 px."""
    sparse = write_adapter(tiny_vit, tmp_path, "small", active=list(tiny_vit.blocks)[:3], seed=4)
    sparse.input_size = (16, 16)
    save_adapter(sparse, tmp_path / "small")
    resized = copy.deepcopy(tiny_vit)
    resized.model.set_input_size(img_size=(16, 16))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, 16, 16)}, model=resized.model))
    pixels = transform(Image.open(io.BytesIO(photo)).convert("RGB"))[None]
    expected = forward_mixed(resized, pixels, resident(resized, sparse), [0])[0].numpy()
    image = "data:image/png;base64," + base64.b64encode(photo).decode()

    async def both(client):
        import asyncio

        bodies = [{"model": m, "input": image, "normalize": False} for m in ("small", "base")]
        return await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))

    small, base = run_with_client(make_app(tiny_vit, tmp_path), both)
    assert small.json()["usage"]["prompt_tokens"] == 1 + 2 * 2 and base.json()["usage"]["prompt_tokens"] == 1 + 4 * 4
    assert np.abs(np.array(small.json()["data"][0]["embedding"]) - expected).max() <= 1e-5
    assert np.abs(np.array(base.json()["data"][0]["embedding"]) - _served(tiny_vit, tmp_path / "none", photo)).max() <= 1e-5


@pytest.mark.parametrize("base, size", [("tiny_vit", [20, 20]), ("tiny_vit", [512, 512]), ("tiny_clip", [16, 16])])
def test_an_adapter_for_a_size_the_base_cannot_take_is_refused_at_upload(request, tmp_path, base, size):
    backbone = request.getfixturevalue(base)
    sparse = write_adapter(backbone, tmp_path / "src", "odd", active=list(backbone.blocks)[:1])
    sparse.input_size = tuple(size)
    save_adapter(sparse, tmp_path / "src" / "odd")
    files = {k: (tmp_path / "src" / "odd" / n).read_bytes() for k, n in (("config", CONFIG_NAME), ("weights", WEIGHTS_NAME))}

    async def upload(client):
        return await client.post("/v1/adapters", data={"name": "odd"}, files=files), await client.get("/v1/adapters")

    refused, listed = run_with_client(make_app(backbone, tmp_path / "root"), upload)
    assert refused.status_code == 422 and refused.json()["error"]["type"] == "unsupported_input_size", refused.text
    assert str(size) in refused.json()["error"]["message"] and listed.json()["data"] == []
