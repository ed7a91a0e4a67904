"""The real app on tiny-vit with an adapter root holding adapters and traps (symlink loops, a
link leaving the root), and ``snapshot``: the state no bad request may change."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from tests.adversarial.corpus import MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS
from tests.helpers import image_b64, make_app, write_adapter


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


def serve(app):
    """Run ``app`` on a real uvicorn on 127.0.0.1 in a thread; yield its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def adapter_files(hostile_root):
    return {n: (hostile_root / "a1" / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}


@pytest.fixture(scope="module")
def dora_files(hostile_root):
    return {n: (hostile_root / "d1" / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}


def stored_files(root) -> dict[str, str]:
    """Every entry under the root (hidden ones too): file hashes and link targets."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def snapshot(client, root) -> dict:
    """The adapter list (residency aside: caches may warm), reference embeddings under the base and
    each adapter, a classification, the files of the import root and of the store (manifest and blobs)."""
    cache_fields = {"resident_host", "resident_device", "device_bytes"}
    adapters = [{k: v for k, v in a.items() if k not in cache_fields} for a in client.get("/v1/adapters").json()["data"]]
    state = {"adapters": adapters, "files": stored_files(root), "store": stored_files(f"{root}.store")}
    for model in ("base", "a1", "d1"):
        state[model] = client.post("/v1/embeddings", json={"model": model, "input": [image_b64(0)]}).json()["data"][0]["embedding"]
    state["classify"] = client.post("/v1/classify", json={"model": "d1", "input": [image_b64(1)]}).json()
    return state
