import pytest
import torch
from torch import nn

from selora.models import KINDS, ModelError, fingerprint, list_models, load_backbone
from selora.models.attention import ExplicitAttention


def test_named_models_listed():
    assert {"dinov2-small", "tiny-vit", "tiny-clip"} <= set(list_models())


def test_block_counts_of_real_architectures():
    vit = load_backbone("timm:vit_small_patch16_224")
    assert len(vit.blocks) == 72 and vit.blocks.towers == ("vision",)
    clip = load_backbone("open_clip:ViT-B-16")
    assert len(clip.blocks) == 144 and clip.blocks.towers == ("vision", "text")
    q, fc1 = clip.blocks["text.0.q"], clip.blocks["vision.11.fc1"]
    assert (q.site, q.out_start, q.shape) == ("transformer.resblocks.0.attn.in_proj", 0, (512, 512))
    assert fc1.site == "visual.transformer.resblocks.11.mlp.c_fc" and fc1.shape == (3072, 768)
    assert vit.blocks["vision.3.v"].out_start == 2 * 384


def test_fingerprint_is_the_documented_hash():
    import hashlib

    shapes = {"vision.0.q": (8, 8), "vision.0.fc1": (32, 8)}
    text = "vision.0.fc1 32x8\nvision.0.q 8x8"
    assert fingerprint(shapes) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown model"):
        load_backbone("no-such-model")
    with pytest.raises(ModelError, match="library"):
        load_backbone("keras:vit")


def _fresh_open_clip():
    import open_clip

    from selora.models.catalog import named_config as _named_config

    open_clip.factory._MODEL_CONFIGS["selora-tiny-clip"] = _named_config("tiny-clip")["model_cfg"]
    torch.manual_seed(1)
    return open_clip.create_model("selora-tiny-clip").eval()


def test_explicit_attention_equals_open_clip_mha():
    from selora.models.attention import make_attention_explicit

    original = _fresh_open_clip()
    explicit = _fresh_open_clip()
    assert make_attention_explicit(explicit) == 4
    assert not any(isinstance(m, nn.MultiheadAttention) for m in explicit.modules())
    assert sum(isinstance(m, ExplicitAttention) for m in explicit.modules()) == 4
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(1, 49000, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(explicit.encode_image(images), original.encode_image(images), atol=1e-5, rtol=0)
        # the text tower runs with open_clip's causal mask
        assert original.attn_mask is not None
        torch.testing.assert_close(explicit.encode_text(tokens), original.encode_text(tokens), atol=1e-5, rtol=0)


def test_explicit_attention_bool_and_per_head_masks():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ours = ExplicitAttention(mha).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, x, x, attn_mask=mask)[0], mha(x, x, x, attn_mask=mask, need_weights=False)[0], atol=1e-5, rtol=0)
        per_head = torch.randn(4, 5, 5)
        torch.testing.assert_close(ours(x, x, x, attn_mask=per_head)[0], mha(x, x, x, attn_mask=per_head, need_weights=False)[0], atol=1e-5, rtol=0)


def test_backbones_embed_and_preprocess(tiny_vit, tiny_clip):
    from PIL import Image

    img = Image.new("RGB", (50, 40), (120, 30, 200))
    for bb in (tiny_vit, tiny_clip):
        px = bb.preprocess(img)
        assert px.shape == (3, 32, 32)
        with torch.no_grad():
            assert bb.encode_image(px[None]).shape == (1, bb.embed_dim)
    assert tiny_vit.modalities == ("image",) and tiny_clip.modalities == ("image", "text")
    with pytest.raises(ModelError):
        tiny_vit.tokenize(["a"])


def test_kinds_cover_every_site(tiny_vit):
    kinds = {s.kind for s in tiny_vit.blocks.values()}
    assert kinds == set(KINDS)
    assert len(tiny_vit.blocks.sites()) == 2 * 4


def test_local_safetensors_weights_load_for_both_libraries(tmp_path):
    from safetensors.torch import save_file

    original = _fresh_open_clip()  # open_clip's own parameter names (attn.in_proj_weight, ...)
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, tmp_path / "clip.safetensors")
    clip = load_backbone("tiny-clip", weights=str(tmp_path / "clip.safetensors"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), original.encode_image(images), atol=1e-5, rtol=0)

    vit = load_backbone("tiny-vit")
    save_file(vit.model.state_dict(), tmp_path / "vit.safetensors")
    again = load_backbone("tiny-vit", weights=str(tmp_path / "vit.safetensors"))
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), vit.encode_image(images))


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"\x80\x04K\x01.")
    for model in ("tiny-clip", "tiny-vit"):
        with pytest.raises(ModelError, match="safetensors"):
            load_backbone(model, weights=str(tmp_path / "w.pt"))
