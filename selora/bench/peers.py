"""The model variants a benchmark compares, each as a ready ``forward(x)`` closure.

- ``base``: the pristine model (no adapter wrapper at all);
- ``merged``: a copy with an adapter merged into its weights (``selora.adapters.merge``);
- ``selora``: selora's unmerged serving path, ``SparseAdapter`` → device slots →
  ``forward_mixed`` (gated: only active blocks; "every block": plain LoRA/DoRA unmerged);
- ``peft``: HF PEFT LoRA/DoRA on a copy of the same timm model, every site
  (``qkv``, ``proj``, ``fc1``, ``fc2``; PEFT adapts the fused qkv as one block), or only the
  sites of given blocks; with several adapters, PEFT's mixed-batch inference (``adapter_names``);
- ``merge_swap``: per adapter group of a batch, merge, run the group's rows, unmerge.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from selora.adapters.format import SparseAdapter
from selora.adapters.layer import AdaptedLinear
from selora.adapters.merge import merge_into, unmerge
from selora.models.factory import Backbone
from selora.runtime.batch import forward_mixed
from selora.runtime.slots import DeviceSlots

Forward = Callable[[torch.Tensor], torch.Tensor]
PEFT_SITES = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


class BenchError(ValueError):
    """A benchmark setting that cannot run; the message says why and what to do."""


class PeerError(BenchError):
    """A peer cannot be built (PEFT on an open_clip model, or ``peft`` not installed)."""


def pristine_copy(backbone: Backbone) -> Backbone:
    """A deep copy of ``backbone`` whose model has no selora wrappers (``AdaptedLinear`` -> its
    ``nn.Linear``), so peers run the plain model."""
    model = copy.deepcopy(backbone.model)
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    for name, m in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base)
    meta = {k: v for k, v in backbone.meta.items() if k != "adapted_layers"}  # inject's record of the original's layers
    return dataclasses.replace(backbone, model=model, meta=meta)


def base_forward(pristine: Backbone) -> Forward:
    return torch.no_grad()(pristine.encode_image)


def merged_forward(pristine: Backbone, adapter: SparseAdapter) -> Forward:
    merged = pristine_copy(pristine)
    merge_into(merged, adapter)
    return torch.no_grad()(merged.encode_image)


def selora_forward(backbone: Backbone, adapters: Sequence[SparseAdapter], rows: int) -> Forward:
    """The adapters in device slots of their own; rows spread round-robin over them (one
    adapter: every row uses it)."""
    slots = DeviceSlots.holding(backbone, adapters)
    resident = [slots.load(a) for a in adapters]
    row_adapter = [i % len(adapters) for i in range(rows)]
    return lambda x: forward_mixed(backbone, x, resident, row_adapter)


def _peft_config(r: int, dora: bool, target: str | list[str]):
    try:
        from peft import LoraConfig
    except ImportError:
        raise PeerError("the PEFT peers need the bench extra: pip install 'selora[bench]'") from None

    return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=target, use_dora=dora, init_lora_weights=False)


def peft_sites(backbone: Backbone, blocks: Sequence[str]) -> list[str]:
    """The module names PEFT must target to cover ``blocks`` (q/k/v share the fused qkv)."""
    return sorted({backbone.blocks[b].site for b in blocks})


def peft_model(pristine: Backbone, r: int, dora: bool, adapters: Sequence[Sequence[str] | None] = (None,)) -> nn.Module:
    """PEFT on a copy of the timm model: one PEFT adapter per entry of ``adapters`` (named
    ``a0``, ``a1``...), each on every site (``None``) or on the sites of the given blocks."""
    if pristine.library != "timm":
        raise PeerError(f"the PEFT peer runs on timm models; {pristine.model_id} is {pristine.library}")
    _peft_config(r, dora, PEFT_SITES)  # raises PeerError when peft is not installed
    from peft import get_peft_model

    targets = [PEFT_SITES if a is None else peft_sites(pristine, a) for a in adapters]
    # autocast_adapter_dtype=False: adapters in the base's dtype (PEFT would upcast bf16 ones to fp32)
    model = get_peft_model(copy.deepcopy(pristine.model), _peft_config(r, dora, targets[0]), adapter_name="a0",
                           autocast_adapter_dtype=False)
    for i, target in enumerate(targets[1:], start=1):
        model.add_adapter(f"a{i}", _peft_config(r, dora, target), autocast_adapter_dtype=False)
    return model.eval()


def peft_forward(model: nn.Module, num_adapters: int = 1, rows: int = 0) -> Forward:
    """One adapter: plain PEFT forward. Several: mixed batch, rows round-robin over adapters."""
    if num_adapters == 1:
        return torch.no_grad()(lambda x: model(x))
    names = [f"a{i % num_adapters}" for i in range(rows)]
    return torch.no_grad()(lambda x: model(x, adapter_names=names))


def merge_swap_forward(pristine: Backbone, adapters: Sequence[SparseAdapter], rows: int) -> Forward:
    """Per adapter group (rows round-robin over ``adapters``): merge, forward, unmerge."""
    work = pristine_copy(pristine)
    groups = [list(range(i, rows, len(adapters))) for i in range(len(adapters))]

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = None
        for adapter, idx in zip(adapters, groups):
            saved = merge_into(work, adapter)
            y = work.encode_image(x[idx])
            unmerge(work, saved)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out

    return forward
