"""The kernel op's input: one adapted layer's LoRA work for one batch.

The batch's rows (items: images or texts) are grouped so that each adapter's rows are
contiguous. Each *entry* is one (adapter, active block) pair of this layer: a range of items,
the block's output columns, and its A/Bᵀ stacked with every other entry's along the rank axis.
Built once per batch (``selora.runtime.batch``), read by every call of this layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

META_FIELDS = ("item_start", "item_end", "out_start", "rank_start", "rank")
# Columns of ``LayerBatch.meta``: the entry fields, then the entry's offset into the kernel's
# shrink buffer in units of items × rank (the kernel multiplies it by tokens per item).
META_COLUMNS = META_FIELDS + ("item_rank_offset",)


@dataclass(frozen=True)
class DeviceBlock:
    """One active block of a resident adapter, in serving form."""

    block_id: str
    out_start: int
    lora_a: torch.Tensor  # [r, d_in]
    lora_bt: torch.Tensor  # [r, d_out]  (B transposed: rows are contiguous per rank)
    scale: float  # lora_alpha / r
    dora_factor: torch.Tensor | None = None  # [d_out]: m / ‖W0 + s·B·A‖_row, computed at load

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def nbytes(self) -> int:
        ts = [self.lora_a, self.lora_bt] + ([self.dora_factor] if self.dora_factor is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass(frozen=True)
class LoraEntry:
    item_start: int
    item_end: int
    out_start: int
    rank_start: int
    rank: int
    scale: float
    dora: bool


@dataclass
class LayerBatch:
    entries: list[LoraEntry]  # host copy, for the torch path and FLOP counting (no device sync)
    out_size: int  # output columns of every entry (a block's d_out)
    lora_a: torch.Tensor  # [R, d_in], R = sum of entry ranks
    lora_bt: torch.Tensor  # [R, out_size]
    scales: torch.Tensor  # fp32 [E]
    meta: torch.Tensor  # int32 [E, 6]: META_COLUMNS
    dora_factor: torch.Tensor | None  # [E, out_size] (ones for LoRA entries), None if no DoRA entry

    @property
    def num_entries(self) -> int:
        return len(self.entries)


def pack_layer(work: list[tuple[int, int, DeviceBlock]]) -> LayerBatch:
    """Stack ``(item_start, item_end, block)`` triples into one ``LayerBatch``."""
    if not work:
        raise ValueError("pack_layer needs at least one entry")
    out_size = work[0][2].lora_bt.shape[1]
    entries, rank_start = [], 0
    for start, end, blk in work:
        if blk.lora_bt.shape[1] != out_size:
            raise ValueError("all entries of a layer must have the same output width")
        entries.append(LoraEntry(start, end, blk.out_start, rank_start, blk.rank, blk.scale, blk.dora_factor is not None))
        rank_start += blk.rank
    first = work[0][2].lora_a
    dora = None
    if any(e.dora for e in entries):
        dora = torch.stack([
            blk.dora_factor if blk.dora_factor is not None else torch.ones(out_size, device=first.device, dtype=first.dtype)
            for _, _, blk in work
        ])
    rows, offset = [], 0
    for e in entries:
        rows.append([getattr(e, f) for f in META_FIELDS] + [offset])
        offset += (e.item_end - e.item_start) * e.rank
    meta = torch.tensor(rows, dtype=torch.int32)
    return LayerBatch(
        entries=entries,
        out_size=out_size,
        lora_a=torch.cat([blk.lora_a for _, _, blk in work]).contiguous(),
        lora_bt=torch.cat([blk.lora_bt for _, _, blk in work]).contiguous(),
        scales=torch.tensor([e.scale for e in entries], dtype=torch.float32, device=first.device),
        meta=meta.to(first.device),
        dora_factor=dora,
    )
