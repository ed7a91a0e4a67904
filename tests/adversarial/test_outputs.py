"""No response carries a non-finite number: an adapter whose finite weights overflow in the
forward fails its own request (422 naming it), and the other rows of the same batch are served."""

from __future__ import annotations

import asyncio

import torch

from selora.adapters.format import save_adapter
from tests.helpers import image_b64, make_app, run_with_client, write_adapter


def test_a_non_finite_forward_fails_only_its_own_request(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    write_adapter(tiny_vit, tmp_path, "good", active=blocks[:2], seed=1)
    bad = write_adapter(tiny_vit, tmp_path, "bad", active=blocks[6:8], seed=2)
    for w in bad.blocks.values():  # finite, and finite as scale·B·A, but the activations overflow
        w.lora_A.fill_(1.0)
        w.lora_B.fill_(1e30)
    save_adapter(bad, tmp_path / "bad")
    app = make_app(tiny_vit, tmp_path, max_wait_ms=200.0)
    batches = []
    engine = app.state.engine
    engine.on_batch = lambda modality, rows: batches.append(rows)

    async def calls(client):
        def post(model, seed):
            return client.post("/v1/embeddings", json={"model": model, "input": [image_b64(seed)]})

        solo = {m: (await post(m, i)).json() for i, m in enumerate(("good", "base"))}
        batches.clear()
        together = await asyncio.gather(post("bad", 5), post("good", 0), post("base", 1))
        return solo, together

    solo, (bad_resp, good_resp, base_resp) = run_with_client(app, calls)
    assert batches == [3]  # the three requests shared one forward
    assert bad_resp.status_code == 422, bad_resp.text
    error = bad_resp.json()["error"]
    assert error["type"] == "non_finite_output" and "'bad'" in error["message"]
    for resp, model in ((good_resp, "good"), (base_resp, "base")):
        assert resp.status_code == 200
        got = torch.tensor(resp.json()["data"][0]["embedding"])
        assert torch.isfinite(got).all() and torch.allclose(got, torch.tensor(solo[model]["data"][0]["embedding"]), atol=1e-5)
