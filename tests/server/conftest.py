"""The real app on tiny models: adapters written to a temporary adapter root, an engine, a client."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from selora.adapters import export_adapter, save_adapter
from selora.runtime.engine import Engine
from selora.runtime.inputs import Limits
from selora.runtime.registry import AdapterRegistry
from selora.server.app import create_app
from selora.server.settings import Settings
from tests.conftest import make_adapter


def write_adapter(backbone, root, name, variant="lora", r=4, active=None, seed=0, head_classes=None):
    """A gated adapter with random nonzero B, exported (active blocks only) and saved as ``root/name``."""
    sparse = export_adapter(make_adapter(backbone, variant, r, active, seed, head_classes), backbone.model_id, backbone.fingerprint)
    save_adapter(sparse, root / name)
    return sparse


def image_b64(seed: int, size=(40, 36), data_uri=True) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_uri else text


def make_app(backbone, root, host_budget=1 << 30, device_budget=1 << 30, limits=Limits(max_inputs=16, max_text_chars=200), **engine_kwargs):
    settings = Settings(model=backbone.model_id, adapter_root=str(root), max_body_mb=2.0)
    registry = AdapterRegistry(backbone, root, host_budget, device_budget)
    registry.preload()
    engine = Engine(backbone, registry, limits, **{"max_batch_size": 32, "max_wait_ms": 20.0, **engine_kwargs})
    return create_app(settings, engine)


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


def run_with_client(app, fn):
    """Run ``await fn(client)`` against the app in its own event loop, lifespan included."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://selora", timeout=60) as client:
                return await fn(client)

    return asyncio.run(main())
