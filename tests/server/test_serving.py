"""Serving semantics: batching equals one-at-a-time, hot swaps under traffic, and served
embeddings equal the adapter applied in-process and merged into the base weights."""

import asyncio
import base64
import copy
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from selora.adapters import attached, export_adapter, load_adapter
from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.adapters.merge import merge_into
from selora.runtime.batch import forward_mixed
from tests.helpers import make_adapter
from tests.helpers import image_b64, make_app, resident, run_with_client, write_adapter


def _pixels(backbone, b64: str) -> torch.Tensor:
    raw = base64.b64decode(b64.partition(",")[2] or b64)
    return backbone.preprocess(Image.open(io.BytesIO(raw)).convert("RGB"))[None]


def _batch_sizes(metrics_text: str) -> tuple[float, float]:
    """(number of image forwards, number of them with exactly one row)."""
    count = float(re.search(r'selora_batch_size_count\{modality="image"\} (\S+)', metrics_text).group(1))
    ones = float(re.search(r'selora_batch_size_bucket\{le="1\.0",modality="image"\} (\S+)', metrics_text).group(1))
    return count, ones


def test_64_concurrent_requests_over_8_adapters_equal_one_at_a_time(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    names = [f"t{i}" for i in range(8)]
    for i, n in enumerate(names):
        write_adapter(tiny_vit, tmp_path, n, "dora" if i % 3 == 2 else "lora", r=2 + i % 3, active=blocks[i : i + 1 + i % 4], seed=i)
    models = names + ["base"]
    requests = [{"model": models[i % 9], "input": [image_b64(i)] * (1 + i % 2), "normalize": i % 2 == 0} for i in range(64)]

    async def scenario(client):
        alone = []
        for body in requests:  # one at a time: every batch holds one request
            alone.append((await client.post("/v1/embeddings", json=body)).json())
        count0, ones0 = _batch_sizes((await client.get("/metrics")).text)
        together = await asyncio.gather(*(client.post("/v1/embeddings", json=body) for body in requests))
        return alone, together, (count0, ones0), _batch_sizes((await client.get("/metrics")).text)

    alone, together, before, after = run_with_client(make_app(tiny_vit, tmp_path, max_wait_ms=50.0), scenario)
    assert all(r.status_code == 200 for r in together)
    for a, t in zip(alone, together):
        ea = np.array([d["embedding"] for d in a["data"]])
        et = np.array([d["embedding"] for d in t.json()["data"]])
        assert np.abs(ea - et).max() <= 1e-4
    forwards, single_row = after[0] - before[0], after[1] - before[1]
    assert forwards < 64 and forwards - single_row >= 1  # requests were batched together (> 1 row per forward)


def test_load_replace_delete_under_traffic_lose_no_request(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    versions = {n: write_adapter(tiny_vit, tmp_path, n, active=blocks[i : i + 3], seed=10 + i) for i, n in enumerate(["s0", "s1", "s2", "v2"])}
    write_adapter(tiny_vit, tmp_path / "staging", "up", active=blocks[6:9], seed=20)
    img = image_b64(7)
    x = _pixels(tiny_vit, img)
    expected = {n: forward_mixed(tiny_vit, x, resident(tiny_vit, s), [0])[0].numpy() for n, s in versions.items()}
    expected["base"] = forward_mixed(tiny_vit, x, [], [-1])[0].numpy()
    expected["up"] = forward_mixed(tiny_vit, x, resident(tiny_vit, load_adapter(tmp_path / "staging" / "up")), [0])[0].numpy()
    files = {k: (tmp_path / "staging" / "up" / k).read_bytes() for k in (CONFIG_NAME, WEIGHTS_NAME)}

    async def traffic(client, model, n):
        out = []
        for _ in range(n):
            r = await client.post("/v1/embeddings", json={"model": model, "input": [img], "normalize": False})
            out.append((model, r.status_code, r.json()))
        return out

    async def admin(client):
        await asyncio.sleep(0.05)
        codes = [(await client.post("/v1/adapters", json={"name": "s0", "path": "v2"})).status_code]  # replace
        codes.append((await client.delete("/v1/adapters/s1")).status_code)
        codes.append((await client.post("/v1/adapters", data={"name": "up"}, files={"config": files[CONFIG_NAME], "weights": files[WEIGHTS_NAME]})).status_code)
        codes.append((await client.post("/v1/adapters", json={"name": "s2", "path": "s1"})).status_code)  # replace again
        return codes

    async def scenario(client):
        jobs = [traffic(client, m, 12) for m in ("s0", "s1", "s2", "base") for _ in range(3)]
        *results, codes = await asyncio.gather(*jobs, admin(client))
        after = await traffic(client, "up", 2)
        return [r for rs in results for r in rs] + after, codes

    results, codes = run_with_client(make_app(tiny_vit, tmp_path, max_wait_ms=10.0, max_batch_size=8), scenario)
    assert codes == [200, 200, 200, 200]
    assert len(results) == 4 * 3 * 12 + 2
    allowed = {"s0": ("s0", "v2"), "s1": ("s1",), "s2": ("s2", "s1"), "base": ("base",), "up": ("up",)}
    for model, status, body in results:
        assert status == 200 or (status == 404 and model == "s1"), (model, status, body)
        if status == 200:
            got = np.array(body["data"][0]["embedding"])
            assert min(np.abs(got - expected[v]).max() for v in allowed[model]) <= 1e-4, model


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_uploaded_adapter_equals_in_process_and_merged(tmp_path, tiny_vit, variant):
    blocks = list(tiny_vit.blocks)
    gated = make_adapter(tiny_vit, variant, r=4, active=[blocks[0], blocks[4], blocks[11]], seed=5)
    sparse = export_adapter(gated, tiny_vit.model_id, tiny_vit.fingerprint)
    from selora.adapters import save_adapter

    save_adapter(sparse, tmp_path / "outside_root")
    files = {k: (tmp_path / "outside_root" / k).read_bytes() for k in (CONFIG_NAME, WEIGHTS_NAME)}
    (tmp_path / "root").mkdir()
    imgs = [image_b64(i) for i in range(3)]

    async def scenario(client):
        up = await client.post("/v1/adapters", data={"name": "mine"}, files={"config": files[CONFIG_NAME], "weights": files[WEIGHTS_NAME]})
        assert up.status_code == 200, up.text
        r = await client.post("/v1/embeddings", json={"model": "mine", "input": imgs, "normalize": False})
        return np.array([d["embedding"] for d in r.json()["data"]])

    served = run_with_client(make_app(tiny_vit, tmp_path / "root"), scenario)
    x = torch.cat([_pixels(tiny_vit, s) for s in imgs])
    in_process = forward_mixed(tiny_vit, x, resident(tiny_vit, sparse), [0, 0, 0]).numpy()
    with torch.no_grad(), attached(tiny_vit, gated):  # the training-time path: gated blocks in plain torch
        trained = tiny_vit.encode_image(x).numpy()
    merged_bb = copy.deepcopy(tiny_vit)
    merge_into(merged_bb, sparse)
    with torch.no_grad():
        merged = merged_bb.encode_image(x).numpy()
    assert np.abs(served - in_process).max() <= 1e-4
    assert np.abs(served - trained).max() <= 1e-4
    assert np.abs(served - merged).max() <= 1e-4


def test_served_text_embedding_equals_merged_clip(tmp_path, tiny_clip):
    blocks = list(tiny_clip.blocks)
    sparse = write_adapter(tiny_clip, tmp_path, "c", "dora", active=[b for b in blocks if b.startswith("text")][::4] + blocks[:2], seed=8)
    texts = ["a photo of a cat", "two dogs", "a red car"]

    async def scenario(client):
        r = await client.post("/v1/embeddings", json={"model": "c", "input": texts, "modality": "text", "normalize": False})
        i = await client.post("/v1/embeddings", json={"model": "c", "input": [image_b64(1)], "normalize": False})
        return np.array([d["embedding"] for d in r.json()["data"]]), np.array(i.json()["data"][0]["embedding"])

    served_text, served_img = run_with_client(make_app(tiny_clip, tmp_path), scenario)
    merged_bb = copy.deepcopy(tiny_clip)
    merge_into(merged_bb, sparse)
    with torch.no_grad():
        text = merged_bb.encode_text(tiny_clip.tokenize(texts)).numpy()
        img = merged_bb.encode_image(_pixels(tiny_clip, image_b64(1)))[0].numpy()
    assert np.abs(served_text - text).max() <= 1e-4
    assert np.abs(served_img - img).max() <= 1e-4
