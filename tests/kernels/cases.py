"""Random layer cases for the kernel tests and the benchmark's smoke mode.

A case is one adapted layer: ``n_blocks`` blocks of ``out_size`` output columns (a q/k/v site has
3, an MLP site 1), adapters with their rank, variant and fraction of active blocks, rows grouped
like ``plan_rows`` groups them (base-only items first, then each adapter's items), written into
fragmented slot pages (``pack_layer``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from selora.kernels.batch import DeviceBlock, LayerBatch, SiteBuffers, pack_layer


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    d_in: int
    out_size: int
    n_blocks: int
    adapters: tuple[tuple[int, str, float], ...]  # (rank, "lora"|"dora", active fraction)
    base_items: int = 0
    bias: bool = True

    @property
    def d_out(self) -> int:
        return self.out_size * self.n_blocks


CASES = [
    Case("one-adapter-r1-all-active", tokens=5, d_in=37, out_size=23, n_blocks=3, adapters=((1, "lora", 1.0),)),
    Case("ranks-1-to-32-some-active-base-rows", tokens=3, d_in=37, out_size=23, n_blocks=3, base_items=2,
         adapters=((1, "lora", 0.34), (5, "dora", 0.67), (16, "lora", 0.34), (17, "lora", 1.0), (32, "dora", 0.34))),
    Case("8-adapters-ranks-1-to-128-mixed", tokens=2, d_in=45, out_size=19, n_blocks=3, base_items=1,
         adapters=((1, "lora", 0.34), (3, "dora", 1.0), (8, "lora", 0.0), (16, "dora", 0.67),
                   (33, "lora", 0.34), (64, "dora", 0.34), (100, "lora", 0.67), (128, "lora", 1.0))),
    Case("all-active-dora-mlp-no-bias", tokens=7, d_in=29, out_size=53, n_blocks=1, bias=False,
         adapters=((4, "dora", 1.0), (9, "dora", 1.0), (2, "lora", 1.0))),
    Case("no-block-active", tokens=3, d_in=37, out_size=23, n_blocks=3, base_items=1,
         adapters=((4, "lora", 0.0), (8, "dora", 0.0))),
]


@dataclass
class LayerInputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    layer: LayerBatch | None

    def to(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> "LayerInputs":
        cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        layer = None
        if self.layer is not None:
            b = self.layer.buffers
            buffers = SiteBuffers(cast(b.lora_a), cast(b.lora_bt), cast(b.dora_factor), b.scales.to(device), b.host_scales)
            layer = dataclasses.replace(self.layer, buffers=buffers, batch_meta=self.layer.batch_meta.to(device))
        return LayerInputs(cast(self.x), cast(self.weight), cast(self.bias), layer)


def build_case(case: Case, seed: int = 0) -> LayerInputs:
    """fp32 CPU inputs of ``case``: outputs O(1), every active block with its own A, Bᵀ, factor."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    work, item = [], case.base_items
    for j, (rank, variant, fraction) in enumerate(case.adapters):
        n_items = 1 + j % 3
        n_active = round(fraction * case.n_blocks)
        for b in sorted(torch.randperm(case.n_blocks, generator=gen)[:n_active].tolist()):
            factor = 0.75 + 0.5 * torch.rand(case.out_size, generator=gen) if variant == "dora" else None
            blk = DeviceBlock(f"b{b}", b * case.out_size, randn(rank, case.d_in) / math.sqrt(case.d_in),
                              randn(rank, case.out_size) / math.sqrt(rank), 0.5 + j / 8, factor)
            work.append((item, item + n_items, blk))
        item += n_items
    x = randn(item, case.tokens, case.d_in)
    weight = randn(case.d_out, case.d_in) / math.sqrt(case.d_in)
    bias = 0.1 * randn(case.d_out) if case.bias else None
    return LayerInputs(x, weight, bias, pack_layer(work) if work else None)
