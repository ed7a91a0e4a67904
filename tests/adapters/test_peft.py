"""PEFT import/export and the merged export, checked against the real ``peft`` library on plain
timm / open_clip models holding the tiny backbones' weights."""

from __future__ import annotations

import json

import open_clip
import peft
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from selora.adapters import export_adapter
from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME, head_logits, parse_adapter
from selora.adapters.peft import (
    MHA_OUT_PROJ_FACTOR,
    PeftConversionError,
    block_energy,
    from_peft,
    merged_state_dict,
    plain_state_dict,
    prune,
    to_peft,
    to_selora_files,
)
from selora.runtime.batch import forward_mixed
from selora.runtime.slots import DeviceSlots
from tests.helpers import make_adapter

TINY_VIT = json.loads(open("selora/models/configs/tiny-vit.json").read())


def plain_model(bb):
    """The library's own model (open_clip: with ``nn.MultiheadAttention``) with the backbone's weights."""
    if bb.library == "timm":
        model = timm.create_model(TINY_VIT["arch"], pretrained=False, num_classes=0, **TINY_VIT["kwargs"])
    else:
        model = open_clip.create_model(f"selora-{bb.model_id}")
    model.load_state_dict(plain_state_dict(bb), strict=True)
    return model.eval()


def images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def served(bb, adapter, modality="image"):
    x = images() if modality == "image" else bb.tokenize(["a photo of a cat", "a dog", "two birds on a wire"])
    return forward_mixed(bb, x, [DeviceSlots.holding(bb, [adapter]).load(adapter)], [0] * len(x), modality=modality)


@torch.no_grad()
def reference(bb, model, modality="image"):
    """Outputs of a plain (or PEFT-wrapped) library model on the inputs ``served`` uses."""
    if bb.library == "timm":
        return model(images())
    base = model.base_model.model if hasattr(model, "base_model") else model
    if modality == "image":
        return base.encode_image(images())
    return base.encode_text(bb.tokenize(["a photo of a cat", "a dog", "two birds on a wire"]))


