"""The service as a process: a real uvicorn on 127.0.0.1, settings, readiness and overload."""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from selora.kernels.config import KernelConfig
from selora.server.app import build_engine, create_app
from selora.server.main import add_arguments
from selora.server.settings import Settings, SettingsError
from tests.helpers import image_b64, make_app, run_with_client, serving, write_adapter


def test_uvicorn_process_serves_and_stops_cleanly(tmp_path, tiny_vit):
    write_adapter(tiny_vit, tmp_path, "pre", active=list(tiny_vit.blocks)[:2])
    with serving("--model", "tiny-vit", "--import-root", str(tmp_path), "--store", str(tmp_path / ".store"),
                 env={"SELORA_MAX_BATCH_SIZE": "8"}) as served:
        url = served.url
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        models = httpx.get(f"{url}/v1/models").json()
        assert models["base"]["id"] == "tiny-vit" and [m["id"] for m in models["data"]] == ["base", "pre"]
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "pre", "input": [image_b64(0), image_b64(1)]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert "selora_batch_size_count" in httpx.get(f"{url}/metrics").text
    assert served.returncode == 0, served.output
    assert "kernel backend" in served.output and "stopped" in served.output


def test_ray_process_stops_cleanly_on_sigterm(tmp_path, tiny_vit):
    """What a process manager sends: exit 0, no stack dump from Ray's signal handler, no Ray left."""
    pytest.importorskip("ray", reason="selora[ray] is not installed")
    write_adapter(tiny_vit, tmp_path, "pre", active=list(tiny_vit.blocks)[:2])
    with serving("--ray", "--replicas", "1", "--model", "tiny-vit", "--import-root", str(tmp_path), "--store", str(tmp_path / ".store"),
                 stop=signal.SIGTERM) as served:
        r = httpx.post(f"{served.url}/v1/embeddings", json={"model": "pre", "input": [image_b64(0)]}, timeout=60)
        assert r.status_code == 200
    assert served.returncode == 0, served.output
    assert "Traceback" not in served.output and "SIGTERM received" not in served.output, served.output
    assert "stopping: the application leaves the cluster" in served.output


def test_settings_precedence_flags_over_env_over_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"SELORA_PORT": "9001", "SELORA_MAX_WAIT_MS": "2.5", "SELORA_MODEL": "tiny-clip"}
    s = Settings.load(parser.parse_args(["--model", "tiny-vit", "--import-root", "/tmp/a", "--allow-unauthenticated"]), env)
    assert (s.model, s.port, s.max_wait_ms, s.import_root, s.host) == ("tiny-vit", 9001, 2.5, "/tmp/a", "127.0.0.1")
    assert s.allow_unauthenticated and not Settings.load(parser.parse_args([]), {}).allow_unauthenticated
    assert Settings.load(parser.parse_args([]), {"SELORA_ALLOW_UNAUTHENTICATED": "true"}).allow_unauthenticated
    assert Settings.load(None, {}).model == "dinov2-small"


def test_device_and_dtype_settings():
    cpu_only = not torch.cuda.is_available()
    auto = Settings()
    assert auto.torch_device().type == ("cpu" if cpu_only else "cuda")
    assert auto.torch_dtype() == (torch.float32 if cpu_only else torch.bfloat16)
    assert Settings(device="cpu", dtype="bfloat16").torch_dtype() == torch.bfloat16
    for bad, words in [(Settings(device="tpu"), "device must be"), (Settings(dtype="int8"), "dtype must be")] + (
            [(Settings(device="cuda"), "no CUDA GPU")] if cpu_only else []):
        with pytest.raises(SettingsError, match=words):
            bad.torch_dtype()


def test_serve_refuses_a_device_it_cannot_use():
    out = subprocess.run([sys.executable, "-m", "selora.cli", "serve", "--dtype", "int8"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "selora serve: dtype must be auto or one of float32, bfloat16, float16" in out.stderr


def test_bad_kernel_configuration_is_refused_at_start_up(tmp_path, tiny_vit):
    assert Settings(device="cpu", kernel="triton", base_gemm="library").kernel_config() == KernelConfig("triton-interpret", "library", 32)
    bad = [(dict(kernel="cuda-please"), "kernel 'cuda-please'"), (dict(kernel="triton", base_gemm="cublas"), "base GEMM 'cublas'"),
           (dict(kernel="triton", split_shrink_rank=-1), "split shrink rank")]
    for overrides, words in bad:
        with pytest.raises(SettingsError, match=words):
            build_engine(Settings(device="cpu", store=str(tmp_path / "store"), **overrides), backbone=tiny_vit)
        assert not (tmp_path / "store").exists()  # refused before the store was opened
    env = {**os.environ, "SELORA_KERNEL": "cuda-please"}  # the environment reaches the kernel through the settings only
    out = subprocess.run([sys.executable, "-m", "selora.cli", "serve", "--model", "tiny-vit"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "selora serve: kernel 'cuda-please': expected one of auto, triton, torch" in out.stderr


def test_not_ready_while_loading_or_after_a_failed_load(tmp_path):
    with TestClient(create_app(Settings(model="no-such-model", import_root=str(tmp_path), store=str(tmp_path / ".store")))) as client:
        assert client.get("/health").status_code == 200
        deadline = time.monotonic() + 30
        while "failed" not in (r := client.get("/ready")).text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready" and "no-such-model" in r.json()["error"]["message"]
        models = client.get("/v1/models")
        assert models.status_code == 503 and models.headers["retry-after"] == "1"


def test_overload_answers_429_with_retry_after(tmp_path, tiny_vit):
    async def flood(client):
        engine = app.state.engine
        busy = threading.Event()  # hold the forward thread so the queue cannot drain meanwhile
        engine._forward_pool.submit(busy.wait)
        body = {"model": "base", "input": [image_b64(0)]}
        post = lambda: asyncio.create_task(client.post("/v1/embeddings", json=body))  # noqa: E731
        deadline = time.monotonic() + 30
        held = [post(), post()]  # one batch of 2 rows, waiting behind the held thread
        while engine._forward_pool._work_queue.qsize() < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        rest = [post() for _ in range(8)]  # 3 fill the queue, the other 5 are refused
        while sum(t.done() for t in rest) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        busy.set()
        return await asyncio.gather(*held, *rest)

    # Admission is decided against the queue as requests arrive, so the test lets the first batch
    # leave the queue before the flood (a long max_wait makes that batch a full 2 rows).
    app = make_app(tiny_vit, tmp_path, max_batch_size=2, max_wait_ms=2000.0, max_queue=3)
    responses = run_with_client(app, flood)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 5
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "overloaded"
