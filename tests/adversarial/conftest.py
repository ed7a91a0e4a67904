"""The real app on tiny-vit with an adapter root holding adapters and traps (symlink loops, a
link leaving the root); ``tests.helpers.snapshot`` is the state no bad request may change."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from tests.adversarial.corpus import MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS
from tests.helpers import make_app, serve, write_adapter


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, tiny_vit):
    root = tmp_path_factory.mktemp("root")
    blocks = list(tiny_vit.blocks)
    write_adapter(tiny_vit, root, "a1", active=blocks[:2], seed=1)
    write_adapter(tiny_vit, root, "d1", "dora", active=blocks[2:4], seed=2, head_classes=["cat", "dog"])
    outside = tmp_path_factory.mktemp("outside")
    write_adapter(tiny_vit, outside, "evil", active=blocks[:1])
    os.symlink(outside / "evil", root / "outside")
    os.symlink("loop", root / "loop")
    os.symlink("self", root / "self")
    return root


@pytest.fixture(scope="module")
def hostile_app(hostile_root, tiny_vit):
    return make_app(tiny_vit, hostile_root, max_image_pixels=MAX_IMAGE_PIXELS, max_request_pixels=MAX_REQUEST_PIXELS)


@pytest.fixture(scope="module")
def hostile_client(hostile_app):
    with TestClient(hostile_app) as client:
        yield client


@pytest.fixture(scope="module")
def live(hostile_app):
    """The port of a real uvicorn serving ``hostile_app`` in a thread."""
    yield from serve(hostile_app)


@pytest.fixture(scope="module")
def adapter_files(hostile_root):
    return {n: (hostile_root / "a1" / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}


@pytest.fixture(scope="module")
def dora_files(hostile_root):
    return {n: (hostile_root / "d1" / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
