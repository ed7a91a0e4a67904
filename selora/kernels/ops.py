"""``lora_linear``: the one op every adapted layer calls — dispatch, custom op, FLOP formula.

Semantics (see ``reference`` for the loop in plain torch)::

    y = x · W0ᵀ
    for e in layer.entries:                        # (adapter, active block) pairs of this layer
        rows = every token of items e.item_start .. e.item_end
        cols = e.out_start .. e.out_start + layer.out_size
        t = e.scale · (x[rows] · A_eᵀ) · B_eᵀ
        y[rows, cols] = f_e ⊙ (y[rows, cols] + t)  if e is DoRA, else  y[rows, cols] += t
    y += b

``layer=None`` (no row of the batch has a block of this layer active) is ``F.linear`` and
nothing else: no custom op, no kernel launch.

Backend (``SELORA_KERNEL``, read at every call so tests and the server can set it):

- ``auto`` (default): the Triton kernel for CUDA tensors, the torch reference elsewhere;
- ``triton``: the Triton kernel always; on CPU tensors it needs ``TRITON_INTERPRET=1`` and then
  runs the real kernel in Triton's interpreter;
- ``torch``: the torch reference always.

FLOP convention (``lora_linear_flops``, registered for ``FlopCounterMode``): matmul FLOPs only,
2 per multiply-add — the base GEMM ``2·M·N·K`` (M = rows = items × tokens) plus, per entry,
``2·rows_e·d_in·r_e`` (shrink) + ``2·rows_e·r_e·out_size`` (expand). Bias, scale and DoRA's
per-channel factor are elementwise and not counted; inactive blocks and base-only rows cost 0.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from selora.kernels.batch import META_FIELDS, LayerBatch, LoraEntry
from selora.kernels.reference import lora_linear_reference

BACKEND_SETTINGS = ("auto", "triton", "torch")
HOST_FIELDS = META_FIELDS + ("dora",)  # host_meta: len(HOST_FIELDS) ints per entry


class KernelBackendError(RuntimeError):
    """``SELORA_KERNEL`` names an unknown backend, or one that cannot run on these tensors."""


def _setting() -> str:
    value = os.environ.get("SELORA_KERNEL", "auto").strip().lower() or "auto"
    if value not in BACKEND_SETTINGS:
        raise KernelBackendError(f"SELORA_KERNEL={value!r}: expected one of {', '.join(BACKEND_SETTINGS)}")
    return value


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_backend(device: torch.device | str | None = None) -> str:
    """The backend ``lora_linear`` uses for tensors on ``device`` (default: CUDA if present).

    One of ``"triton"`` (compiled for the GPU), ``"triton-interpret"`` (the same kernel in
    Triton's CPU interpreter) or ``"torch"`` (the reference loop). Raises ``KernelBackendError``
    when ``SELORA_KERNEL`` is invalid or forces Triton where it cannot run.
    """
    setting = _setting()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if setting == "torch":
        return "torch"
    if setting == "auto":
        return "triton" if dev.type == "cuda" and _triton_available() else "torch"
    if not _triton_available():
        raise KernelBackendError("SELORA_KERNEL=triton but the triton package is not installed")
    if dev.type == "cuda":
        return "triton"
    if _interpret():
        return "triton-interpret"
    raise KernelBackendError(f"SELORA_KERNEL=triton on {dev.type} tensors needs TRITON_INTERPRET=1")


def host_meta(layer: LayerBatch) -> list[int]:
    """The layer's entries as a flat int list (``HOST_FIELDS`` per entry): host-side metadata."""
    return [int(v) for e in layer.entries for v in (*(getattr(e, f) for f in META_FIELDS), e.dora)]


def _entries(meta: Sequence[int], scales: Sequence[float]) -> list[LoraEntry]:
    n = len(HOST_FIELDS)
    rows = [meta[i : i + n] for i in range(0, len(meta), n)]
    return [LoraEntry(*r[:5], scale=float(s), dora=bool(r[5])) for r, s in zip(rows, scales)]


def _flops(x_shape: Sequence[int], weight_shape: Sequence[int], out_size: int, entries: Sequence[LoraEntry]) -> int:
    d_in, d_out = int(x_shape[-1]), int(weight_shape[0])
    rows = 1
    for s in x_shape[:-1]:
        rows *= int(s)
    tokens = rows // int(x_shape[0]) if len(x_shape) > 1 and x_shape[0] else 1
    total = 2 * rows * d_out * d_in
    for e in entries:
        rows_e = (e.item_end - e.item_start) * tokens
        total += 2 * rows_e * d_in * e.rank + 2 * rows_e * e.rank * out_size
    return total


def lora_linear_flops(x_shape: Sequence[int], weight_shape: Sequence[int], layer: LayerBatch | None) -> int:
    """Matmul FLOPs of ``lora_linear(x, weight, bias, layer)``: base GEMM + active entries only.

    ``x_shape`` is ``[items, (tokens,) d_in]``; ``weight_shape`` ``[d_out, d_in]``. Closed form of
    what ``FlopCounterMode`` records for the op (convention in the module docstring).
    """
    if layer is None:
        return _flops(x_shape, weight_shape, 0, [])
    return _flops(x_shape, weight_shape, layer.out_size, layer.entries)


@torch.library.custom_op("selora::lora_linear", mutates_args=())
def lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    scales: torch.Tensor,
    meta: torch.Tensor,
    dora_factor: torch.Tensor | None,
    host_meta: list[int],
    host_scales: list[float],
) -> torch.Tensor:
    """The fused op on tensors only (what ``torch.compile`` and ``FlopCounterMode`` see)."""
    layer = LayerBatch(
        entries=_entries(host_meta, host_scales),
        out_size=lora_bt.shape[1],
        lora_a=lora_a,
        lora_bt=lora_bt,
        scales=scales,
        meta=meta,
        dora_factor=dora_factor,
    )
    if kernel_backend(x.device) == "torch":
        return lora_linear_reference(x, weight, bias, layer)
    from selora.kernels.triton_lora import triton_lora_linear

    return triton_lora_linear(x, weight, bias, layer)


@lora_linear_op.register_fake
def _lora_linear_fake(x, weight, bias, lora_a, lora_bt, scales, meta, dora_factor, host_meta, host_scales):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(torch.ops.selora.lora_linear)
def _lora_linear_flop_formula(x_shape, weight_shape, bias_shape, a_shape, bt_shape, scales_shape, meta_shape,
                              dora_shape, host_meta, host_scales, out_shape=None, **kwargs) -> int:
    return _flops(x_shape, weight_shape, bt_shape[1], _entries(host_meta, host_scales))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch | None) -> torch.Tensor:
    """``x·W0ᵀ + b`` plus the LoRA/DoRA work of ``layer`` (semantics in the module docstring)."""
    if layer is None:
        return F.linear(x, weight, bias)
    if x.device.type == "cpu" and not torch.is_grad_enabled() and _get_current_dispatch_mode() is None \
            and kernel_backend(x.device) == "torch":
        # Eager CPU inference: call the op's implementation directly, skipping ~0.1 ms of custom-op
        # dispatch per layer. Under FlopCounterMode (a dispatch mode), tracing or autograd the
        # registered op runs, so counting and compiling see exactly the same computation.
        return lora_linear_reference(x, weight, bias, layer)
    return torch.ops.selora.lora_linear(
        x, weight, bias, layer.lora_a, layer.lora_bt, layer.scales, layer.meta, layer.dora_factor,
        host_meta(layer), [e.scale for e in layer.entries],
    )
