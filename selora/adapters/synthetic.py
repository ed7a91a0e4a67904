"""Random sparse adapters: the server's kernel warm-up, the benchmarks and the tests build theirs
here. Values do not matter for compiling or timing; shapes, rank and active blocks do."""

from __future__ import annotations

import torch

from selora.adapters.format import BlockWeights, SparseAdapter
from selora.models.blocks import BlockTable


def random_adapter(
    table: BlockTable, blocks: list[str], r: int, variant: str = "lora", seed: int = 0,
    base_model: str = "bench", lora_alpha: float | None = None,
) -> SparseAdapter:
    """A ``SparseAdapter`` with random (nonzero) A, B and, for DoRA, magnitudes on ``blocks``."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for b in blocks:
        spec = table[b]
        a = torch.randn(r, spec.d_in, generator=gen) / spec.d_in**0.5
        bm = torch.randn(spec.d_out, r, generator=gen) * 0.02
        mag = (1 + 0.1 * torch.rand(spec.d_out, generator=gen)) if variant == "dora" else None
        weights[b] = BlockWeights(a, bm, mag)
    return SparseAdapter(base_model, table.fingerprint, variant, r, float(r if lora_alpha is None else lora_alpha), weights)
