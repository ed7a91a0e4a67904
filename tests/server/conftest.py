"""The real app on tiny models: adapters written to a temporary adapter root, an engine, a client."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.helpers import make_app, write_adapter


@pytest.fixture
def vit_root(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    write_adapter(tiny_vit, tmp_path, "a1", active=blocks[:2], seed=1)
    write_adapter(tiny_vit, tmp_path, "headed", "dora", active=blocks[3:5], seed=2, head_classes=["cat", "dog", "bird"])
    return tmp_path


@pytest.fixture
def vit_client(vit_root, tiny_vit):
    with TestClient(make_app(tiny_vit, vit_root)) as client:
        yield client


@pytest.fixture
def clip_client(tmp_path, tiny_clip):
    blocks = list(tiny_clip.blocks)
    write_adapter(tiny_clip, tmp_path, "c1", active=[b for b in blocks if b.startswith("text")][:3] + blocks[:1], seed=3)
    with TestClient(make_app(tiny_clip, tmp_path)) as client:
        yield client
