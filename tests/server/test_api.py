"""Every endpoint and every error case, on the real app with tiny models."""

import base64
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from selora.adapters import export_adapter, save_adapter
from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.adapters.inject import attached
from selora.training.train import set_zero_shot_head
from tests.helpers import make_adapter
from tests.helpers import image_b64, make_app, write_adapter


def _error(resp, status, kind):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]["message"]


def test_health_ready_models_docs(vit_client):
    assert vit_client.get("/health").json() == {"status": "ok"}
    assert vit_client.get("/ready").status_code == 200
    models = vit_client.get("/v1/models").json()
    assert models["base"]["id"] == "tiny-vit" and models["base"]["num_blocks"] == 12
    assert models["kernel_backend"] in ("torch", "triton", "triton-interpret")
    assert [m["id"] for m in models["data"]] == ["base", "a1", "headed"]
    assert vit_client.get("/docs").status_code == 200
    spec = vit_client.get("/openapi.json").json()
    assert {"/v1/embeddings", "/v1/classify", "/v1/adapters", "/v1/adapters/{name}", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]


def test_adapters_list_get_delete(vit_client):
    listed = vit_client.get("/v1/adapters").json()["data"]
    assert [a["name"] for a in listed] == ["a1", "headed"]
    a1 = vit_client.get("/v1/adapters/a1").json()
    assert a1["r"] == 4 and a1["variant"] == "lora" and a1["num_active"] == 2 and a1["bytes"] > 0 and a1["resident_host"]
    assert vit_client.delete("/v1/adapters/a1").json() == {"name": "a1", "deleted": True}
    _error(vit_client.get("/v1/adapters/a1"), 404, "adapter_not_found")
    _error(vit_client.delete("/v1/adapters/a1"), 404, "adapter_not_found")
    _error(vit_client.post("/v1/embeddings", json={"model": "a1", "input": [image_b64(0)]}), 404, "adapter_not_found")


def test_load_by_path_and_its_errors(vit_client, vit_root, tiny_vit, tiny_clip):
    write_adapter(tiny_vit, vit_root, "later", active=list(tiny_vit.blocks)[5:8], seed=9)
    info = vit_client.post("/v1/adapters", json={"name": "fresh", "path": "later"}).json()
    assert info["name"] == "fresh" and info["num_active"] == 3
    _error(vit_client.post("/v1/adapters", json={"name": "n", "path": "../etc"}), 422, "unsafe_path")
    _error(vit_client.post("/v1/adapters", json={"name": "n", "path": "missing"}), 404, "adapter_files_not_found")
    _error(vit_client.post("/v1/adapters", json={"name": "../n", "path": "later"}), 422, "invalid_adapter_name")
    _error(vit_client.post("/v1/adapters", json={"name": "n"}), 422, "invalid_request")
    _error(vit_client.post("/v1/adapters", content=b"{oops", headers={"content-type": "application/json"}), 422, "invalid_json")
    write_adapter(tiny_clip, vit_root, "clip_one", active=list(tiny_clip.blocks)[:1])
    _error(vit_client.post("/v1/adapters", json={"name": "n", "path": "clip_one"}), 422, "base_model_mismatch")
    assert [a["name"] for a in vit_client.get("/v1/adapters").json()["data"]] == ["a1", "fresh", "headed"]
    refused = [vit_client.post("/v1/adapters", json={"name": "n", "path": p}) for p in ("missing", "../etc", "clip_one", "/etc")]
    assert all(r.status_code in (404, 422) and str(vit_root) not in r.text and "/tmp" not in r.text for r in refused)


