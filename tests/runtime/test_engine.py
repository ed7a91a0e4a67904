import asyncio

import pytest
import torch
import torch.nn.functional as F

from selora.models.prompts import zero_shot_weights
from selora.runtime.batch import forward_mixed
from selora.runtime.engine import EngineStoppedError, NoClassifierError, OverloadedError
from selora.runtime.inputs import Limits, preprocess_images
from tests.helpers import image_b64, make_engine, resident, write_adapter


async def _running(engine, coro_fn):
    await engine.start()
    try:
        return await coro_fn()
    finally:
        await engine.stop()


def test_mixed_texts_and_images_in_one_cycle_equal_forward_mixed(tmp_path, tiny_clip):
    blocks = list(tiny_clip.blocks)
    sa = write_adapter(tiny_clip, tmp_path, "a", active=blocks[:3] + blocks[-2:], seed=1)
    sb = write_adapter(tiny_clip, tmp_path, "b", "dora", active=blocks[5:9] + blocks[14:16], seed=2)
    engine = make_engine(tiny_clip, tmp_path, max_batch_size=64, max_wait_ms=100.0)
    imgs = [image_b64(i) for i in range(4)]
    texts = ["a cat", "a dog", "a car"]
    batches = []
    engine.on_batch = lambda modality, rows: batches.append((modality, rows))

    async def calls():
        return await asyncio.gather(
            engine.embed("default/a", "image", imgs[:2]), engine.embed("base", "image", imgs[2:3]),
            engine.embed("default/b", "image", imgs[3:]), engine.embed("default/b", "text", texts[:2]),
            engine.embed("default/a", "text", texts[2:]),
        )

    ia, ibase, ib, tb, ta = asyncio.run(_running(engine, calls))
    assert sorted(batches) == [("image", 4), ("text", 3)]  # one batching cycle, one forward per modality
    adapters = resident(tiny_clip, sa, sb)
    x = preprocess_images(tiny_clip, imgs, Limits())
    ref_img = forward_mixed(tiny_clip, x, adapters, [0, 0, -1, 1])
    ref_txt = forward_mixed(tiny_clip, tiny_clip.tokenize(texts), adapters, [1, 1, 0], "text")
    assert torch.allclose(torch.cat([ia, ibase, ib]), ref_img, atol=1e-5)
    assert torch.allclose(torch.cat([tb, ta]), ref_txt, atol=1e-5)


def test_zero_shot_runs_prompts_under_the_adapter(tmp_path, tiny_clip):
    blocks = list(tiny_clip.blocks)
    sa = write_adapter(tiny_clip, tmp_path, "a", active=[b for b in blocks if b.startswith("text")][:4], seed=3)
    engine = make_engine(tiny_clip, tmp_path)
    labels = ["cat", "dog", "plane"]
    preds = asyncio.run(_running(engine, lambda: engine.classify("default/a", [image_b64(0)], labels, top_k=3)))[0]
    [dev] = resident(tiny_clip, sa)
    weights = zero_shot_weights(tiny_clip, labels, encode_text=lambda t: forward_mixed(tiny_clip, t, [dev], [0] * len(t), "text"))
    img = forward_mixed(tiny_clip, preprocess_images(tiny_clip, [image_b64(0)], Limits()), [dev], [0])
    probs = (tiny_clip.model.logit_scale.exp() * F.normalize(img, dim=-1) @ weights.t()).softmax(-1)[0]
    base_weights = zero_shot_weights(tiny_clip, labels)
    assert not torch.allclose(weights, base_weights, atol=1e-3)  # the adapter reaches the text tower
    for label, score in preds:
        assert abs(score - float(probs[labels.index(label)])) < 1e-5


def test_bounded_queue_refuses_with_retry_after(tmp_path, tiny_vit):
    engine = make_engine(tiny_vit, tmp_path, max_batch_size=2, max_wait_ms=200.0, max_queue=3)

    async def flood():
        return await asyncio.gather(*(engine.embed("base", "image", [image_b64(i)]) for i in range(8)), return_exceptions=True)

    results = asyncio.run(_running(engine, flood))
    refused = [r for r in results if isinstance(r, OverloadedError)]
    assert refused and refused[0].retry_after >= 1
    assert all(isinstance(r, torch.Tensor) for r in results if not isinstance(r, OverloadedError))


def test_stopped_engine_and_missing_head(tmp_path, tiny_vit):
    engine = make_engine(tiny_vit, tmp_path)
    with pytest.raises(EngineStoppedError):
        asyncio.run(engine.embed("base", "image", [image_b64(0)]))
    with pytest.raises(NoClassifierError):
        asyncio.run(_running(engine, lambda: engine.classify("base", [image_b64(0)], None, 1)))
