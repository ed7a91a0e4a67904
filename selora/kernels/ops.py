"""``lora_linear``: the one op every adapted layer calls (dispatch to a backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selora.kernels.batch import LayerBatch
from selora.kernels.reference import lora_linear_reference


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch | None) -> torch.Tensor:
    """``x·W0ᵀ + b`` plus the LoRA/DoRA work of ``layer`` (see ``reference`` for the semantics).

    ``layer=None`` (no row of the batch has a block of this layer active) is the plain base GEMM.
    """
    if layer is None:
        return F.linear(x, weight, bias)
    return lora_linear_reference(x, weight, bias, layer)
