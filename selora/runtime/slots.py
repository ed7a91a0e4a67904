"""Device slots: the preallocated buffers resident adapters live in (vLLM's ``lora_a_stacked``).

Per adapted site, ``SiteBuffers`` of rank pages (``selora.kernels.batch`` says why pages),
sized once from the device byte budget: every block of the model gets the same number of pages,
so a site with three blocks (q/k/v) gets three times as many. Moving an adapter to the device
(``DeviceSlots.load``) computes its serving form (scale folded into A, Bᵀ, DoRA factor), finds a
run of free pages per active block and writes the block there, once; ``release`` frees the
pages. A resident adapter keeps, besides the pages it holds, its metadata rows: what a batch
copies is those rows with the batch's item ranges filled in (``selora.runtime.batch``), never
a weight.

Which adapter to evict is the registry's decision (LRU, never a pinned one); this module only
says whether an adapter fits (``DeviceSlotsFullError`` when no run of free pages is left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from selora.adapters.format import SparseAdapter
from selora.adapters.lora import dora_norm
from selora.kernels.batch import META_STRIDE, PAGE_RANK, DeviceBlock, SiteBuffers
from selora.models.factory import Backbone

SITE_COLUMN = META_STRIDE  # a resident adapter's rows carry their site's index after the metadata columns


class DeviceSlotsFullError(RuntimeError):
    """No run of free pages is left at some site for the adapter being loaded."""


@dataclass(eq=False)
class DeviceAdapter:
    """A resident adapter: the pages it holds and its metadata rows (item ranges still 0)."""

    slots: "DeviceSlots"
    rows: np.ndarray  # int32 [active blocks, META_STRIDE + 1], host; the last column is the site index
    pages: dict[str, list[tuple[int, int]]]  # site -> (first page, pages) per block
    variant: str
    r: int
    nbytes: int  # slot pages held + head
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    head_classes: list[str] | None = None
    head_input: str = "raw"
    released: bool = False

    @property
    def num_blocks(self) -> int:
        return self.rows.shape[0]


class DeviceSlots:
    def __init__(self, backbone: Backbone, pages_per_block: int, dtype: torch.dtype | None = None, device=None):
        if pages_per_block < 1:
            raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")
        self.backbone = backbone
        self.device = torch.device(device or backbone.device)
        self.dtype = dtype or backbone.dtype
        self.pages_per_block = pages_per_block
        sites = backbone.blocks.sites()
        self.site_index = {site: i for i, site in enumerate(sites)}
        self.site_names = list(sites)
        self.buffers = {site: SiteBuffers.empty(pages_per_block * len(specs), specs[0].d_in, specs[0].d_out, self.dtype, self.device)
                        for site, specs in sites.items()}
        self._free = {site: bytearray(b"\x01") * b.pages for site, b in self.buffers.items()}
        # A batch has at most one entry per page held (each adapter once), so this never overflows.
        self.meta = torch.empty(sum(b.pages for b in self.buffers.values()), META_STRIDE, dtype=torch.int32, device=self.device)

    @classmethod
    def from_budget(cls, backbone: Backbone, nbytes: int, dtype: torch.dtype | None = None, device=None) -> "DeviceSlots":
        """As many pages per block as ``nbytes`` holds (at least one)."""
        dtype = dtype or backbone.dtype
        per_block = sum(SiteBuffers.empty(1, s.d_in, s.d_out, dtype, "meta").page_nbytes() for s in backbone.blocks.values())
        return cls(backbone, max(1, nbytes // per_block), dtype, device)

    @classmethod
    def holding(cls, backbone: Backbone, adapters: Sequence[SparseAdapter], dtype: torch.dtype | None = None) -> "DeviceSlots":
        """Slots just large enough for ``adapters`` at once, wherever their blocks are (warm-up,
        benchmarks, tests)."""
        pages = sum(math.ceil(a.r / PAGE_RANK) for a in adapters)
        return cls(backbone, max(1, pages), dtype)

    # -- capacity -----------------------------------------------------------------------
    def pages_needed(self, adapter: SparseAdapter) -> dict[str, int]:
        need: dict[str, int] = {}
        for b, w in adapter.blocks.items():
            site = self.backbone.blocks[b].site
            need[site] = need.get(site, 0) + math.ceil(w.lora_A.shape[0] / PAGE_RANK)
        return need

    def fits_empty(self, adapter: SparseAdapter) -> str | None:
        """None if ``adapter`` fits these slots when nothing else is resident, else why not."""
        for site, n in self.pages_needed(adapter).items():
            if n > self.buffers[site].pages:
                return f"its blocks at {site} need {n} slot pages; the device holds {self.buffers[site].pages} there"
        return None

    @property
    def nbytes(self) -> int:
        """Bytes of the slot buffers (allocated once, at construction)."""
        return sum(b.pages * b.page_nbytes() for b in self.buffers.values())

    def free_pages(self) -> dict[str, int]:
        return {site: free.count(1) for site, free in self._free.items()}

    # -- loading ------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, adapter: SparseAdapter) -> list[tuple[str, DeviceBlock]]:
        """The adapter's blocks in serving form on the device (DoRA factor computed once, in fp32)."""
        out = []
        for b, w in adapter.blocks.items():
            spec = self.backbone.blocks[b]
            a, bm = w.lora_A.to(self.device, torch.float32), w.lora_B.to(self.device, torch.float32)
            factor = None
            if adapter.variant == "dora":
                w0 = self.backbone.model.get_submodule(spec.site).weight[spec.out_start : spec.out_start + spec.d_out]
                norm = dora_norm(w0.to(self.device, torch.float32), a, bm, adapter.scale)
                factor = (w.magnitude.to(self.device, torch.float32) / norm).to(self.dtype)
            out.append((spec.site, DeviceBlock(b, spec.out_start, a, bm.t().contiguous().to(self.dtype), adapter.scale, factor)))
        return out

    def place(self, adapter: SparseAdapter, prepared: list[tuple[str, DeviceBlock]]) -> DeviceAdapter:
        """Write prepared blocks into free pages: all of them, or none (``DeviceSlotsFullError``)."""
        taken: list[tuple[str, int, int]] = []
        for site, blk in prepared:
            free = self._free[site]
            page = free.find(b"\x01" * blk.pages)
            if page < 0:
                for s, p, n in taken:
                    self._free[s][p : p + n] = b"\x01" * n
                raise DeviceSlotsFullError(f"no run of {blk.pages} free slot pages at {site}")
            free[page : page + blk.pages] = b"\x00" * blk.pages
            taken.append((site, page, blk.pages))
        rows, pages, nbytes = [], {}, 0
        for (site, blk), (_, page, n) in zip(prepared, taken):
            buffers = self.buffers[site]
            buffers.write(page, blk)
            rows.append(buffers.entry_row(page, blk, adapter.r) + [self.site_index[site]])
            pages.setdefault(site, []).append((page, n))
            nbytes += n * buffers.page_nbytes()
        head = None
        if adapter.head_weight is not None:
            head = (adapter.head_weight.to(self.device, self.dtype), adapter.head_bias.to(self.device, self.dtype))
            nbytes += sum(t.numel() * t.element_size() for t in head)
        table = np.array(rows, dtype=np.int32).reshape(-1, META_STRIDE + 1)
        return DeviceAdapter(self, table, pages, adapter.variant, adapter.r, nbytes, head, adapter.head_classes, adapter.head_input)

    def load(self, adapter: SparseAdapter) -> DeviceAdapter:
        return self.place(adapter, self.prepare(adapter))

    def release(self, dev: DeviceAdapter) -> None:
        """Free the adapter's pages; a batch built from it afterwards is refused."""
        if dev.slots is not self or dev.released:
            return
        for site, runs in dev.pages.items():
            for page, n in runs:
                self._free[site][page : page + n] = b"\x01" * n
        dev.released = True
