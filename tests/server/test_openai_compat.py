"""The OpenAI embeddings/models contract on the real app (tiny models): input forms, modality
``auto``, ``encoding_format``, ``dimensions``, ``usage`` and model objects."""

import base64

import numpy as np

from tests.helpers import image_b64


def _error(resp, status, kind):
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["type"] == kind
    return resp.json()["error"]["message"]


def test_base64_encoding_is_little_endian_float32_of_the_floats(vit_client):
    body = {"model": "a1", "input": [image_b64(0), image_b64(1)]}
    floats = vit_client.post("/v1/embeddings", json=body).json()
    packed = vit_client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f, p in zip(floats["data"], packed["data"]):
        decoded = np.frombuffer(base64.b64decode(p["embedding"]), dtype="<f4")
        assert decoded.shape == (64,) and np.array_equal(decoded, np.array(f["embedding"], dtype=np.float32))
    assert packed["usage"] == floats["usage"] == {"prompt_tokens": 34, "total_tokens": 34}
    _error(vit_client.post("/v1/embeddings", json={**body, "encoding_format": "float16"}), 422, "invalid_request")


def test_dimensions_equal_to_the_width_only(vit_client):
    body = {"input": [image_b64(0)]}
    assert len(vit_client.post("/v1/embeddings", json={**body, "dimensions": 64}).json()["data"][0]["embedding"]) == 64
    message = _error(vit_client.post("/v1/embeddings", json={**body, "dimensions": 32}), 422, "unsupported_dimensions")
    assert "64" in message and "Matryoshka" in message


def test_modality_auto_on_an_image_only_base_and_urls(vit_client):
    # bare base64 and data URIs are images
    out = vit_client.post("/v1/embeddings", json={"input": [image_b64(0, data_uri=False), image_b64(1)]})
    assert out.status_code == 200 and len(out.json()["data"]) == 2
    for modality in ("auto", "image"):
        body = {"input": ["https://example.com/cat.png"], "modality": modality}
        assert "never fetches" in _error(vit_client.post("/v1/embeddings", json=body), 422, "url_not_fetched")


def test_modality_auto_on_a_clip_base_and_urls(clip_client):
    # a plain string is text, a data URI an image; both the same as with an explicit modality
    text = clip_client.post("/v1/embeddings", json={"model": "c1", "input": "a photo of a cat"}).json()
    explicit = clip_client.post("/v1/embeddings", json={"model": "c1", "input": ["a photo of a cat"], "modality": "text"}).json()
    assert text["data"] == explicit["data"] and text["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"] > 2
    image = clip_client.post("/v1/embeddings", json={"model": "c1", "input": [image_b64(0)]}).json()
    as_image = clip_client.post("/v1/embeddings", json={"model": "c1", "input": [image_b64(0)], "modality": "image"}).json()
    assert image["data"] == as_image["data"] and image["usage"]["prompt_tokens"] == 17
    _error(clip_client.post("/v1/embeddings", json={"input": ["a cat", image_b64(0)]}), 422, "invalid_input")
    for modality in ("auto", "image"):
        body = {"input": ["https://example.com/cat.png"], "modality": modality}
        assert "never fetches" in _error(clip_client.post("/v1/embeddings", json=body), 422, "url_not_fetched")
    # a URL sent explicitly as text is just text
    assert clip_client.post("/v1/embeddings", json={"input": ["https://example.com"], "modality": "text"}).status_code == 200


def test_model_objects_and_preprocessing(vit_client):
    listed = vit_client.get("/v1/models").json()
    base = listed["base"]
    assert base["random_weights"] is True
    # timm's eval transform for vit_small_patch16_224 (crop_pct 0.9) at the built 32 px
    assert base["preprocessing"] == {"input_size": [32, 32], "resize": 35, "interpolation": "bicubic", "crop": [32, 32],
                                     "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    for entry in listed["data"]:
        one = vit_client.get(f"/v1/models/{entry['id']}").json()
        assert one == entry and one["object"] == "model" and one["owned_by"] == "selora" and one["created"] > 0
    assert vit_client.get("/v1/models/base").json()["type"] == "base"
    assert vit_client.get("/v1/models/a1").json()["preprocessing"] == base["preprocessing"]
    _error(vit_client.get("/v1/models/nope"), 404, "adapter_not_found")
