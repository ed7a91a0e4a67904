"""The kernel op's inputs: slot buffers (written once per adapter) and per-batch indices.

**Slots.** Each adapted site owns preallocated buffers of *rank pages* (``PAGE_RANK`` rows of
``A`` and of ``Bᵀ``). An active block of rank ``r`` occupies ``ceil(r / PAGE_RANK)``
consecutive pages, written once when its adapter moves to the device; its scale and DoRA factor
sit on its first page's row of ``scales`` / ``dora_factor`` (factor ones for LoRA blocks). Why pages rather than slots at
one largest rank: the server needs no rank limit, an r = 16 block (the paper's) costs one page
and not a quarter of an r = 64 slot, and the kernel still sees one entry per block (its rows
are consecutive, so ``rank_start`` indexes the flattened buffer as before). The price is
contiguity: a block needs a run of free pages (``selora.runtime.slots`` evicts until one exists;
r ≤ 16 blocks never fragment).

**Per batch** only indices change: one row per (adapter, active block) of a site —
``META_COLUMNS`` — grouped by site into one small int32 tensor, copied to the device once per
batch; each ``LayerBatch`` is a view of it plus host-side summaries, so no layer call walks
the entries on the host (the torch reference reads ``entries``, built lazily).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

PAGE_RANK = 16  # rows per slot page: the smallest tl.dot dimension, so one page is one BLOCK_R chunk
# Columns of the metadata rows. The kernel reads the first seven: the entry's item range, its
# block's first output column, its first row in the flattened page buffers, its rank, its offset
# into the split shrink's buffer (in units of items × rank; the kernel multiplies by tokens) and
# its first page (the row of its DoRA factor). ``block_rank`` and ``dora`` serve the host.
META_COLUMNS = ("item_start", "item_end", "out_start", "rank_start", "rank", "item_rank_offset", "page", "block_rank", "dora")
META_STRIDE = len(META_COLUMNS)
COLUMN = {name: i for i, name in enumerate(META_COLUMNS)}


@dataclass(frozen=True)
class DeviceBlock:
    """One active block of an adapter in serving form, before it is written to slot pages."""

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
    def pages(self) -> int:
        return math.ceil(self.rank / PAGE_RANK)


@dataclass(frozen=True)
class SiteBuffers:
    """One adapted site's slot buffers, allocated once."""

    lora_a: torch.Tensor  # [pages · PAGE_RANK, d_in]
    lora_bt: torch.Tensor  # [pages · PAGE_RANK, out_size]
    dora_factor: torch.Tensor  # [pages, out_size]: a DoRA block's factor on its first page, else ones
    scales: torch.Tensor  # fp32 [pages]: a block's lora_alpha / r on its first page
    host_scales: list[float]  # the same on the host (the torch reference reads these: no device sync)
    _views: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def empty(cls, pages: int, d_in: int, out_size: int, dtype: torch.dtype, device) -> "SiteBuffers":
        return cls(torch.empty(pages * PAGE_RANK, d_in, dtype=dtype, device=device),
                   torch.empty(pages * PAGE_RANK, out_size, dtype=dtype, device=device),
                   torch.empty(pages, out_size, dtype=dtype, device=device),
                   torch.zeros(pages, dtype=torch.float32, device=device), [0.0] * pages)

    @property
    def pages(self) -> int:
        return self.dora_factor.shape[0]

    @property
    def out_size(self) -> int:
        return self.dora_factor.shape[1]

    def block_views(self, rank_start: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Aᵀ, Bᵀ)`` of the block at these rows: views into the buffers (never copies), cached,
        so the torch reference slices nothing per entry. A view of the same rows stays right
        when another block is written there later."""
        key = (rank_start, rank)
        if key not in self._views:
            rows = slice(rank_start, rank_start + rank)
            self._views[key] = (self.lora_a[rows].t(), self.lora_bt[rows])
        return self._views[key]

    def page_nbytes(self) -> int:
        return (PAGE_RANK * (self.lora_a.shape[1] + self.out_size) + self.out_size) * self.lora_a.element_size() + 4

    @torch.no_grad()
    def write(self, page: int, block: DeviceBlock) -> None:
        """Write ``block`` into pages ``page .. page + block.pages`` (the only copy of its weights)."""
        rows = slice(page * PAGE_RANK, page * PAGE_RANK + block.rank)
        self.lora_a[rows].copy_(block.lora_a)
        self.lora_bt[rows].copy_(block.lora_bt)
        factors = self.dora_factor[page : page + block.pages]
        factors.fill_(1)
        if block.dora_factor is not None:
            factors[0].copy_(block.dora_factor)
        self.scales[page] = block.scale
        self.host_scales[page] = block.scale

    def entry_row(self, page: int, block: DeviceBlock, block_rank: int) -> list[int]:
        """The block's metadata row, item range and shrink offset still 0."""
        return [0, 0, block.out_start, page * PAGE_RANK, block.rank, 0, page, block_rank, int(block.dora_factor is not None)]


