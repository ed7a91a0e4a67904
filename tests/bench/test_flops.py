"""The closed-form FLOP count equals FlopCounterMode's on tiny models: base, gated LoRA/DoRA
through selora's serving path (the kernel op's registered formula), and the PEFT peer."""

from __future__ import annotations

import pytest
import torch

from selora.bench import grid, peers
from selora.bench.flops import base_flops, closed_form_flops, counted_flops, peft_added_flops, tower_tokens
from selora.adapters.synthetic import random_adapter
from selora.bench.synthetic import paper_block_order
from selora.runtime.batch import forward_mixed
from tests.helpers import resident


def _images(bb, n):
    return torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_clip"])
def test_base_count_equals_closed_form_attention_included(name, request):
    bb = request.getfixturevalue(name)
    x = _images(bb, 3)
    counted = counted_flops(lambda: bb.encode_image(x))
    assert counted == 3 * base_flops(bb)["vision"]
    # attention is part of both: 4·T²·d per layer, which CPU SDPA would count as 0 without the formula
    t, layers = tower_tokens(bb)["vision"], bb.blocks.num_layers("vision")
    width = bb.blocks["vision.0.q"].d_out
    attention = 3 * layers * 4 * t * t * width
    linears_only = counted - attention
    assert 0 < linears_only < counted


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_clip"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_gated_adapter_count_is_base_plus_active_blocks(name, variant, request):
    bb = request.getfixturevalue(name)
    blocks = paper_block_order(bb.blocks)[:3] + (["text.1.k"] if "text" in bb.blocks.towers else [])
    [dev] = resident(bb, random_adapter(bb.blocks, blocks, 8, variant))
    rows = [0, -1, 0, 0]  # one base-only row: it must cost nothing beyond the base GEMMs
    x = _images(bb, len(rows))
    counted = counted_flops(lambda: forward_mixed(bb, x, [dev], rows))
    gated, base = closed_form_flops(bb, {b: 8 for b in blocks}), base_flops(bb)
    assert counted == 3 * gated["vision"] + base["vision"]
    assert gated["vision"] > base["vision"]
    if "text" in bb.modalities:
        tokens = bb.tokenize(["a", "b"])
        counted_text = counted_flops(lambda: forward_mixed(bb, tokens, [dev], [0, 0], modality="text"))
        assert counted_text == 2 * gated["text"] != 2 * base["text"]


@pytest.mark.parametrize("dora", [False, True])
def test_peft_count_equals_its_closed_form(tiny_vit, dora):
    model = peers.peft_model(peers.pristine_copy(tiny_vit), 4, dora)
    x = _images(tiny_vit, 2)
    counted = counted_flops(lambda: model(x))
    assert counted == 2 * base_flops(tiny_vit)["vision"] + peft_added_flops(tiny_vit, 4, 2, dora)


def test_flop_grid_on_meta_matches_and_gated_stays_flat(tiny_clip):
    rows = grid.flop_grid(tiny_clip, grid.GridSpec(ranks=[4, 32]))
    assert rows and all(r["match"] for r in rows)
    base = next(r["flops"] for r in rows if r["method"] == "base")
    merged = next(r["flops"] for r in rows if r["method"] == "merged")
    assert merged == base
    added = {(r["method"], r["variant"], r["rank"]): r["flops"] - base for r in rows if r["variant"] and r["method"] != "merged"}
    for variant in ("lora", "dora"):
        # every-block LoRA grows with rank 8x from r4 to r32; a gated adapter adds far less
        assert added[("lora_all", variant, 32)] == 8 * added[("lora_all", variant, 4)]
        assert 0 < added[("gated_1", variant, 32)] < added[("lora_all", variant, 32)] / 5


def test_unknown_chosen_block_is_a_clear_error(tiny_vit):
    with pytest.raises(grid.BenchError, match="vision.99.fc1"):
        grid.flop_grid(tiny_vit, grid.GridSpec(ranks=[4], chosen_blocks=["vision.99.fc1"]))


def test_peft_peer_needs_a_timm_model(tiny_clip):
    with pytest.raises(peers.PeerError, match="timm"):
        peers.peft_model(tiny_clip, 4, False)


def test_timed_peers_run_in_the_bases_dtype():
    """In bf16 (the GPU preset's dtype) every timed peer runs, PEFT's adapters included."""
    import torch

    from selora.bench import grid, peers
    from selora.models import load_backbone

    torch.manual_seed(0)
    pristine = load_backbone("tiny-vit", dtype=torch.bfloat16)
    rows = grid.latency_grid(pristine, peers.pristine_copy(pristine), ranks=(4,), batches=(2,), gated_fraction=0.1,
                             warmup=0, reps=1)
    assert {(r["method"], r["variant"]) for r in rows} >= {("base", None), ("selora_gated", "dora"), ("peft", "dora"), ("merged", "lora")}
    model = peers.peft_model(pristine, 4, dora=True)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
