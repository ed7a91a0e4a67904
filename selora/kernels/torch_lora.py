"""The ``torch`` backend: a layer's LoRA/DoRA work in a fixed number of batched torch ops.

Semantics: exactly ``selora.kernels.reference`` (the loop in ``ops``'s docstring). The loop costs
a few torch calls per entry, and on a CPU at small widths a call costs more than its arithmetic
(tiny-vit, 32 adapters × 4 blocks: ~2× the base forward). Here each entry is cut into *units*,
one per (item, rank page) it covers, and a layer is, whatever its number of entries::

    xs = x[unit items]                      [U, tokens, d_in]   gather
    h  = s · xs · A[unit pages]ᵀ            [U, tokens, 16]     gather + bmm (+ scale)
    t  = h · Bᵀ[unit pages]                 [U, tokens, out]    gather + bmm
    y[unit item, all tokens, unit block's columns] += t         one scatter (a block's pages sum)
    DoRA: y = f ⊙ y + b, f ones except the DoRA blocks' (item, columns)

The arithmetic is the entries' (no padding): a page's rows past its block's rank are zero
(``SiteBuffers.write``). The pages a layer reads are gathered into temporaries read once; the
slot buffers are never written. Units are planned once per batch for every site at once
(``UnitPlan``, NumPy only; ``build_batch`` hands each layer its slice). A layer with fewer than
``UNITS_FROM_ENTRIES`` entries runs the reference loop instead: a few wide entries (one
adapter's many items) cost less as a few whole-group GEMMs than cut into per-item units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from selora.kernels.batch import COLUMN, PAGE_RANK, LayerBatch
from selora.kernels.reference import lora_linear_reference

# A layer with fewer entries runs the reference loop: a few wide entries (one adapter's items)
# cost less as a few whole-group GEMMs than as many per-item units.
UNITS_FROM_ENTRIES = 6


@dataclass(frozen=True)
class Units:
    item: torch.Tensor  # int64 [U]: the unit's item (a group of ``tokens`` rows)
    page: torch.Tensor  # int64 [U]: the slot page it multiplies
    block: torch.Tensor  # int64 [U]: its block's column group (out_start // out_size)
    scale: torch.Tensor | None  # fp32 [U, 1, 1]: its block's scale; None when every scale of the batch is 1
    dora: torch.Tensor  # int64 [3, D]: (item, block, first page) of each DoRA entry's items


def _runs(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``range(lengths[i])`` over i, as (i, offset) pairs; and the lengths' ends."""
    ends = np.cumsum(lengths)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    return owner, np.arange(owner.size) - (ends - lengths)[owner], ends


class UnitPlan:
    """The units of every segment of a batch's metadata rows (its sites), planned in a fixed
    number of NumPy operations and one copy; ``segment(s)`` slices segment ``s``'s out."""

    def __init__(self, host: np.ndarray, width: np.ndarray | int, scale: np.ndarray, bounds: np.ndarray, device):
        """``host``: metadata rows; ``width``, ``scale``: each row's block width and scale;
        segment s is rows ``bounds[s] .. bounds[s + 1]``."""
        c, h = COLUMN, host.astype(np.int64)
        start, items = h[:, c["item_start"]], h[:, c["item_end"]] - h[:, c["item_start"]]
        pages = (h[:, c["rank"]] + PAGE_RANK - 1) // PAGE_RANK
        block = h[:, c["out_start"]] // width
        entry, local, ends = _runs(items * pages)
        per_item = pages[entry]
        unit = [start[entry] + local // per_item, h[entry, c["page"]] + local % per_item, block[entry]]
        if (scale != 1).any():
            unit.append(scale[entry].astype(np.float32).reshape(-1, 1, 1))
        d_items = items * (h[:, c["dora"]] != 0)
        d_entry, d_local, d_ends = _runs(d_items)
        dora = np.stack([start[d_entry] + d_local, block[d_entry], h[d_entry, c["page"]]])
        self._bounds = bounds.tolist()
        self._cuts = np.append(0, ends)[bounds].tolist(), np.append(0, d_ends)[bounds].tolist()
        self._host = torch.device(device).type == "cpu"  # slices of NumPy arrays are the cheapest tensors there
        self._unit = unit if self._host else [torch.from_numpy(v).to(device) for v in unit]
        self._dora = dora if self._host else torch.from_numpy(dora).to(device)

    def segment(self, s: int) -> Units | None:
        """Segment ``s``'s units; None when it has too few entries to run as units."""
        if self._bounds[s + 1] - self._bounds[s] < UNITS_FROM_ENTRIES:
            return None
        (a, b), (p, q) = self._cuts[0][s : s + 2], self._cuts[1][s : s + 2]
        take = torch.from_numpy if self._host else (lambda t: t)  # noqa: E731
        item, page, block, *scale = (take(v[a:b]) for v in self._unit)
        return Units(item, page, block, scale[0] if scale else None, take(self._dora[:, p:q]))


def torch_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch) -> torch.Tensor:
    out, d_in, d_out, buffers = layer.out_size, x.shape[-1], weight.shape[0], layer.buffers
    if d_out % out:
        raise ValueError(f"the site's width {d_out} is not a multiple of its blocks' width {out}")
    if layer.num_entries < UNITS_FROM_ENTRIES:
        return lora_linear_reference(x, weight, bias, layer)
    u = layer.derived.get("units")
    if u is None:  # a layer made outside a batch (tests, benchmarks): its own units
        scale = buffers.host_scales[layer.host[:, COLUMN["page"]]]
        u = layer.derived["units"] = UnitPlan(layer.host, out, scale, np.array([0, layer.num_entries]), buffers.lora_a.device).segment(0)
    x3 = x if x.dim() == 3 else x.reshape(x.shape[0], -1, d_in)
    items, tokens, blocks = x3.shape[0], x3.shape[1], d_out // out
    dora = layer.has_dora
    y = F.linear(x3, weight, None if dora else bias)
    a_pages, bt_pages = buffers.pages_view
    h = torch.bmm(x3.index_select(0, u.item), a_pages.index_select(0, u.page).transpose(1, 2))
    if u.scale is not None:
        h.mul_(u.scale)
    t = torch.bmm(h, bt_pages.index_select(0, u.page))
    if blocks == 1:
        y.index_add_(0, u.item, t)
    else:  # y[item, :, block, :] += t: the (item, block) dims side by side in a view
        y.view(items, tokens, blocks, out).permute(0, 2, 1, 3).index_put_((u.item, u.block), t, accumulate=True)
    if dora:
        factor = torch.ones(items, blocks, out, dtype=y.dtype, device=y.device)
        factor[u.dora[0], u.dora[1]] = buffers.dora_factor.index_select(0, u.dora[2])
        y.view(items, tokens, blocks, out).mul_(factor.unsqueeze(1))
        if bias is not None:
            y.add_(bias)
    return y.view(*x.shape[:-1], d_out)
