import asyncio

import pytest
import torch
import torch.nn.functional as F

from selora.adapters.format import save_adapter
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

    ia, ibase, ib, tb, ta = (e.vectors for e in asyncio.run(_running(engine, calls)))
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
    assert all(isinstance(r.vectors, torch.Tensor) for r in results if not isinstance(r, OverloadedError))


def test_stopped_engine_and_missing_head(tmp_path, tiny_vit):
    engine = make_engine(tiny_vit, tmp_path)
    with pytest.raises(EngineStoppedError):
        asyncio.run(engine.embed("base", "image", [image_b64(0)]))
    with pytest.raises(NoClassifierError):
        asyncio.run(_running(engine, lambda: engine.classify("base", [image_b64(0)], None, 1)))


def test_one_cycle_with_two_input_sizes_runs_one_forward_per_size(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    small = write_adapter(tiny_vit, tmp_path, "small", active=blocks[:2], seed=5)
    small.input_size = (16, 24)
    save_adapter(small, tmp_path / "small")
    full = write_adapter(tiny_vit, tmp_path, "full", "dora", active=blocks[3:6], seed=6)
    engine = make_engine(tiny_vit, tmp_path, max_batch_size=64, max_wait_ms=100.0)
    batches = []
    engine.on_batch = lambda modality, rows: batches.append((modality, rows))
    imgs = [image_b64(i) for i in range(5)]

    async def calls():
        return await asyncio.gather(engine.embed("default/small", "image", imgs[:2]), engine.embed("default/full", "image", imgs[2:4]),
                                    engine.embed("base", "image", imgs[4:]), engine.embed("default/small", "image", imgs[4:]))

    s1, f, b, s2 = asyncio.run(_running(engine, calls))
    assert sorted(batches) == [("image", 3), ("image", 3)]  # one cycle: 16x24 rows and 32x32 rows apart
    with tiny_vit.sizes.at((16, 24)):
        ref_small = forward_mixed(tiny_vit, preprocess_images(tiny_vit, imgs[:2] + imgs[4:], Limits(), (16, 24)),
                                  resident(tiny_vit, small), [0, 0, 0])
    ref_full = forward_mixed(tiny_vit, preprocess_images(tiny_vit, imgs[2:], Limits()), resident(tiny_vit, full), [0, 0, -1])
    assert torch.allclose(torch.cat([s1.vectors, s2.vectors]), ref_small, atol=1e-5)
    assert torch.allclose(torch.cat([f.vectors, b.vectors]), ref_full, atol=1e-5)
    assert (s1.tokens, f.tokens, b.tokens) == (2 * (1 + 2 * 3), 2 * 17, 17)
    assert tiny_vit.model.pos_embed.shape[1] == 17  # the built grid is back after the 16x24 forward
