"""Per-batch metadata every adapted layer reads, and the mixed-batch forward.

``plan_rows`` groups a batch's rows by adapter; ``build_batch`` turns the groups into slot
indices, once per batch: the resident adapters' metadata rows (``DeviceAdapter.rows``) with
each group's item range filled in, sorted by site, offsets computed — a fixed number of NumPy
operations whatever the number of adapters and blocks — and copied to the device in one copy, into the
slots' preallocated metadata buffer. Each layer gets a view of it plus host-side summaries.
No adapter weight is copied, concatenated or allocated per batch. ``forward_mixed`` is the
mixed-batch forward: the semantic reference of the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from selora.adapters.inject import inject
from selora.adapters.layer import use_batch
from selora.kernels.batch import COLUMN, META_STRIDE, LayerBatch, segment_offsets
from selora.kernels.config import KernelConfig
from selora.models.factory import Backbone
from selora.runtime.slots import SITE_COLUMN, DeviceAdapter


@dataclass
class RowPlan:
    order: torch.Tensor  # rows sorted by adapter (stable): x[order] is grouped
    inverse: torch.Tensor  # y[inverse] restores the caller's order
    groups: list[tuple[int, int, int]]  # (adapter index or -1 for base, item_start, item_end)


def plan_rows(row_adapter: Sequence[int]) -> RowPlan:
    idx = torch.as_tensor(list(row_adapter), dtype=torch.long)
    order = torch.sort(idx, stable=True).indices
    groups, sorted_idx = [], idx[order].tolist()
    start = 0
    for i in range(1, len(sorted_idx) + 1):
        if i == len(sorted_idx) or sorted_idx[i] != sorted_idx[start]:
            groups.append((sorted_idx[start], start, i))
            start = i
    return RowPlan(order, torch.argsort(order), groups)


class SiteLayers(Mapping):
    """site -> its ``LayerBatch``, made when its layer asks for it: building a batch costs the same
    whether 1 or 48 layers have work (their summaries are rows of one array); each layer pays
    for its own small object when it runs."""

    def __init__(self, slots, meta: torch.Tensor, host: np.ndarray, sites: np.ndarray, summaries: np.ndarray):
        self._slots, self._meta, self._host, self._summaries = slots, meta, host, summaries
        self._row = np.full(len(slots.site_names), -1)
        self._row[sites] = np.arange(len(sites))
        self._sites, self._made = sites, {}

    def get(self, site: str, default=None) -> LayerBatch | None:
        """What every adapted layer calls once per forward: no exception for a layer without work."""
        layer = self._made.get(site)
        if layer is None:
            index = self._slots.site_index.get(site)
            row = -1 if index is None else int(self._row[index])
            if row < 0:
                return default
            begin, end, items_end, out_end, block_rank, entry_items, dora, shrink = self._summaries[row].tolist()
            buffers = self._slots.buffers[site]
            layer = self._made[site] = LayerBatch(buffers, self._meta, begin, self._host[begin:end], items_end,
                                                  out_end + buffers.out_size, block_rank, entry_items, shrink, bool(dora))
        return layer

    def __getitem__(self, site: str) -> LayerBatch:
        layer = self.get(site)
        if layer is None:
            raise KeyError(site)
        return layer

    def __iter__(self) -> Iterator[str]:
        return (self._slots.site_names[i] for i in self._sites.tolist())

    def __len__(self) -> int:
        return len(self._sites)


@dataclass
class ModelBatch:
    config: KernelConfig = field(default_factory=KernelConfig)
    layers: Mapping[str, LayerBatch] = field(default_factory=dict)  # site -> LoRA work; absent: base GEMM only


class StaleAdapterError(RuntimeError):
    """A batch named an adapter whose slots were released (evicted): a registry bug, never served."""


def batch_rows(adapters: Sequence[DeviceAdapter | None], groups: list[tuple[int, int, int]]):
    """The batch's metadata rows on the host, sorted by site, offsets filled: ``(slots, rows,
    per_site)`` — ``rows`` int32 ``[entries, META_STRIDE + 1]`` (the last column is the site),
    ``per_site`` the entry count of each site — or None when no row has an active block.
    A fixed number of NumPy operations, whatever the number of adapters, blocks and sites."""
    present = [(adapters[i], start, end) for i, start, end in groups if i >= 0 and adapters[i] is not None]
    present = [(d, s, e) for d, s, e in present if d.num_blocks]
    if not present:
        return None
    slots = present[0][0].slots
    for dev, _, _ in present:
        if dev.released or dev.slots is not slots:
            raise StaleAdapterError("a batch may only use adapters resident in one set of device slots")
    if len({id(d) for d, _, _ in present}) != len(present):
        raise ValueError("each adapter may appear in one row group of a batch (plan_rows groups them)")
    c = COLUMN
    counts = [d.num_blocks for d, _, _ in present]
    rows = np.concatenate([d.rows for d, _, _ in present])
    rows[:, c["item_start"]] = np.repeat([s for _, s, _ in present], counts)
    rows[:, c["item_end"]] = np.repeat([e for _, _, e in present], counts)
    rows = rows[np.argsort(rows[:, SITE_COLUMN], kind="stable")]
    site = rows[:, SITE_COLUMN]
    per_site = np.bincount(site, minlength=len(slots.site_names))
    begins = np.cumsum(per_site) - per_site
    rows[:, c["item_rank_offset"]] = segment_offsets(rows, begins[site])
    return slots, rows, per_site


def build_batch(adapters: Sequence[DeviceAdapter | None], groups: list[tuple[int, int, int]], config: KernelConfig) -> ModelBatch:
    """The batch's metadata, valid until the next batch is built on the same slots.

    Host work is ``batch_rows`` and a few NumPy operations more: no loop over blocks, adapters
    or sites (a site's ``LayerBatch`` is made when its layer runs, ``SiteLayers``)."""
    found = batch_rows(adapters, groups)
    if found is None:
        return ModelBatch(config)
    slots, rows, per_site = found
    c = COLUMN
    ends = np.cumsum(per_site)
    begins = ends - per_site
    host = np.ascontiguousarray(rows[:, :META_STRIDE])
    meta = slots.meta[: len(host)]
    meta.copy_(torch.from_numpy(host))  # the batch's one host-to-device copy
    sites = np.flatnonzero(per_site)
    starts = begins[sites]
    items = rows[:, c["item_end"]] - rows[:, c["item_start"]]
    summaries = np.stack([starts, ends[sites],
                          *(np.maximum.reduceat(v, starts) for v in (rows[:, c["item_end"]], rows[:, c["out_start"]],
                                                                     rows[:, c["block_rank"]], items, rows[:, c["dora"]])),
                          np.add.reduceat(items * rows[:, c["rank"]], starts)], axis=1)
    layers = SiteLayers(slots, meta, host, sites, summaries)
    return ModelBatch(config, layers)


@torch.no_grad()
def forward_mixed(
    backbone: Backbone,
    inputs: torch.Tensor,
    adapters: Sequence[DeviceAdapter | None],
    row_adapter: Sequence[int],
    modality: str = "image",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Embeddings of a batch whose row i uses ``adapters[row_adapter[i]]`` (-1: the base model).

    ``config``: the server's resolved kernel configuration (default: ``auto`` for the backbone's
    device)."""
    inject(backbone)
    plan = plan_rows(row_adapter)
    batch = build_batch(adapters, plan.groups, config or KernelConfig.resolve(backbone.device))
    encode = backbone.encode_image if modality == "image" else backbone.encode_text
    with use_batch(batch):
        out = encode(inputs[plan.order.to(inputs.device)])
    return out[plan.inverse.to(out.device)]
