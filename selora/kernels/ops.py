"""``lora_linear``: the one op every adapted layer calls — dispatch, custom op, FLOP formula.

Semantics (see ``reference`` for the loop in plain torch)::

    y = x · W0ᵀ
    for e in layer.entries:                        # (adapter, active block) pairs of this site
        rows = every token of items e.item_start .. e.item_end
        cols = e.out_start .. e.out_start + layer.out_size
        t = s_e · (x[rows] · A_eᵀ) · Bᵀ_e          # A_e, Bᵀ_e, s_e, f_e: the block's slot pages
        y[rows, cols] = f_e ⊙ (y[rows, cols] + t)  if e is DoRA, else  y[rows, cols] += t
    y += b

``layer=None`` (no row of the batch has a block of this layer active) is ``F.linear`` and
nothing else: no custom op, no kernel launch.

The backend comes from the ``KernelConfig`` the caller resolved once (``config.backend``):
``triton`` (compiled, CUDA), ``triton-interpret`` (the same kernel in Triton's CPU interpreter)
or ``torch`` (the reference). Eager inference calls the backend directly; under autograd, a
dispatch mode (``FlopCounterMode``) or tracing, the registered custom op runs instead, so
counting and compiling see exactly the same computation.

FLOP convention (``lora_linear_flops``, registered for ``FlopCounterMode``): matmul FLOPs only,
2 per multiply-add — the base GEMM ``2·M·N·K`` (M = rows = items × tokens) plus, per entry,
``2·rows_e·d_in·r_e`` (shrink) + ``2·rows_e·r_e·out_size`` (expand). Bias, scale and DoRA's
per-channel factor are elementwise and not counted; inactive blocks and base-only rows cost 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from selora.kernels.batch import COLUMN, META_STRIDE, LayerBatch, SiteBuffers, layer_batch
from selora.kernels.config import KernelConfig
from selora.kernels.reference import lora_linear_reference
from selora.kernels.tuning import tuning_for


def _flops(x_shape: Sequence[int], weight_shape: Sequence[int], out_size: int, entries: Sequence[tuple[int, int, int]]) -> int:
    """``entries``: (item_start, item_end, rank) per entry."""
    d_in, d_out = int(x_shape[-1]), int(weight_shape[0])
    rows = 1
    for s in x_shape[:-1]:
        rows *= int(s)
    tokens = rows // int(x_shape[0]) if len(x_shape) > 1 and x_shape[0] else 1
    total = 2 * rows * d_out * d_in
    for start, end, rank in entries:
        rows_e = (end - start) * tokens
        total += 2 * rows_e * d_in * rank + 2 * rows_e * rank * out_size
    return total


def _host_entries(host_meta: Sequence[int]) -> list[tuple[int, int, int]]:
    c = COLUMN
    rows = [host_meta[i : i + META_STRIDE] for i in range(0, len(host_meta), META_STRIDE)]
    return [(r[c["item_start"]], r[c["item_end"]], r[c["rank"]]) for r in rows]


def lora_linear_flops(x_shape: Sequence[int], weight_shape: Sequence[int], layer: LayerBatch | None) -> int:
    """Matmul FLOPs of ``lora_linear(x, weight, bias, layer)``: base GEMM + active entries only.

    ``x_shape`` is ``[items, (tokens,) d_in]``; ``weight_shape`` ``[d_out, d_in]``. Closed form of
    what ``FlopCounterMode`` records for the op (convention in the module docstring).
    """
    if layer is None:
        return _flops(x_shape, weight_shape, 0, [])
    return _flops(x_shape, weight_shape, layer.out_size, [(e.item_start, e.item_end, e.rank) for e in layer.entries])


def _run(x, weight, bias, layer: LayerBatch, config: KernelConfig) -> torch.Tensor:
    if config.backend == "torch":
        return lora_linear_reference(x, weight, bias, layer)
    from selora.kernels.triton_lora import triton_lora_linear  # needs the triton package

    return triton_lora_linear(x, weight, bias, layer, config)


@torch.library.custom_op("selora::lora_linear", mutates_args=())
def lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    dora_factor: torch.Tensor,
    scales: torch.Tensor,
    meta: torch.Tensor,
    host_meta: list[int],
    host_scales: list[float],
    backend: str,
    base_gemm: str,
    split_shrink_rank: int,
) -> torch.Tensor:
    """The fused op on tensors only (what ``torch.compile`` and ``FlopCounterMode`` see)."""
    host = np.array(host_meta, dtype=np.int32).reshape(-1, META_STRIDE)
    pages = [0.0] * scales.shape[0]  # the host scales of the pages these entries read
    for page, scale in zip(host[:, COLUMN["page"]].tolist(), host_scales):
        pages[page] = scale
    layer = layer_batch(SiteBuffers(lora_a, lora_bt, dora_factor, scales, pages), host, meta)
    tuning = tuning_for(x.device) if backend != "torch" else {}
    return _run(x, weight, bias, layer, KernelConfig(backend, base_gemm, split_shrink_rank, tuning))


@lora_linear_op.register_fake
def _lora_linear_fake(x, weight, bias, lora_a, lora_bt, dora_factor, scales, meta, host_meta, host_scales, backend, base_gemm,
                      split_shrink_rank):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(torch.ops.selora.lora_linear)
def _lora_linear_flop_formula(x_shape, weight_shape, bias_shape, a_shape, bt_shape, factor_shape, scales_shape, meta_shape,
                              host_meta, host_scales, backend, base_gemm, split_shrink_rank, out_shape=None, **kwargs) -> int:
    return _flops(x_shape, weight_shape, bt_shape[1], _host_entries(host_meta))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch | None,
                config: KernelConfig) -> torch.Tensor:
    """``x·W0ᵀ + b`` plus the LoRA/DoRA work of ``layer`` (semantics in the module docstring)."""
    if layer is None:
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled() and _get_current_dispatch_mode() is None and not torch.compiler.is_compiling():
        # Eager inference: call the backend directly, skipping the custom op's dispatch (~0.1 ms
        # per layer) and its host-side copy of the metadata as a list.
        return _run(x, weight, bias, layer, config)
    b = layer.buffers
    return torch.ops.selora.lora_linear(
        x, weight, bias, b.lora_a, b.lora_bt, b.dora_factor, b.scales, layer.meta, layer.host.ravel().tolist(),
        [e.scale for e in layer.entries], config.backend, config.base_gemm, config.split_shrink_rank,
    )
