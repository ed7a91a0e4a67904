"""The op's specification in plain torch: what every backend must compute.

Semantics (x viewed as [items, tokens, d_in], rows grouped by adapter):

    y = x · W0ᵀ
    for e in entries:                              # one per (adapter, active block) of this layer
        rows = items e.item_start .. e.item_end    # every token of those items
        cols = e.out_start .. e.out_start + out_size
        t = e.scale · (x[rows] · A_eᵀ) · B_eᵀ
        y[rows, cols] = f_e ⊙ (y[rows, cols] + t)  if e is DoRA (f_e: per-output-channel factor)
        y[rows, cols] += t                         otherwise
    y += b

A layer with no entry is ``x · W0ᵀ + b``: the base GEMM and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selora.kernels.batch import LayerBatch


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch) -> torch.Tensor:
    y = F.linear(x, weight).contiguous()
    y3 = y.view(y.shape[0], -1, y.shape[-1])  # [items, tokens, d_out], shares storage with y
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    for i, e in enumerate(layer.entries):
        xs = x3[e.item_start : e.item_end]
        a = layer.lora_a[e.rank_start : e.rank_start + e.rank]
        bt = layer.lora_bt[e.rank_start : e.rank_start + e.rank]
        t = (xs @ a.t()) @ bt * e.scale
        ys = y3[e.item_start : e.item_end, :, e.out_start : e.out_start + layer.out_size]
        if e.dora:
            ys.copy_(layer.dora_factor[i] * (ys + t))
        else:
            ys.add_(t)
    return y if bias is None else y + bias
