"""Shared fixtures: tiny backbones (random weights) and adapters made from them."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch

import selora.compat  # noqa: F401


@pytest.fixture(scope="session")
def tiny_vit():
    from selora.models import load_backbone

    torch.manual_seed(0)
    return load_backbone("tiny-vit")


@pytest.fixture(scope="session")
def tiny_clip():
    from selora.models import load_backbone

    torch.manual_seed(0)
    return load_backbone("tiny-clip")


def make_adapter(backbone, variant="lora", r=4, active=None, seed=0, head_classes=None):
    """A trained-looking adapter: random nonzero B (and magnitudes), ``active`` blocks open."""
    from selora.adapters import AdapterConfig, GatedAdapter

    cfg = AdapterConfig(variant=variant, r=r, init_seed=seed)
    adapter = GatedAdapter(cfg, backbone.blocks, backbone.model, head_classes=head_classes)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for p in adapter.magnitude.values():
            p.mul_(1 + 0.1 * torch.rand(p.shape, generator=gen))
        if active is not None:
            for i, b in enumerate(adapter.block_ids):
                adapter.scores[i] = 0.15 if b in set(active) else 0.0
    return adapter.eval()
