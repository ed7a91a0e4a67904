"""The trainable adapter: gated LoRA or DoRA blocks over a frozen backbone (paper §3.2).

LoRA: ``y = x W0ᵀ + b + g · s · (x Aᵀ) Bᵀ`` with ``s = lora_alpha / r`` and ``g = I(score >= tau)``.
DoRA: ``y = x W0ᵀ + b + g · (f ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) − x W0ᵀ)`` with
``f = m / ‖W0 + s B A‖_row``, so a closed gate is exactly ``W0`` and an open one is DoRA.
Plain LoRA (the baseline) is ``gated=False``: every selected block always on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selora.adapters.config import AdapterConfig
from selora.adapters.gates import active_mask, gate_values, score_penalty
from selora.models.blocks import BlockSpec, BlockTable


def _key(block_id: str) -> str:
    return block_id.replace(".", "_")  # ParameterDict keys cannot hold dots


class GatedAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, table: BlockTable, base: nn.Module, head_classes: list[str] | None = None):
        super().__init__()
        self.config = config
        self.block_ids = config.select_blocks(table)
        self.specs = {b: table[b] for b in self.block_ids}
        self.index = {b: i for i, b in enumerate(self.block_ids)}
        gen = torch.Generator().manual_seed(config.init_seed)
        self.lora_A, self.lora_B, self.magnitude = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for b, spec in self.specs.items():
            weight = base.get_submodule(spec.site).weight
            a = torch.empty(config.r, spec.d_in)
            bound = 1 / math.sqrt(spec.d_in)  # kaiming_uniform(a=sqrt(5)), as nn.Linear and PEFT
            a.uniform_(-bound, bound, generator=gen)
            self.lora_A[_key(b)] = nn.Parameter(a.to(weight))
            self.lora_B[_key(b)] = nn.Parameter(torch.zeros(spec.d_out, config.r).to(weight))
            if config.variant == "dora":
                w0 = weight[spec.out_start : spec.out_start + spec.d_out]
                self.magnitude[_key(b)] = nn.Parameter(w0.detach().norm(dim=1))
        n = len(self.block_ids)
        self.scores = nn.Parameter(torch.full((n,), config.init_score)) if config.gated else None
        self.head_classes = list(head_classes) if head_classes else None
        self.head = nn.Linear(base_embed_dim(base), len(head_classes)) if head_classes else None
        self.head_input = "raw"  # selora.adapters.format.HEAD_INPUTS

    # -- gates ---------------------------------------------------------------------------
    def gates(self) -> torch.Tensor:
        if self.scores is None:
            return torch.ones(len(self.block_ids), device=self._device())
        return gate_values(self.scores, self.config.tau, self.config.max_active_blocks)

    def penalty(self) -> torch.Tensor:
        if self.scores is None:
            return torch.zeros((), device=self._device())
        c = self.config
        return score_penalty(self.scores, c.regularizer, c.lam, c.tau)

    def active_blocks(self) -> list[str]:
        if self.scores is None:
            return list(self.block_ids)
        mask = active_mask(self.scores, self.config.tau, self.config.max_active_blocks)
        return [b for b, on in zip(self.block_ids, mask.tolist()) if on]

    def _device(self) -> torch.device:
        return next(iter(self.lora_A.values())).device if self.block_ids else torch.device("cpu")

    # -- forward of one adapted site ----------------------------------------------------
    def site_forward(self, base: nn.Linear, site_blocks: list[BlockSpec], x: torch.Tensor) -> torch.Tensor:
        gates = self.gates()
        # Training runs closed blocks too (times a zero gate) so the STE gradient reaches their
        # scores; inference skips them, and a site with no open block is exactly the base layer.
        ours = {
            s.block_id for s in site_blocks
            if s.block_id in self.index and (self.training or bool(gates[self.index[s.block_id]] > 0))
        }
        if not ours:
            return base(x)
        y = F.linear(x, base.weight)
        pieces = []
        for spec in site_blocks:
            rows = slice(spec.out_start, spec.out_start + spec.d_out)
            ys = y[..., rows]
            if spec.block_id in ours:
                g = gates[self.index[spec.block_id]]
                ys = ys + g * (self._delta(spec, base.weight[rows], x, ys) - ys)
            pieces.append(ys)
        y = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        return y if base.bias is None else y + base.bias

    def _delta(self, spec: BlockSpec, w0: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The block's adapted output (without bias) given the base output ``x W0ᵀ``."""
        k, s = _key(spec.block_id), self.config.scale
        a, b = self.lora_A[k], self.lora_B[k]
        out = base_out + s * F.linear(F.linear(x, a), b)
        if self.config.variant == "dora":
            out = out * (self.magnitude[k] / dora_norm(w0, a, b, s))
        return out


def dora_norm(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """DoRA's denominator ``‖W0 + scale·B·A‖`` per output row (over the input dimension), ``[d_out]``."""
    return (w0 + scale * (lora_b @ lora_a)).norm(dim=1)


def base_embed_dim(model: nn.Module) -> int:
    if hasattr(model, "visual"):
        return model.visual.output_dim
    return model.num_features


def export_adapter(adapter: GatedAdapter, base_model: str, base_fingerprint: str):
    """The adapter's active blocks (and head) as a ``SparseAdapter``, ready for ``save_adapter``."""
    from selora.adapters.format import BlockWeights, SparseAdapter

    c = adapter.config
    blocks = {}
    for b in adapter.active_blocks():
        k = _key(b)
        mag = adapter.magnitude[k].detach().clone() if c.variant == "dora" else None
        blocks[b] = BlockWeights(adapter.lora_A[k].detach().clone(), adapter.lora_B[k].detach().clone(), mag)
    gate = {"gated": c.gated}
    if adapter.scores is not None:
        gate.update(tau=c.tau, regularizer=c.regularizer, max_active_blocks=c.max_active_blocks)
        gate["lambda"] = c.lam
        gate["scores"] = {b: round(float(s), 6) for b, s in zip(adapter.block_ids, adapter.scores.detach())}
    head = adapter.head
    return SparseAdapter(
        base_model, base_fingerprint, c.variant, c.r, float(c.lora_alpha), blocks, gate,
        adapter.head_classes,
        None if head is None else head.weight.detach().clone(),
        None if head is None else head.bias.detach().clone(),
        adapter.head_input,
    )