def test_upload_and_its_errors(vit_client, vit_root):
    files = {n: (vit_root / "a1" / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    ok = vit_client.post("/v1/adapters", data={"name": "up"}, files={"config": files[CONFIG_NAME], "weights": files[WEIGHTS_NAME]})
    assert ok.status_code == 200 and ok.json()["active_blocks"] == ["vision.0.q", "vision.0.k"]
    assert ok.json()["content_hash"] == hashlib.sha256(files[WEIGHTS_NAME]).hexdigest() and ok.json()["version"] > 0
    before = vit_client.get("/v1/adapters").json()
    bad_cfg = json.loads(files[CONFIG_NAME])
    bad_cfg["base_fingerprint"] = "0" * 16
    cases = [
        ({"config": json.dumps(bad_cfg).encode(), "weights": files[WEIGHTS_NAME]}, "base_model_mismatch"),
        ({"config": b"[]", "weights": files[WEIGHTS_NAME]}, "invalid_adapter"),
        ({"config": files[CONFIG_NAME], "weights": b"\x80\x04\x95pickle"}, "invalid_adapter"),
        ({"config": files[CONFIG_NAME], "weights": files[WEIGHTS_NAME][:-10]}, "invalid_adapter"),
    ]
    for up, kind in cases:
        _error(vit_client.post("/v1/adapters", data={"name": "up"}, files=up), 422, kind)
    _error(vit_client.post("/v1/adapters", data={"name": "up"}, files={"config": files[CONFIG_NAME]}), 422, "invalid_input")
    assert vit_client.get("/v1/adapters").json() == before  # bad input never changes state


def test_embeddings_image_shapes_normalize_and_input_forms(vit_client):
    imgs = [image_b64(0), image_b64(1, data_uri=False)]
    out = vit_client.post("/v1/embeddings", json={"model": "a1", "input": imgs}).json()
    assert out["object"] == "list" and out["model"] == "a1" and out["usage"] == {"prompt_tokens": 34, "total_tokens": 34}  # 2 x (4x4 patches + class token)
    emb = np.array([d["embedding"] for d in out["data"]])
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    raw = vit_client.post("/v1/embeddings", json={"model": "a1", "input": imgs[0], "normalize": False}).json()["data"][0]["embedding"]
    assert np.allclose(np.array(raw) / np.linalg.norm(raw), emb[0], atol=1e-5)
    base = vit_client.post("/v1/embeddings", json={"model": "base", "input": imgs[:1]}).json()["data"][0]["embedding"]
    assert not np.allclose(base, emb[0], atol=1e-3)  # the adapter changes the embedding


def _png(w, h) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_input_errors_and_limits(vit_client):
    post = lambda body: vit_client.post("/v1/embeddings", json=body)  # noqa: E731
    _error(post({"model": "a1", "input": ["%%%"]}), 400, "invalid_image")
    _error(post({"model": "a1", "input": [base64.b64encode(b"not an image").decode()]}), 400, "invalid_image")
    _error(post({"model": "a1", "input": ["data:text/plain,hello"]}), 400, "invalid_image")
    _error(post({"input": [_png(5000, 4000)]}), 413, "image_too_large")  # decompression bomb: header checked first
    _error(post({"input": [image_b64(0)] * 17}), 413, "too_many_inputs")
    _error(post({"input": []}), 400, "empty_input")
    _error(post({"input": [image_b64(0)], "modality": "audio"}), 422, "invalid_request")
    _error(post({"input": [image_b64(0)], "normalize": "maybe"}), 422, "invalid_request")
    _error(post({"input": ["hello"], "modality": "text"}), 422, "unsupported_modality")
    _error(vit_client.post("/v1/embeddings", content=b"x" * (2 * 2**20 + 1), headers={"content-type": "application/json"}), 413, "payload_too_large")
    _error(vit_client.get("/v1/nothing"), 404, "not_found")
    metrics = vit_client.get("/metrics").text
    assert 'selora_errors_total{type="invalid_image"} 3.0' in metrics


def test_classify_with_head_and_without(vit_client):
    out = vit_client.post("/v1/classify", json={"model": "headed", "input": [image_b64(0), image_b64(1)], "top_k": 2}).json()
    assert len(out["data"]) == 2
    for item in out["data"]:
        preds = item["predictions"]
        assert len(preds) == 2 and {p["label"] for p in preds} <= {"cat", "dog", "bird"}
        assert preds[0]["score"] >= preds[1]["score"] and 0 < sum(p["score"] for p in preds) <= 1 + 1e-6
    all3 = vit_client.post("/v1/classify", json={"model": "headed", "input": [image_b64(0)], "top_k": 10}).json()
    assert abs(sum(p["score"] for p in all3["data"][0]["predictions"]) - 1) < 1e-5
    _error(vit_client.post("/v1/classify", json={"model": "a1", "input": [image_b64(0)]}), 422, "no_classifier")
    _error(vit_client.post("/v1/classify", json={"model": "base", "input": [image_b64(0)]}), 422, "no_classifier")
    _error(vit_client.post("/v1/classify", json={"input": [image_b64(0)], "labels": ["a", "b"]}), 422, "no_classifier")
    _error(vit_client.post("/v1/classify", json={"input": [image_b64(0)], "top_k": 0}), 422, "invalid_request")


def test_clip_text_embeddings_and_zero_shot(clip_client):
    texts = ["a photo of a cat", "a dog"]
    out = clip_client.post("/v1/embeddings", json={"model": "c1", "input": texts, "modality": "text"}).json()
    assert len(out["data"]) == 2 and len(out["data"][0]["embedding"]) == 32
    base = clip_client.post("/v1/embeddings", json={"model": "base", "input": texts, "modality": "text"}).json()
    assert not np.allclose(base["data"][0]["embedding"], out["data"][0]["embedding"], atol=1e-3)
    _error(clip_client.post("/v1/embeddings", json={"input": ["x" * 201], "modality": "text"}), 413, "text_too_long")
    res = clip_client.post("/v1/classify", json={"model": "c1", "input": [image_b64(0)], "labels": ["cat", "dog", "car"], "top_k": 3}).json()
    preds = res["data"][0]["predictions"]
    assert sorted(p["label"] for p in preds) == ["car", "cat", "dog"] and abs(sum(p["score"] for p in preds) - 1) < 1e-5
    _error(clip_client.post("/v1/classify", json={"input": [image_b64(0)], "labels": []}), 422, "invalid_input")
    _error(clip_client.post("/v1/classify", json={"input": [image_b64(0)], "labels": ["a", "a"]}), 422, "invalid_input")


def test_clip_zero_shot_head_scores_exactly_as_zero_shot_labels(tmp_path, tiny_clip):
    """A CLIP adapter's exported head (unit features, as the ``clip`` recipe trains it) serves the
    same probabilities as ``/v1/classify`` with its class names as labels."""
    classes = ["cat", "dog", "car"]
    blocks = list(tiny_clip.blocks)
    adapter = make_adapter(tiny_clip, active=[b for b in blocks if b.startswith("text")][:2] + blocks[:2], seed=4)
    with attached(tiny_clip, adapter):
        set_zero_shot_head(adapter, tiny_clip, classes)
    save_adapter(export_adapter(adapter, tiny_clip.model_id, tiny_clip.fingerprint), tmp_path / "zs")
    images = [image_b64(0), image_b64(1)]
    with TestClient(make_app(tiny_clip, tmp_path)) as client:
        assert client.get("/v1/adapters/zs").json()["head_input"] == "normalized"
        headed = client.post("/v1/classify", json={"model": "zs", "input": images, "top_k": 3}).json()["data"]
        labelled = client.post("/v1/classify", json={"model": "zs", "input": images, "labels": classes, "top_k": 3}).json()["data"]
    for h, z in zip(headed, labelled):
        h_scores = {p["label"]: p["score"] for p in h["predictions"]}
        z_scores = {p["label"]: p["score"] for p in z["predictions"]}
        assert h_scores == pytest.approx(z_scores, abs=1e-4)


def test_a_bfloat16_base_serves_the_same_embeddings(tmp_path, tiny_vit):
    """A base loaded in bf16 (the default on a GPU) serves embeddings (adapter included) that
    match the fp32 base's to bf16 precision."""
    from selora.models import load_backbone

    write_adapter(tiny_vit, tmp_path, "a", "dora", active=list(tiny_vit.blocks)[:3], seed=5)
    images = [image_b64(0), image_b64(1)]
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)  # the tiny_vit fixture's random weights, in bf16
        backbone = tiny_vit if dtype == torch.float32 else load_backbone("tiny-vit", dtype=dtype)
        with TestClient(make_app(backbone, tmp_path)) as client:
            assert client.get("/v1/models").json()["base"]["dtype"] == str(dtype)
            out = client.post("/v1/embeddings", json={"model": "a", "input": images}).json()
        got[dtype] = torch.tensor([d["embedding"] for d in out["data"]])
    cos = torch.nn.functional.cosine_similarity(got[torch.float32], got[torch.bfloat16], dim=-1)
    assert (cos > 0.99).all(), cos
