"""Per-batch metadata every adapted layer reads, and the mixed-batch forward.

``plan_rows`` groups a batch's rows by adapter; ``build_batch`` turns the groups into slot
indices, once per batch: the resident adapters' metadata rows (``DeviceAdapter.rows``) with
each group's item range filled in, sorted by site, offsets computed — a few tensor operations
whatever the number of adapters and blocks — and copied to the device in one copy, into the
slots' preallocated metadata buffer. Each layer gets a view of it plus host-side summaries.
No adapter weight is copied, concatenated or allocated per batch. ``forward_mixed`` is the
mixed-batch forward: the semantic reference of the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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


@dataclass
class ModelBatch:
    config: KernelConfig = field(default_factory=KernelConfig)
    layers: dict[str, LayerBatch] = field(default_factory=dict)  # site -> LoRA work; absent: base GEMM only


class StaleAdapterError(RuntimeError):
    """A batch named an adapter whose slots were released (evicted): a registry bug, never served."""


def build_batch(adapters: Sequence[DeviceAdapter | None], groups: list[tuple[int, int, int]], config: KernelConfig) -> ModelBatch:
    """The batch's metadata, valid until the next batch is built on the same slots."""
    present = [(adapters[i], start, end) for i, start, end in groups if i >= 0 and adapters[i] is not None]
    present = [(d, s, e) for d, s, e in present if d.num_blocks]
    if not present:
        return ModelBatch(config)
    slots = present[0][0].slots
    for dev, _, _ in present:
        if dev.released or dev.slots is not slots:
            raise StaleAdapterError("a batch may only use adapters resident in one set of device slots")
    if len({id(d) for d, _, _ in present}) != len(present):
        raise ValueError("each adapter may appear in one row group of a batch (plan_rows groups them)")
    counts = torch.tensor([d.num_blocks for d, _, _ in present])
    rows = torch.cat([d.rows for d, _, _ in present])
    rows[:, COLUMN["item_start"]] = torch.tensor([s for _, s, _ in present], dtype=torch.int32).repeat_interleave(counts)
    rows[:, COLUMN["item_end"]] = torch.tensor([e for _, _, e in present], dtype=torch.int32).repeat_interleave(counts)
    rows = rows[torch.sort(rows[:, SITE_COLUMN], stable=True).indices]
    site = rows[:, SITE_COLUMN].long()
    per_site = torch.bincount(site, minlength=len(slots.site_names))
    ends = torch.cumsum(per_site, 0)
    begins = ends - per_site
    rows[:, COLUMN["item_rank_offset"]] = segment_offsets(rows, begins[site]).to(torch.int32)
    host = rows[:, :META_STRIDE]
    meta = slots.meta[: len(host)]
    meta.copy_(host)  # the batch's one host-to-device copy
    summaries = _site_summaries(host, site, len(slots.site_names))
    layers = {}
    for i, (b, e) in enumerate(zip(begins.tolist(), ends.tolist())):
        if b == e:
            continue
        name = slots.site_names[i]
        items_end, out_end, block_rank, entry_items, shrink, dora = (s[i] for s in summaries)
        buffers = slots.buffers[name]
        layers[name] = LayerBatch(buffers, meta[b:e], host[b:e], items_end, out_end + buffers.out_size, block_rank,
                                  entry_items, shrink, bool(dora))
    return ModelBatch(config, layers)


def _site_summaries(host: torch.Tensor, site: torch.Tensor, n_sites: int) -> list[list[int]]:
    """Per site: largest item_end, out_start, block rank, entry items; Σ items × rank; any DoRA."""
    c = COLUMN
    items = host[:, c["item_end"]] - host[:, c["item_start"]]

    def per_site(values: torch.Tensor, reduce: str) -> list[int]:
        out = torch.zeros(n_sites, dtype=values.dtype)
        return out.scatter_reduce_(0, site, values, reduce, include_self=False).tolist()

    return [per_site(host[:, c["item_end"]], "amax"), per_site(host[:, c["out_start"]], "amax"),
            per_site(host[:, c["block_rank"]], "amax"), per_site(items, "amax"),
            per_site(items * host[:, c["rank"]], "sum"), per_site(host[:, c["dora"]], "amax")]


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
