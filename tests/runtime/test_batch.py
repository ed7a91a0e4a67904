import copy

import pytest
import torch

from selora.adapters import export_adapter, inject, load_adapter, save_adapter
from selora.adapters.merge import merge_into
from selora.kernels.config import KernelConfig
from selora.runtime.batch import build_batch, forward_mixed, plan_rows
from tests.helpers import assert_rows_equal_merged, make_adapter, resident


def test_plan_rows_groups_stably():
    plan = plan_rows([2, -1, 0, 2, -1, 0])
    assert plan.order.tolist() == [1, 4, 2, 5, 0, 3]
    assert plan.groups == [(-1, 0, 2), (0, 2, 4), (2, 4, 6)]
    assert plan.order[plan.inverse].tolist() == list(range(6))


def test_block_no_row_uses_costs_nothing(tiny_vit):
    [a] = resident(tiny_vit, export_adapter(make_adapter(tiny_vit, active=["vision.1.fc2"]), "t", tiny_vit.fingerprint))
    batch = build_batch([a], plan_rows([0, -1]).groups, KernelConfig())
    assert list(batch.layers) == ["blocks.1.mlp.fc2"]
    assert build_batch([a], plan_rows([-1, -1]).groups, KernelConfig()).layers == {}


@pytest.mark.parametrize("backbone_name", ["tiny_vit", "tiny_clip"])
def test_mixed_batch_equals_each_row_alone_merged(backbone_name, request):
    bb = request.getfixturevalue(backbone_name)
    inject(bb)
    blocks = list(bb.blocks)
    specs = [("lora", 4, blocks[::3]), ("dora", 8, blocks[1::5]), ("lora", 2, blocks)]
    sparse = [export_adapter(make_adapter(bb, v, r, act, seed=i), bb.model_id, bb.fingerprint) for i, (v, r, act) in enumerate(specs)]
    adapters = resident(bb, *sparse)
    rows = [1, -1, 0, 2, 0, -1, 1, 2]
    x = torch.randn(len(rows), 3, 32, 32)
    mixed = forward_mixed(bb, x, adapters, rows)
    assert_rows_equal_merged(bb, x, mixed, rows, sparse)


def test_text_rows_use_their_adapters(tiny_clip):
    inject(tiny_clip)
    sparse = export_adapter(make_adapter(tiny_clip, active=["text.0.q", "text.1.fc1"]), "t", tiny_clip.fingerprint)
    tokens = tiny_clip.tokenize(["a photo of a cat", "a dog"])
    out = forward_mixed(tiny_clip, tokens, resident(tiny_clip, sparse), [0, -1], modality="text")
    merged = copy.deepcopy(tiny_clip)
    merge_into(merged, sparse)
    with torch.no_grad():
        torch.testing.assert_close(out[0], merged.encode_text(tokens[:1])[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1], tiny_clip.encode_text(tokens[1:])[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_save_load_forward_equals_in_memory(variant, tiny_clip, tmp_path):
    from selora.adapters import attached

    inject(tiny_clip)
    adapter = make_adapter(tiny_clip, variant, active=list(tiny_clip.blocks)[::2])
    x = torch.randn(3, 3, 32, 32)
    with attached(tiny_clip, adapter), torch.no_grad():
        in_memory = tiny_clip.encode_image(x)
    path = save_adapter(export_adapter(adapter, tiny_clip.model_id, tiny_clip.fingerprint), tmp_path / variant)
    [device_adapter] = resident(tiny_clip, load_adapter(path, tiny_clip.blocks))
    torch.testing.assert_close(forward_mixed(tiny_clip, x, [device_adapter], [0, 0, 0]), in_memory, atol=1e-5, rtol=0)
