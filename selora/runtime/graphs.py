"""``--cuda-graphs``: the mixed forward captured once per (modality, batch-size bucket) and replayed.

A replayed forward launches every kernel of the model with no host work per layer (the
per-layer launch preparation ``benchmarks/host_overhead.py`` reports). A graph replays fixed
launches on fixed memory, so what changes per batch lives in buffers the graph reads:

- the inputs: one static buffer per bucket (batch sizes 1, 2, 4, … up to the server's
  largest); rows past the batch are zero and their outputs dropped;
- the metadata: ``StaticBatch`` gives every adapted site a fixed region of one metadata buffer,
  as many rows as the site has slot pages (a batch has at most one entry per page held), and
  every site's kernel runs with that many entries. A batch's rows (``batch_rows``, the same as
  eagerly) are scattered into the regions; the rest are empty (item range 0..0: they meet no
  tile, and cost the kernel one scalar test each). The captured kernels apply DoRA factors
  (ones for LoRA blocks) and the fused shrink at every rank (the split shrink sizes its buffer
  per batch), so a batch of large-rank adapters is slower in a graph than eagerly, never wrong.

Only the base's input size is captured; other sizes (adapters trained at another size) and
batches larger than the largest bucket run eagerly. Off by default: this path has been checked
on CPU through Triton's interpreter (``StaticBatch`` without capture, ``tests/runtime/test_graphs.py``)
but not yet measured, or captured, on a GPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from selora.adapters.inject import inject
from selora.adapters.layer import use_batch
from selora.kernels.batch import META_STRIDE, LayerBatch
from selora.kernels.config import KernelConfig
from selora.models.factory import Backbone
from selora.runtime.batch import ModelBatch, batch_rows, plan_rows
from selora.runtime.slots import SITE_COLUMN, DeviceAdapter, DeviceSlots


class StaticBatch:
    """Fixed-capacity metadata for every adapted site of ``slots``: what a captured forward reads."""

    def __init__(self, slots: DeviceSlots, config: KernelConfig):
        self.slots, self.config = slots, config
        capacity = [slots.buffers[site].pages for site in slots.site_names]
        self.offsets = np.concatenate([[0], np.cumsum(capacity)])  # site i: rows offsets[i] .. offsets[i + 1]
        self.host = np.zeros((int(self.offsets[-1]), META_STRIDE), dtype=np.int32)
        self.meta = torch.zeros(self.host.shape, dtype=torch.int32, device=slots.device)

    def batch(self, items: int) -> ModelBatch:
        """A ``ModelBatch`` over the fixed regions for batches of ``items`` rows (the bucket)."""
        layers = {}
        for i, site in enumerate(self.slots.site_names):
            begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
            buffers = self.slots.buffers[site]
            layers[site] = LayerBatch(buffers, self.meta, begin, self.host[begin:end], items_end=items,
                                      cols_end=buffers.out_size, max_block_rank=0, max_entry_items=items,
                                      shrink_size=0, has_dora=True)
        return ModelBatch(self.config, layers)

    def fill(self, adapters: Sequence[DeviceAdapter | None], groups: list[tuple[int, int, int]]) -> None:
        """Write a batch's rows into the sites' regions (the rest empty): one host-to-device copy."""
        self.host[:] = 0
        found = batch_rows(adapters, groups)
        if found is not None:
            slots, rows, per_site = found
            if slots is not self.slots:
                raise ValueError("the batch's adapters live in other device slots than the captured ones")
            site = rows[:, SITE_COLUMN]
            first = np.cumsum(per_site) - per_site
            self.host[self.offsets[site] + np.arange(len(rows)) - first[site]] = rows[:, :META_STRIDE]
        self.meta.copy_(torch.from_numpy(self.host), non_blocking=False)


def buckets(max_batch_size: int) -> list[int]:
    """Batch sizes captured: powers of two below the largest, and the largest."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


class CudaGraphs:
    """One captured forward per (modality, bucket) on ``slots``; ``run`` replays the smallest
    bucket that holds a batch (None: the caller runs it eagerly)."""

    def __init__(self, backbone: Backbone, slots: DeviceSlots, config: KernelConfig, max_batch_size: int):
        if backbone.device.type != "cuda" or config.backend != "triton":
            raise ValueError("CUDA graphs need a CUDA device and the compiled Triton kernel")
        self.backbone, self.static = backbone, StaticBatch(slots, config)
        self.buckets = buckets(max_batch_size)
        self.graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(self, sample: dict[str, torch.Tensor]) -> int:
        """Capture every (modality, bucket) from one preprocessed ``sample`` input per modality
        (after the warm-up compiled and tuned the kernels); returns the graphs made."""
        inject(self.backbone)
        self.static.fill([], [])
        pool = None
        for modality, one in sample.items():
            encode = self.backbone.encode_image if modality == "image" else self.backbone.encode_text
            for n in self.buckets:
                x = one.expand(n, *one.shape).clone()
                batch = self.static.batch(n)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), use_batch(batch):  # the first runs allocate and pick kernels
                    for _ in range(2):
                        encode(x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), use_batch(batch):
                    out = encode(x)
                pool = graph.pool()
                self.graphs[(modality, n)] = (graph, x, out)
        return len(self.graphs)

    def run(self, modality: str, inputs: torch.Tensor, adapters: Sequence[DeviceAdapter | None],
            row_adapter: Sequence[int]) -> torch.Tensor | None:
        n = inputs.shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None or (modality, bucket) not in self.graphs:
            return None
        graph, x, out = self.graphs[(modality, bucket)]
        plan = plan_rows(row_adapter)
        self.static.fill(adapters, plan.groups)
        x[:n].copy_(inputs[plan.order.to(inputs.device)])
        x[n:].zero_()
        graph.replay()
        return out[:n][plan.inverse.to(out.device)].clone()
