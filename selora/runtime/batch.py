"""Serving form of adapters and the per-batch metadata every adapted layer reads.

``to_device`` turns a validated ``SparseAdapter`` into ``DeviceAdapter`` (A, Bᵀ, scale and the
DoRA factor per active block, computed once). ``plan_rows`` groups a batch's rows by adapter;
``build_batch`` packs, for each layer, the active blocks of the adapters present — once per
batch. ``forward_mixed`` is the mixed-batch forward: the semantic reference of the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from selora.adapters.format import SparseAdapter
from selora.adapters.inject import inject
from selora.adapters.lora import dora_norm
from selora.adapters.layer import use_batch
from selora.kernels.batch import DeviceBlock, LayerBatch, pack_layer
from selora.models.factory import Backbone


@dataclass
class DeviceAdapter:
    sites: dict[str, list[DeviceBlock]]  # site -> active blocks of this adapter there
    variant: str
    r: int
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    head_classes: list[str] | None = None
    head_input: str = "raw"

    @property
    def nbytes(self) -> int:
        n = sum(b.nbytes for blocks in self.sites.values() for b in blocks)
        if self.head is not None:
            n += sum(t.numel() * t.element_size() for t in self.head)
        return n

    @property
    def num_blocks(self) -> int:
        return sum(len(v) for v in self.sites.values())


@torch.no_grad()
def to_device(adapter: SparseAdapter, backbone: Backbone, device=None, dtype=None) -> DeviceAdapter:
    device, dtype = device or backbone.device, dtype or backbone.dtype
    sites: dict[str, list[DeviceBlock]] = {}
    for b, w in adapter.blocks.items():
        spec = backbone.blocks[b]
        a, bm = w.lora_A.to(device, torch.float32), w.lora_B.to(device, torch.float32)
        factor = None
        if adapter.variant == "dora":  # computed once here, in fp32, where the base weight lives
            w0 = backbone.model.get_submodule(spec.site).weight[spec.out_start : spec.out_start + spec.d_out]
            norm = dora_norm(w0.to(device, torch.float32), a, bm, adapter.scale)
            factor = (w.magnitude.to(device, torch.float32) / norm).to(dtype)
        blk = DeviceBlock(b, spec.out_start, a.to(dtype), bm.t().contiguous().to(dtype), adapter.scale, factor)
        sites.setdefault(spec.site, []).append(blk)
    head = None
    if adapter.head_weight is not None:
        head = (adapter.head_weight.to(device, dtype), adapter.head_bias.to(device, dtype))
    return DeviceAdapter(sites, adapter.variant, adapter.r, head, adapter.head_classes, adapter.head_input)


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
    layers: dict[str, LayerBatch] = field(default_factory=dict)  # site -> LoRA work; absent: base GEMM only


def build_batch(adapters: Sequence[DeviceAdapter | None], groups: list[tuple[int, int, int]]) -> ModelBatch:
    work: dict[str, list[tuple[int, int, DeviceBlock]]] = {}
    for idx, start, end in groups:
        if idx < 0 or adapters[idx] is None:
            continue
        for site, blocks in adapters[idx].sites.items():
            work.setdefault(site, []).extend((start, end, blk) for blk in blocks)
    return ModelBatch({site: pack_layer(w) for site, w in work.items()})


@torch.no_grad()
def forward_mixed(
    backbone: Backbone,
    inputs: torch.Tensor,
    adapters: Sequence[DeviceAdapter | None],
    row_adapter: Sequence[int],
    modality: str = "image",
) -> torch.Tensor:
    """Embeddings of a batch whose row i uses ``adapters[row_adapter[i]]`` (-1: the base model)."""
    inject(backbone)
    plan = plan_rows(row_adapter)
    batch = build_batch(adapters, plan.groups)
    encode = backbone.encode_image if modality == "image" else backbone.encode_text
    with use_batch(batch):
        out = encode(inputs[plan.order.to(inputs.device)])
    return out[plan.inverse.to(out.device)]
