"""Helpers every test package shares: adapters with random nonzero weights, images, the real app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from selora.adapters import AdapterConfig, GatedAdapter, export_adapter, save_adapter
from selora.adapters.merge import merge_into
from selora.runtime.slots import DeviceSlots
from selora.server.app import build_engine, create_app
from selora.server.settings import MiB, Settings

CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA GPU on this machine: the compiled-kernel cases (bf16 included) need one"


def make_adapter(backbone, variant="lora", r=4, active=None, seed=0, head_classes=None):
    """A trained-looking adapter: random nonzero B (and magnitudes), ``active`` blocks open."""
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


def resident(backbone, *adapters):
    """The ``SparseAdapter``s moved into device slots of their own (one slot set, all at once)."""
    slots = DeviceSlots.holding(backbone, adapters)
    return [slots.load(a) for a in adapters]


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


def make_settings(backbone, root, host_budget=1 << 30, device_budget=1 << 30, **overrides) -> Settings:
    """Test-sized settings for ``backbone``: ``root`` is the import root (its adapters are imported
    at the first start) and the store is a fresh folder beside it, ``<root>.store``."""
    values = dict(model=backbone.model_id, import_root=str(root), store=f"{root}.store", max_body_mb=2.0, max_inputs=16, max_text_chars=200,
                  max_batch_size=32, max_wait_ms=20.0, host_cache_mb=host_budget / MiB, device_cache_mb=device_budget / MiB)
    return Settings(**{**values, **overrides})


def make_engine(backbone, root, **kwargs):
    """The server's own engine (``build_engine``) on an already built backbone."""
    return build_engine(make_settings(backbone, root, **kwargs), backbone=backbone)


def make_app(backbone, root, **kwargs):
    settings = make_settings(backbone, root, **kwargs)
    return create_app(settings, build_engine(settings, backbone=backbone))


def run_with_client(app, fn):
    """Run ``await fn(client)`` against the app in its own event loop, lifespan included."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://selora", timeout=60) as client:
                return await fn(client)

    return asyncio.run(main())


@dataclass
class Served:
    url: str
    returncode: int | None = None  # set once the process has stopped
    output: str = ""  # its stdout and stderr, once stopped


@contextlib.contextmanager
def serving(*args: str, env: dict | None = None, ready_within: float = 120, stop: int = signal.SIGINT):
    """``selora serve ARGS`` as a real process on a free 127.0.0.1 port; yields a ``Served`` once
    ``/ready`` answers 200, then stops the process with ``stop`` (its exit code and output land
    on the ``Served``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "selora.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = Served(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + ready_within
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{served.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        yield served
    finally:
        proc.send_signal(stop)
        served.output = proc.communicate(timeout=60)[0]
        served.returncode = proc.returncode


def assert_rows_equal_merged(backbone, x: torch.Tensor, mixed: torch.Tensor, rows: list[int], adapters: list) -> None:
    """Row i of a mixed batch equals image ``x[i]`` alone through a copy of ``backbone`` with
    ``adapters[rows[i]]`` merged into its weights (-1: the base): the merged-weight reference."""
    for i, j in enumerate(rows):
        merged = copy.deepcopy(backbone)
        if j >= 0:
            merge_into(merged, adapters[j])
        with torch.no_grad():
            alone = merged.encode_image(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-4)


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
                out[rel] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
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
