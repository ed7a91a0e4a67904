"""Merge an adapter's active blocks into base weights (the baseline "merged weights" path)."""

from __future__ import annotations

import torch

from selora.adapters.format import SparseAdapter
from selora.adapters.lora import dora_norm
from selora.models.factory import Backbone


def merged_block_weight(w0: torch.Tensor, adapter: SparseAdapter, block_id: str) -> torch.Tensor:
    """``W0 + s·B·A`` (LoRA) or ``m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row`` (DoRA), in fp32."""
    blk = adapter.blocks[block_id]
    a, b, w0 = blk.lora_A.float(), blk.lora_B.float(), w0.float()
    w = w0 + adapter.scale * (b @ a)
    if adapter.variant == "dora":
        w = (blk.magnitude.float() / dora_norm(w0, a, b, adapter.scale))[:, None] * w
    return w


@torch.no_grad()
def merge_into(backbone: Backbone, adapter: SparseAdapter) -> dict[str, torch.Tensor]:
    """Overwrite the backbone's weights in place; returns the original rows to ``unmerge``."""
    saved = {}
    for b in adapter.blocks:
        spec = backbone.blocks[b]
        weight = backbone.model.get_submodule(spec.site).weight
        rows = weight[spec.out_start : spec.out_start + spec.d_out]
        saved[b] = rows.clone()
        rows.copy_(merged_block_weight(rows, adapter, b).to(rows.dtype))
    return saved


@torch.no_grad()
def unmerge(backbone: Backbone, saved: dict[str, torch.Tensor]) -> None:
    for b, rows in saved.items():
        spec = backbone.blocks[b]
        weight = backbone.model.get_submodule(spec.site).weight
        weight[spec.out_start : spec.out_start + spec.d_out].copy_(rows)
