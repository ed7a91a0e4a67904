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