def peft_adapter(bb, tmp_path, seed=0, num_classes=None, **config):
    """A PEFT model with random nonzero LoRA/DoRA weights (and head), saved with ``save_pretrained``."""
    model = plain_model(bb)
    if num_classes is not None:  # a timm classifier: its own head, trained through modules_to_save
        model.reset_classifier(num_classes)
    model = peft.get_peft_model(model, peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    model.save_pretrained(tmp_path)
    return model, (tmp_path / CONFIG_NAME).read_bytes(), (tmp_path / WEIGHTS_NAME).read_bytes()


VIT_CASES = {
    "lora-mixed-ranks": dict(r=4, lora_alpha=8, target_modules=["qkv", "fc2"], layers_to_transform=[1], layers_pattern="blocks",
                             rank_pattern={"fc2": 2}, alpha_pattern={"qkv": 3}),
    "dora": dict(r=3, lora_alpha=5, target_modules=["qkv", "attn.proj", "fc1"], use_dora=True,
                 rank_pattern={"attn.proj": 6}),
    "rslora-head": dict(r=4, lora_alpha=4, target_modules=["fc1", "qkv"], use_rslora=True, modules_to_save=["head"],
                        num_classes=5),
}


@pytest.mark.parametrize("case", VIT_CASES)
def test_timm_peft_to_selora_is_exact(tiny_vit, tmp_path, case):
    bb = tiny_vit
    model, cfg_bytes, w_bytes = peft_adapter(bb, tmp_path, **VIT_CASES[case])
    adapter = parse_adapter(*to_selora_files(from_peft(cfg_bytes, w_bytes, bb)), bb.blocks)
    with torch.no_grad():
        if adapter.head_weight is not None:
            inner = model.base_model.model
            features = inner.forward_head(inner.forward_features(images()), pre_logits=True)
            torch.testing.assert_close(served(bb, adapter), features, atol=1e-5, rtol=1e-5)
            logits = head_logits(adapter.head_weight, adapter.head_bias, served(bb, adapter), adapter.head_input)
            torch.testing.assert_close(logits, model(images()), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(served(bb, adapter), reference(bb, model), atol=1e-5, rtol=1e-5)
    assert adapter.blocks and not torch.allclose(served(bb, adapter), reference(bb, plain_model(bb)), atol=1e-4)
    if case == "lora-mixed-ranks":
        assert set(adapter.blocks) == {"vision.1.q", "vision.1.k", "vision.1.v", "vision.1.fc2"}
        assert adapter.r == 4


def test_open_clip_peft_to_selora_is_exact(tiny_clip, tmp_path):
    bb = tiny_clip
    config = dict(r=4, lora_alpha=6, target_modules=r"^(visual\.transformer\.resblocks\.0\.attn|transformer\.resblocks\.1\.attn|.*\.mlp\.c_fc)$",
                  rank_pattern={r"^transformer\.resblocks\.1\.attn": 2}, alpha_pattern={"c_fc": 3})
    model, cfg_bytes, w_bytes = peft_adapter(bb, tmp_path, **config)
    adapter = from_peft(cfg_bytes, w_bytes, bb)
    assert "vision.0.out" in adapter.blocks and "text.1.q" in adapter.blocks and "vision.1.q" not in adapter.blocks
    for modality in ("image", "text"):
        torch.testing.assert_close(served(bb, adapter, modality), reference(bb, model, modality), atol=1e-5, rtol=1e-5)


def test_open_clip_dora_on_mlp_is_exact(tiny_clip, tmp_path):
    bb = tiny_clip
    model, cfg_bytes, w_bytes = peft_adapter(bb, tmp_path, r=2, lora_alpha=4, target_modules=["c_proj"], use_dora=True,
                                             layers_to_transform=[0], layers_pattern="resblocks")
    adapter = from_peft(cfg_bytes, w_bytes, bb)
    assert adapter.variant == "dora" and set(adapter.blocks) == {"vision.0.fc2", "text.0.fc2"}
    for modality in ("image", "text"):
        torch.testing.assert_close(served(bb, adapter, modality), reference(bb, model, modality), atol=1e-5, rtol=1e-5)


SELORA_CASES = [  # (backbone, variant, active blocks: a subset with q/k/v partly present)
    ("tiny_vit", "lora", ["vision.0.q", "vision.0.v", "vision.0.fc1", "vision.1.k", "vision.1.out", "vision.1.fc2"]),
    ("tiny_vit", "dora", ["vision.0.k", "vision.1.q", "vision.1.k", "vision.1.v", "vision.1.fc1"]),
    ("tiny_clip", "lora", ["vision.0.v", "vision.1.out", "text.0.q", "text.0.k", "text.1.fc1", "vision.0.fc2"]),
    ("tiny_clip", "dora", ["vision.1.fc1", "text.0.fc2"]),
]


@pytest.mark.parametrize("name,variant,active", SELORA_CASES)
def test_selora_to_peft_is_exact(request, tmp_path, name, variant, active):
    bb = request.getfixturevalue(name)
    adapter = export_adapter(make_adapter(bb, variant, r=3, active=active, seed=7), bb.model_id, bb.fingerprint)
    config, tensors = to_peft(adapter, bb)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    model = peft.PeftModel.from_pretrained(plain_model(bb), tmp_path).eval()
    for modality in ("image", "text") if bb.library == "open_clip" else ("image",):
        torch.testing.assert_close(reference(bb, model, modality), served(bb, adapter, modality), atol=1e-5, rtol=1e-5)
    back = from_peft((tmp_path / CONFIG_NAME).read_bytes(), (tmp_path / WEIGHTS_NAME).read_bytes(), bb)
    torch.testing.assert_close(served(bb, back), served(bb, adapter), atol=1e-5, rtol=1e-5)
    assert back.r == adapter.r and set(back.blocks) >= set(adapter.blocks)
    if variant == "lora":  # the zero slices export adds come back as nothing
        assert set(back.blocks) == set(adapter.blocks)


@pytest.mark.parametrize("name,variant,first", [("tiny_vit", "dora", 0), ("tiny_clip", "lora", 1)])
def test_merged_model_equals_served(request, name, variant, first):
    bb = request.getfixturevalue(name)
    blocks = list(bb.blocks)[first::2]
    adapter = export_adapter(make_adapter(bb, variant, r=4, active=blocks, seed=3), bb.model_id, bb.fingerprint)
    model = plain_model(bb)
    model.load_state_dict(merged_state_dict(adapter, bb), strict=True)
    for modality in ("image", "text") if bb.library == "open_clip" else ("image",):
        torch.testing.assert_close(reference(bb, model, modality), served(bb, adapter, modality), atol=1e-5, rtol=1e-5)


def test_timm_head_goes_to_peft_and_merged(tiny_vit, tmp_path):
    bb = tiny_vit
    adapter = export_adapter(make_adapter(bb, "dora", r=2, active=["vision.1.v", "vision.0.fc2"], seed=4,
                                          head_classes=["a", "b", "c"]), bb.model_id, bb.fingerprint)
    logits = head_logits(adapter.head_weight, adapter.head_bias, served(bb, adapter), "raw")
    config, tensors = to_peft(adapter, bb)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    base, merged = plain_model(bb), plain_model(bb)
    base.reset_classifier(3)
    merged.reset_classifier(3)
    merged.load_state_dict(merged_state_dict(adapter, bb), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(base, tmp_path).eval()(images()), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(images()), logits, atol=1e-5, rtol=1e-5)
    adapter.head_input = "normalized"
    with pytest.raises(PeftConversionError, match="normalised embedding"):
        to_peft(adapter, bb)


def test_prune_keeps_what_it_reports(tiny_vit):
    bb = tiny_vit
    adapter = export_adapter(make_adapter(bb, "dora", r=4, seed=5), bb.model_id, bb.fingerprint)
    base = plain_state_dict(bb)

    def change(a):  # Σ‖W_merged − W0‖² over the whole model, from the merged state dict
        merged = merged_state_dict(a, bb)
        return sum(float((merged[k].double() - base[k].double()).pow(2).sum()) for k in base)

    total = change(adapter)
    energy = block_energy(adapter, bb)
    top3, share = prune(adapter, bb, max_active_blocks=3)
    assert set(top3.blocks) == set(sorted(energy, key=energy.get)[-3:])
    assert share == pytest.approx(change(top3) / total, rel=1e-9)
    kept, share = prune(adapter, bb, min_energy=0.8)
    assert share >= 0.8 and share == pytest.approx(change(kept) / total, rel=1e-9)
    fewer, _ = prune(adapter, bb, max_active_blocks=len(kept.blocks) - 1)
    assert change(fewer) / total < 0.8  # the fewest blocks reaching the share
    everything, share = prune(adapter, bb)
    assert set(everything.blocks) == set(adapter.blocks) and share == pytest.approx(1.0, rel=1e-12)


def _peft_files(bb, tmp_path, **config):
    _, cfg_bytes, w_bytes = peft_adapter(bb, tmp_path, **config)
    return json.loads(cfg_bytes), load_file(tmp_path / WEIGHTS_NAME)


def _convert(bb, cfg, tensors):
    from safetensors.torch import save

    return from_peft((cfg if isinstance(cfg, str) else json.dumps(cfg)).encode(), save(tensors), bb)


def test_unrepresentable_peft_adapters_are_refused(tiny_vit, tmp_path):
    bb = tiny_vit
    cfg, tensors = _peft_files(bb, tmp_path, r=2, target_modules=["qkv"])
    refusals = {  # a phrase of the message -> the adapter's config and tensors
        "'IA3' cannot be served": ({**cfg, "peft_type": "IA3"}, tensors),
        "trains biases": ({**cfg, "bias": "all"}, tensors),
        "lora_bias=True is not supported": ({**cfg, "lora_bias": True}, tensors),
        "modules_to_save ['norm']": ({**cfg, "modules_to_save": ["norm"]}, tensors),
        "is not a module name": ({**cfg, "rank_pattern": {"(a+)+$": 2}}, tensors),
        "'fc1(' is not a module name": ({**cfg, "alpha_pattern": {"fc1(": 2}}, tensors),
        "at most 1024 module names": ({**cfg, "rank_pattern": {f"blocks.{i}.attn.qkv": 2 for i in range(1025)}}, tensors),
        "not valid JSON": ("[" * 100_000, tensors),
        "embedding layers": (cfg, {**tensors, "base_model.model.pos_embed.lora_embedding_A": torch.zeros(2, 3)}),
        "trained biases": (cfg, {**tensors, "base_model.model.blocks.0.attn.qkv.bias": torch.zeros(192)}),
        "is not a block of this base": (cfg, {k.replace("attn.qkv", "patch_embed.proj"): v for k, v in tensors.items()}),
        "do not fit": (cfg, {k: v[:, :10].contiguous() if "lora_A" in k else v for k, v in tensors.items()}),
        "do not fit its base layer": (cfg, {k: torch.tensor(1.0) if "lora_A" in k else v for k, v in tensors.items()}),
        "'magnitude']": ({**cfg, "use_dora": True}, tensors),
        "has rank 2, its config says 5": ({**cfg, "r": 5}, tensors),
        "disagree on a classification head": ({**cfg, "modules_to_save": ["head"]}, tensors),
        "not a linear classifier": ({**cfg, "modules_to_save": ["head"]},
                                    {**tensors, "base_model.model.head.weight": torch.zeros(3, 10),
                                     "base_model.model.head.bias": torch.zeros(3)}),
    }
    for phrase, (c, t) in refusals.items():
        with pytest.raises(PeftConversionError) as info:
            _convert(bb, c, t)
        assert phrase in str(info.value)


def test_unrepresentable_exports_are_refused(tiny_clip):
    bb = tiny_clip
    dora_attn = export_adapter(make_adapter(bb, "dora", r=2, active=["vision.0.q"]), bb.model_id, bb.fingerprint)
    with pytest.raises(PeftConversionError, match="DoRA on open_clip attention"):
        to_peft(dora_attn, bb)
    head = export_adapter(make_adapter(bb, "lora", r=2, active=["text.0.fc1"], head_classes=["a", "b"]), bb.model_id, bb.fingerprint)
    with pytest.raises(PeftConversionError, match="head"):
        to_peft(head, bb)
    with pytest.raises(PeftConversionError, match="head"):
        merged_state_dict(head, bb)


def test_peft_module_names_follow_peft(tiny_clip, tmp_path):
    """Keys ``to_peft`` writes are exactly those PEFT itself saves for the same targets."""
    bb = tiny_clip
    active = ["vision.1.k", "vision.1.v", "text.0.fc2"]
    adapter = export_adapter(make_adapter(bb, "lora", r=2, active=active), bb.model_id, bb.fingerprint)
    config, tensors = to_peft(adapter, bb)
    theirs = peft.get_peft_model(plain_model(bb), peft.LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path")}))
    expected = {k.replace(".default", "") for k in peft.get_peft_model_state_dict(theirs)}
    assert set(tensors) == expected
    shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert config["rank_pattern"] == {r"^visual\.transformer\.resblocks\.1\.attn": 4}  # k and v stacked: 2 r


def test_peft_mha_applies_its_out_proj_delta_twice(tiny_clip, tmp_path):
    """What ``MHA_OUT_PROJ_FACTOR`` stands for: PEFT's MultiheadAttention output equals plain
    attention with ``out_proj`` weight ``W + 2·s·B·A``. Fails (and the factor must go) once PEFT changes."""
    model, _, _ = peft_adapter(tiny_clip, tmp_path, r=2, lora_alpha=4, target_modules=[r"visual.transformer.resblocks.0.attn"])
    attn = model.base_model.model.visual.transformer.resblocks[0].attn
    plain = plain_model(tiny_clip).visual.transformer.resblocks[0].attn
    out = attn.base_layer.out_proj
    with torch.no_grad():
        plain.in_proj_weight += attn.get_delta_weight("default")
        plain.out_proj.weight += MHA_OUT_PROJ_FACTOR * out.get_delta_weight("default")
        x = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], plain(x, x, x, need_weights=False)[0],
                                   atol=1e-5, rtol=1e-5)


def test_peft_upload_through_the_app(tiny_vit, tmp_path):
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from tests.helpers import image_b64, make_app

    bb = tiny_vit
    model, cfg_bytes, w_bytes = peft_adapter(bb, tmp_path / "peft", r=3, lora_alpha=6, target_modules=["qkv", "fc2"],
                                             use_dora=True, rank_pattern={"fc2": 2})
    root = tmp_path / "adapters"
    root.mkdir()
    image = image_b64(4)
    with TestClient(make_app(bb, root)) as client:
        up = client.post("/v1/adapters", data={"name": "from-peft"}, files={"config": cfg_bytes, "weights": w_bytes})
        assert up.status_code == 200, up.text
        info = up.json()
        assert info["variant"] == "dora" and info["r"] == 3 and info["num_active"] == 8  # q, k, v, fc2 of 2 layers
        bad = client.post("/v1/adapters", data={"name": "bad"},
                          files={"config": cfg_bytes.replace(b'"LORA"', b'"IA3"'), "weights": w_bytes})
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_adapter"
        assert "IA3" in bad.json()["error"]["message"]
        assert [a["name"] for a in client.get("/v1/adapters").json()["data"]] == ["from-peft"]
        out = client.post("/v1/embeddings", json={"model": "from-peft", "input": [image], "normalize": False})
        assert out.status_code == 200, out.text
        served_embedding = torch.tensor(out.json()["data"][0]["embedding"])
    pixels = bb.preprocess(Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).convert("RGB"))
    with torch.no_grad():
        torch.testing.assert_close(served_embedding, model(pixels[None])[0], atol=1e-5, rtol=1e-5)
    with TestClient(make_app(bb, root)) as client:  # a restart reads the store: it holds the converted selora files
        again = client.post("/v1/embeddings", json={"model": "from-peft", "input": [image], "normalize": False})
        assert torch.equal(torch.tensor(again.json()["data"][0]["embedding"]), served_embedding)