@dataclass(frozen=True)
class LoraEntry:
    item_start: int
    item_end: int
    out_start: int
    rank_start: int
    rank: int
    page: int
    scale: float
    dora: bool


@dataclass(frozen=True)
class LayerBatch:
    """One site's work in one batch: its slot buffers and its rows of the batch's metadata."""

    buffers: SiteBuffers
    batch_meta: torch.Tensor  # int32 [.., META_STRIDE] on the buffers' device: the whole batch's rows
    begin: int  # this site's first row in batch_meta
    host: np.ndarray  # int32 [E, META_STRIDE]: this site's rows on the host
    items_end: int  # largest item_end: the batch must have at least this many items
    cols_end: int  # largest out_start + out_size: W0 must have at least this many rows
    max_block_rank: int  # decides fused or split shrink
    max_entry_items: int  # the split shrink's grid
    shrink_size: int  # Σ items × rank over entries: the split shrink's buffer, per token
    has_dora: bool

    @property
    def num_entries(self) -> int:
        return self.host.shape[0]

    @functools.cached_property
    def meta(self) -> torch.Tensor:
        """This site's rows on the device (a view: sliced when a launch needs it, not per batch)."""
        return self.batch_meta[self.begin : self.begin + self.num_entries]

    @property
    def out_size(self) -> int:
        return self.buffers.out_size

    @functools.cached_property
    def entries(self) -> list[LoraEntry]:
        """Host copy of the rows, for the torch reference and FLOP counting (no device sync)."""
        c, scales = COLUMN, self.buffers.host_scales
        return [LoraEntry(r[c["item_start"]], r[c["item_end"]], r[c["out_start"]], r[c["rank_start"]], r[c["rank"]],
                          r[c["page"]], scales[r[c["page"]]], bool(r[c["dora"]])) for r in self.host.tolist()]


def segment_offsets(rows: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each row's ``item_rank_offset``: exclusive running sum of items × rank within its segment
    (``first[i]``: the index of the first row of row i's segment, e.g. its site's)."""
    sizes = (rows[:, COLUMN["item_end"]] - rows[:, COLUMN["item_start"]]) * rows[:, COLUMN["rank"]]
    before = np.cumsum(sizes) - sizes
    return before - before[first]


def layer_batch(buffers: SiteBuffers, host: np.ndarray, meta: torch.Tensor | None = None) -> LayerBatch:
    """A ``LayerBatch`` from one site's rows (offsets filled here); ``meta``: their device copy
    if the caller has one, else it is made here."""
    rows = np.array(host, dtype=np.int32)
    rows[:, COLUMN["item_rank_offset"]] = segment_offsets(rows, np.zeros(len(rows), dtype=np.int64))
    c = COLUMN
    items = rows[:, c["item_end"]] - rows[:, c["item_start"]]
    return LayerBatch(
        buffers, torch.from_numpy(rows).to(buffers.lora_a.device) if meta is None else meta, 0, rows,
        items_end=int(rows[:, c["item_end"]].max()), cols_end=int(rows[:, c["out_start"]].max()) + buffers.out_size,
        max_block_rank=int(rows[:, c["block_rank"]].max()), max_entry_items=int(items.max()),
        shrink_size=int((items * rows[:, c["rank"]]).sum()), has_dora=bool(rows[:, c["dora"]].any()),
    )


def pack_layer(work: list[tuple[int, int, DeviceBlock]], gap: int = 1) -> LayerBatch:
    """Write ``(item_start, item_end, block)`` triples into fresh slot buffers and describe them.

    Blocks land in reverse order with ``gap`` free pages between them (fragmented on purpose, as
    a long-running server's slots are). For kernel tests and benchmarks; the server's slots live
    in ``selora.runtime.slots``."""
    if not work:
        raise ValueError("pack_layer needs at least one entry")
    first = work[0][2]
    out_size = first.lora_bt.shape[1]
    if any(blk.lora_bt.shape[1] != out_size for _, _, blk in work):
        raise ValueError("all entries of a layer must have the same output width")
    pages = sum(blk.pages + gap for _, _, blk in work)
    buffers = SiteBuffers.empty(pages, first.lora_a.shape[1], out_size, first.lora_a.dtype, first.lora_a.device)
    rows, page = [], pages
    for start, end, blk in work:
        page -= blk.pages + gap
        buffers.write(page, blk)
        rows.append([start, end] + buffers.entry_row(page, blk, blk.rank)[2:])
    return layer_batch(buffers, np.array(rows, dtype=np.int32))
