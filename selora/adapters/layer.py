"""``AdaptedLinear``: a frozen ``nn.Linear`` that applies adapters without merging them.

Two ways in, one layer:
- serving: the engine sets a per-batch ``ModelBatch`` (rows grouped by adapter; per layer the
  slot indices of its active blocks; the ``KernelConfig`` resolved at start-up) with
  ``use_batch``; every layer looks up its own entry and calls the kernel op; a layer with no
  active block in the batch runs the plain base GEMM only;
- training: ``attach`` gives the layers a ``GatedAdapter`` whose gated blocks run in plain torch.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
from torch import nn

from selora.kernels.ops import lora_linear
from selora.models.blocks import BlockSpec

_BATCH: ContextVar = ContextVar("selora_batch", default=None)


@contextlib.contextmanager
def use_batch(batch):
    """Run forwards inside with this ``ModelBatch`` (``selora.runtime.batch``)."""
    token = _BATCH.set(batch)
    try:
        yield batch
    finally:
        _BATCH.reset(token)


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, site: str, blocks: list[BlockSpec]):
        super().__init__()
        self.base = base
        self.site = site
        self.blocks = blocks
        self.adapter = None  # a GatedAdapter while training; not a submodule (owned elsewhere)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = _BATCH.get()
        if batch is not None:
            return lora_linear(x, self.base.weight, self.base.bias, batch.layers.get(self.site), batch.config)
        if self.adapter is not None:
            return self.adapter.site_forward(self.base, self.blocks, x)
        return self.base(x)

    def __setattr__(self, name, value):
        if name == "adapter":  # keep the adapter's parameters out of the backbone's
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
