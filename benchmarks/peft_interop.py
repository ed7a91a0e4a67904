"""PEFT interop at real model sizes: how exactly selora serves a converted PEFT adapter, and back.

For DINOv2-S (timm, real weights) and open_clip ViT-B-32 (random weights: no CLIP weights ship
offline), a PEFT adapter with random nonzero weights on every block site (mixed ranks through
``rank_pattern``/``alpha_pattern``; LoRA and, where PEFT allows, DoRA) is saved by PEFT itself,
converted (``selora.adapters.peft.from_peft``) and served (the server's mixed-batch forward).
Reported per case: the largest |served − PEFT| over the output's largest |PEFT|, the same for
selora → PEFT (``to_peft`` loaded by ``PeftModel.from_pretrained``) and for the merged export
loaded into the plain model, and the file sizes. Values are random, so the pruning line (blocks
holding 90 % of Σ‖ΔW‖²) shows the mechanism, not what a trained adapter concentrates.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/peft_interop.py

Results: ``benchmarks/results/peft_interop.{json,md}``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import selora.compat  # noqa: F401  (before timm/open_clip/peft)

import open_clip
import peft
import timm
import torch
from safetensors.torch import save_file

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.adapters.peft import from_peft, merged_state_dict, plain_state_dict, prune, to_peft, to_selora_files
from selora.models import load_backbone
from selora.models.dinov2 import DINOV2_ARCH, DINOV2_KWARGS
from selora.runtime.batch import forward_mixed
from selora.runtime.slots import DeviceSlots

RESULTS = Path(__file__).parent / "results"
CASES = [  # (model id, variant, PEFT LoraConfig)
    ("dinov2-small", "lora", dict(r=8, lora_alpha=16, target_modules=["qkv", "attn.proj", "fc1", "fc2"],
                                  rank_pattern={"fc2": 4, "qkv": 16}, alpha_pattern={"attn.proj": 4})),
    ("dinov2-small", "dora", dict(r=8, lora_alpha=8, target_modules=["qkv", "attn.proj", "fc1", "fc2"],
                                  use_dora=True, rank_pattern={"fc1": 4})),
    ("open_clip:ViT-B-32", "lora (rsLoRA)", dict(r=8, lora_alpha=16, target_modules=["attn", "c_fc", "c_proj"],
                                        rank_pattern={"c_fc": 4}, use_rslora=True)),
    ("open_clip:ViT-B-32", "dora on mlp", dict(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"], use_dora=True)),
]


def plain_model(bb):
    if bb.library == "timm":
        model = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=0, **DINOV2_KWARGS)
    else:
        model = open_clip.create_model(bb.model_id.partition(":")[2])
    model.load_state_dict(plain_state_dict(bb), strict=True)
    return model.eval()


def encode(bb, model, x):
    if bb.library == "timm":
        return model(x)
    base = model.base_model.model if isinstance(model, peft.PeftModel) else model
    return base.encode_image(x)


def relative_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def run_case(bb, variant, config, x) -> dict:
    model = peft.get_peft_model(plain_model(bb), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        elif "magnitude" in name:
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        peft_files = [(Path(tmp) / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)]
    expected = encode(bb, model, x)
    with model.disable_adapter():
        effect = relative_error(expected, encode(bb, model, x))
    adapter = from_peft(*peft_files, bb)
    served = forward_mixed(bb, x, [DeviceSlots.holding(bb, [adapter]).load(adapter)], [0] * len(x))
    cfg, tensors = to_peft(adapter, bb)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, Path(tmp) / WEIGHTS_NAME)
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(cfg))
        back = encode(bb, peft.PeftModel.from_pretrained(plain_model(bb), tmp).eval(), x)
    merged = plain_model(bb)
    merged.load_state_dict(merged_state_dict(adapter, bb))
    pruned, share = prune(adapter, bb, min_energy=0.9)
    return {
        "model": bb.model_id, "variant": variant, "blocks": len(adapter.blocks), "selora_r": adapter.r,
        "adapter_effect": effect,
        "peft_to_selora_rel_err": relative_error(served, expected),
        "selora_to_peft_rel_err": relative_error(back, served),
        "merged_rel_err": relative_error(encode(bb, merged, x), served),
        "peft_bytes": len(peft_files[1]), "selora_bytes": len(to_selora_files(adapter)[1]),
        "blocks_for_90pct_energy": len(pruned.blocks), "energy_kept": share,
    }


def main() -> None:
    torch.manual_seed(0)
    rows, backbones = [], {}
    for model_id, variant, config in CASES:
        if model_id not in backbones:
            backbones[model_id] = load_backbone(model_id)
        bb = backbones[model_id]
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        rows.append(run_case(bb, variant, config, x))
        print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peft_interop.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# PEFT interop", "", "`OMP_NUM_THREADS=2 .venv/bin/python benchmarks/peft_interop.py`", "",
        "Random nonzero PEFT adapters on every block site, fp32, image embeddings of 2 images at 224 px, CPU (shared machine).",
        "Errors: max |difference| / max |reference output|; effect: the PEFT model against its base, the same way.",
        "Scales that are powers of two fold into B without rounding (0.0 errors are real).", "",
        "| model | variant | effect | blocks | selora r | PEFT→selora | selora→PEFT | merged | PEFT bytes | selora bytes | blocks for 90 % Σ‖ΔW‖² |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['adapter_effect']:.2f} | {r['blocks']} | {r['selora_r']} | {r['peft_to_selora_rel_err']:.1e} | "
                     f"{r['selora_to_peft_rel_err']:.1e} | {r['merged_rel_err']:.1e} | {r['peft_bytes']} | {r['selora_bytes']} | "
                     f"{r['blocks_for_90pct_energy']} ({100 * r['energy_kept']:.1f} %) |")
    (RESULTS / "peft_interop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