def test_convert_command(tiny_clip, tmp_path, capsys):
    from selora.adapters import save_adapter
    from selora.cli import main

    bb = tiny_clip
    save_file(plain_state_dict(bb), tmp_path / "base.safetensors")
    active = ["vision.0.q", "vision.0.v", "vision.1.out", "text.1.fc1", "text.0.k"]
    adapter = export_adapter(make_adapter(bb, "lora", r=2, active=active, seed=9), bb.model_id, bb.fingerprint)
    save_adapter(adapter, tmp_path / "sel")
    base = ["--model", "tiny-clip", "--weights", str(tmp_path / "base.safetensors")]
    assert main(["convert", str(tmp_path / "sel"), str(tmp_path / "peft"), "--to", "peft", *base]) == 0
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "selora", *base,
                 "--max-active-blocks", "2"]) == 0
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "merged.safetensors"), "--to", "merged", *base]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0].endswith("5/5 blocks kept, 100.00% of sum ||dW||^2, variant lora, r 2")
    back = parse_adapter((tmp_path / "back" / CONFIG_NAME).read_bytes(), (tmp_path / "back" / WEIGHTS_NAME).read_bytes(), bb.blocks)
    energy = block_energy(adapter, bb)
    assert set(back.blocks) == set(sorted(energy, key=energy.get)[-2:])
    share = sum(energy[b] for b in back.blocks) / sum(energy.values())
    assert f"2/5 blocks kept, {100 * share:.2f}%" in report[1]
    merged = plain_model(bb)
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"), strict=True)
    torch.testing.assert_close(reference(bb, merged), served(bb, back), atol=1e-5, rtol=1e-5)
    assert main(["convert", str(tmp_path / "sel"), str(tmp_path / "x"), "--to", "merged", *base]) == 2
    assert "must end with .safetensors" in capsys.readouterr().err
