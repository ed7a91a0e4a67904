"""FLOPs per item (image or text), counted two ways that must agree.

Unit: FLOPs = 2 per multiply-add, matrix products only (linear layers, the patch-embedding
convolution, the two attention matmuls), the convention of ``torch.utils.flop_counter``.

- ``closed_form_flops``: from the model's shapes alone. Per tower with ``T`` tokens per item:
  every ``nn.Linear`` of the transformer ``2·T·d_in·d_out``; attention ``4·T²·d`` per layer
  (QKᵀ and AV); the patch embedding ``2·patches·(C·p·p)·d``; the output projection of the
  pooled token ``2·d·d_embed``; and each active adapter block ``2·T·r·(d_in + d_out)``.
- ``counted_flops``: ``FlopCounterMode`` over a real forward (the kernel op's registered
  formula included). CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``) has no formula
  in torch, so ``register_cpu_sdpa_flop_formula`` gives it torch's own SDPA count.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from selora.adapters.layer import AdaptedLinear
from selora.models.factory import Backbone

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def register_cpu_sdpa_flop_formula() -> None:
    """Count CPU flash SDPA like CUDA SDPA (idempotent; torch counts it as 0 otherwise)."""
    if _CPU_SDPA in flop_registry:
        return

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def counted_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs that ``FlopCounterMode`` counts while ``fn()`` runs."""
    register_cpu_sdpa_flop_formula()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- closed form --------------------------------------------------------------------------
def _linears(module: nn.Module) -> list[nn.Linear]:
    """Every base ``nn.Linear`` under ``module`` (an ``AdaptedLinear`` counts as its base)."""
    return [m for m in module.modules() if isinstance(m, nn.Linear) and not isinstance(m, AdaptedLinear)]


def _gemm(tokens: int, linears: list[nn.Linear]) -> int:
    return sum(2 * tokens * m.in_features * m.out_features for m in linears)


def _conv(conv: nn.Conv2d, positions: int) -> int:
    kh, kw = conv.kernel_size
    return 2 * positions * (conv.in_channels // conv.groups) * kh * kw * conv.out_channels


def _transformer(layers, tokens: int, width: int) -> int:
    return _gemm(tokens, _linears(layers)) + len(layers) * 4 * tokens * tokens * width


def tower_tokens(backbone: Backbone) -> dict[str, int]:
    """Tokens one item occupies in each tower (patches + prefix tokens; text context length)."""
    m = backbone.model
    if backbone.library == "timm":
        return {"vision": m.patch_embed.num_patches + m.num_prefix_tokens}
    v = m.visual
    patches = v.grid_size[0] * v.grid_size[1]
    return {"vision": patches + 1, "text": m.positional_embedding.shape[0]}


def base_flops(backbone: Backbone) -> dict[str, int]:
    """FLOPs per item of the base model, per tower (no adapter)."""
    m, tokens = backbone.model, tower_tokens(backbone)
    if backbone.library == "timm":
        t = tokens["vision"]
        width = m.embed_dim
        outside = [x for x in _linears(m) if not any(x is y for y in _linears(m.blocks))]
        return {"vision": _conv(m.patch_embed.proj, m.patch_embed.num_patches) + _transformer(m.blocks, t, width) + _gemm(1, outside)}
    v = m.visual
    vis = _conv(v.conv1, tokens["vision"] - 1) + _transformer(v.transformer.resblocks, tokens["vision"], v.transformer.width)
    vis += 2 * v.proj.shape[0] * v.proj.shape[1] if v.proj is not None else 0
    text = _transformer(m.transformer.resblocks, tokens["text"], m.transformer.width)
    proj = m.text_projection
    text += _gemm(1, [proj]) if isinstance(proj, nn.Linear) else 2 * proj.shape[0] * proj.shape[1]
    return {"vision": vis, "text": text}


def block_flops(backbone: Backbone, block_id: str, r: int) -> int:
    """Added FLOPs per item of one active rank-``r`` block: ``2·T·r·(d_in + d_out)``."""
    spec = backbone.blocks[block_id]
    return 2 * tower_tokens(backbone)[spec.tower] * r * (spec.d_in + spec.d_out)


def closed_form_flops(backbone: Backbone, active: dict[str, int] | None = None) -> dict[str, int]:
    """FLOPs per item per tower with ``active`` blocks (block id -> rank) unmerged."""
    out = base_flops(backbone)
    for b, r in (active or {}).items():
        out[backbone.blocks[b].tower] += block_flops(backbone, b, r)
    return out


def peft_added_flops(backbone: Backbone, r: int, batch: int, dora: bool) -> int:
    """Added FLOPs for a batch of ``batch`` images of HF PEFT LoRA/DoRA on every site of a timm ViT, at ``batch``.

    PEFT adapts the fused qkv as one block (``A [r, d]``, ``B [3d, r]``): per site
    ``2·T·r·(d_in + d_out)``; PEFT DoRA also rebuilds ``B·A`` once per forward to take the row
    norm of ``W0 + s·B·A``, as ``lora_B(lora_A(I))`` over an identity of size ``d_in``:
    ``2·d_in·r·(d_in + d_out)``, shared by the batch.
    """
    t = tower_tokens(backbone)["vision"]
    sites = [backbone.model.get_submodule(s) for s in backbone.blocks.sites()]
    shapes = [(s.weight.shape[1], s.weight.shape[0]) for s in sites]
    added = batch * sum(2 * t * r * (d_in + d_out) for d_in, d_out in shapes)
    if dora:
        added += sum(2 * d_in * r * (d_in + d_out) for d_in, d_out in shapes)
    return added
