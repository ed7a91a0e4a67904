"""The op's specification in plain torch: what every backend must compute.

Semantics (x viewed as [items, tokens, d_in], rows grouped by adapter; ``P`` = the site's slot
buffers, ``A_e`` = ``P.lora_a[e.rank_start : e.rank_start + e.rank]``, ``Bᵀ_e`` likewise from
``P.lora_bt``, ``s_e = P.scales[e.page]``, ``f_e = P.dora_factor[e.page]``):

    y = x · W0ᵀ
    for e in entries:                              # one per (adapter, active block) of this site
        rows = items e.item_start .. e.item_end    # every token of those items
        cols = e.out_start .. e.out_start + out_size
        t = s_e · (x[rows] · A_eᵀ) · Bᵀ_e
        y[rows, cols] = f_e ⊙ (y[rows, cols] + t)  if e is DoRA
        y[rows, cols] += t                         otherwise
    y += b

A layer with no entry is ``x · W0ᵀ + b``: the base GEMM and nothing else. Weights are read in
place from the slot buffers: nothing is gathered or copied per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selora.kernels.batch import LayerBatch


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch) -> torch.Tensor:
    y = F.linear(x, weight, bias).contiguous()  # the base GEMM, bias fused (DoRA entries take it out again)
    y2 = y.view(-1, y.shape[-1])  # [items * tokens, d_out], shares storage with y
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0] // x.shape[0]
    buffers, out_size = layer.buffers, layer.out_size
    items, xs, ys_rows = None, None, None
    for e in layer.entries:
        if (e.item_start, e.item_end) != items:  # an adapter's entries are adjacent: slice its rows once
            items = (e.item_start, e.item_end)
            xs, ys_rows = x2[e.item_start * tokens : e.item_end * tokens], y2[e.item_start * tokens : e.item_end * tokens]
        a_t, bt = buffers.block_views(e.rank_start, e.rank)
        ys = ys_rows if out_size == y2.shape[1] else ys_rows[:, e.out_start : e.out_start + out_size]  # one block: whole rows
        if e.dora:  # f ⊙ (x·W0ᵀ + t) + b, in place: take the fused bias out, expand, scale, put it back
            b = 0 if bias is None else bias[e.out_start : e.out_start + out_size]
            ys.sub_(b).addmm_(xs @ a_t, bt, alpha=e.scale).mul_(buffers.dora_factor[e.page]).add_(b)
        else:
            ys.addmm_(xs @ a_t, bt, alpha=e.scale)
    return y
