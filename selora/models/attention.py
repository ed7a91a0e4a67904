"""An explicit, addressable replacement for open_clip's ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` directly inside
``F.multi_head_attention_forward``, so a wrapper around ``out_proj`` would never run. This module
holds the same weights as two ``nn.Linear`` (``in_proj`` for fused q/k/v, ``out_proj``) and calls
them, then SDPA, so adapters can wrap them. Same call signature and return shape as MHA's
self-attention use in open_clip; equality with the original is tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExplicitAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise ValueError("only self-attention with equal q/k/v dims is supported")
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        w = mha.in_proj_weight
        self.in_proj.to(device=w.device, dtype=w.dtype)
        self.out_proj.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("ExplicitAttention implements self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MHA semantics: True = masked out
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:  # (b * heads, n, n)
                attn_mask = attn_mask.view(b, h, n, n)
            attn_mask = attn_mask.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out_proj(o.transpose(1, 2).reshape(b, n, d))
        return (o if self.batch_first else o.transpose(0, 1)), None


def make_attention_explicit(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` in place; returns how many."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim  # not cross-attn poolers
    ]
    for name, mha in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExplicitAttention(mha))
    return len(targets)
