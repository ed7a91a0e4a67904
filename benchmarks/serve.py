"""Serving benchmark: the selora server on 127.0.0.1 under bounded closed-loop load.

For concurrency 1, 8 and 32 and for 1, 8 and 64 distinct adapters (~5 % of blocks active,
r = 16 LoRA) with uniform or skewed (Zipf 1.1) popularity, each of ``concurrency`` clients sends
one-image embedding requests back to back for a fixed time. Reported per cell: images/s, p50 and
p99 latency, the ratio to the same server serving the base model alone at the same concurrency,
and the batching gain (throughput over concurrency-1 throughput), next to the issue's targets:
>= 0.90x the adapter-free throughput at 5 % active blocks, >= 3x the concurrency-1 throughput.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve.py --quick       # a few minutes on CPU
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve.py --model dinov2-small --seconds 20

``--quick`` serves ``quick-vit``: timm ViT-S/16 (12 layers, 72 blocks like DINO ViT-S) built at
64 px (16 patches) with random weights, so that a CPU run finishes in minutes. Other models are
served by ``selora serve`` itself. Results: ``benchmarks/results/serve_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUICK_MODEL = "quick-vit"
RESULTS = Path(__file__).parent / "results"
TARGET_RATIO, TARGET_BATCHING = 0.90, 3.0


def quick_backbone():
    """timm ViT-S/16 at 64 px, random weights, wrapped like ``load_backbone`` wraps timm models."""
    import selora.compat  # noqa: F401

    import timm

    from selora.models.blocks import build_block_table
    from selora.models.factory import Backbone
    from selora.models.resolution import timm_eval_transform

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=64)
    transform = timm_eval_transform(model, (64, 64))  # timm's own eval transform, as load_backbone builds it
    model.requires_grad_(False).eval()
    return Backbone(QUICK_MODEL, "timm", model, transform, build_block_table(model, "timm"), model.num_features)


def serve_quick(args) -> None:
    """Worker process: the app of ``selora serve`` on the quick backbone."""
    import uvicorn

    from selora.server.app import build_engine, create_app
    from selora.server.settings import Settings

    settings = Settings(model=QUICK_MODEL, import_root=args.import_root, store=f"{args.import_root}.store", port=args.port)
    engine = build_engine(settings, backbone=quick_backbone())
    uvicorn.run(create_app(settings, engine), host="127.0.0.1", port=args.port, log_level="warning")


def write_adapters(backbone, root: Path, count: int, fraction: float, r: int, seed: int = 0) -> list[str]:
    """``count`` LoRA adapters, each with ``round(fraction * blocks)`` random active blocks."""
    from selora.adapters.format import save_adapter
    from selora.adapters.synthetic import random_adapter

    rng = random.Random(seed)
    blocks = list(backbone.blocks)
    k = max(1, round(fraction * len(blocks)))
    names = []
    for i in range(count):
        adapter = random_adapter(backbone.blocks, rng.sample(blocks, k), r, seed=seed + i, base_model=backbone.model_id)
        save_adapter(adapter, root / f"ad{i:02d}")
        names.append(f"ad{i:02d}")
    return names


def images(n: int, size: int) -> list[str]:
    from PIL import Image

    out = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


async def closed_loop(url: str, concurrency: int, seconds: float, models: list[str], weights: list[float], pool: list[str]) -> dict:
    """``concurrency`` clients, each sending its next request when the previous one returns."""
    import httpx

    latencies: list[float] = []
    errors = 0
    rng = random.Random(concurrency)
    stop_at = time.perf_counter() + seconds

    async def client_loop(client):
        nonlocal errors
        while time.perf_counter() < stop_at:
            body = {"model": rng.choices(models, weights)[0], "input": [rng.choice(pool)]}
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/embeddings", json=body)
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "images": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
        "images_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if args.model == QUICK_MODEL:
        cmd = [sys.executable, __file__, "--serve-worker", "--import-root", str(root), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "selora.cli", "serve", "--model", args.model, "--import-root", str(root), "--store", f"{root}.store",
               "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(proc, port, 600)


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float) -> subprocess.Popen:
    """``proc`` once its ``/ready`` answers 200; ``SystemExit`` if it exits or times out first
    (with its stderr when that was piped)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = proc.stderr.read() if proc.stderr else ""
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(map(str, proc.args))}\n{why}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server never became ready")


def zipf(n: int, s: float = 1.1) -> list[float]:
    return [1 / (i + 1) ** s for i in range(n)]


def run_benchmark(args) -> dict:
    if args.model == QUICK_MODEL:
        backbone = quick_backbone()
    else:
        from selora.models import load_backbone

        backbone = load_backbone(args.model)
    root = Path(tempfile.mkdtemp(prefix="selora-serve-bench-"))
    names = write_adapters(backbone, root, max(args.adapters), args.fraction, args.rank)
    active = max(1, round(args.fraction * len(backbone.blocks)))
    pool = images(16, args.image_size)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, root, port)
    cells = []
    try:
        asyncio.run(closed_loop(url, 8, args.warmup, ["base"] + names, [1.0] * (len(names) + 1), pool))
        for c in args.concurrency:
            base = asyncio.run(closed_loop(url, c, args.seconds, ["base"], [1.0], pool))
            cells.append({"adapters": 0, "popularity": "base only", "concurrency": c, **base})
            print(f"base            c={c:<3} {base['images_per_s']:8.1f} img/s  p50 {base['p50_ms']} ms  p99 {base['p99_ms']} ms", flush=True)
            for n in args.adapters:
                for pop in ("uniform", "skewed") if n > 1 else ("uniform",):
                    weights = [1.0] * n if pop == "uniform" else zipf(n)
                    res = asyncio.run(closed_loop(url, c, args.seconds, names[:n], weights, pool))
                    res["ratio_to_base"] = round(res["images_per_s"] / base["images_per_s"], 3)
                    cells.append({"adapters": n, "popularity": pop, "concurrency": c, **res})
                    print(f"{n:>2} adapters {pop:8} c={c:<3} {res['images_per_s']:8.1f} img/s  p50 {res['p50_ms']} ms  "
                          f"p99 {res['p99_ms']} ms  x{res['ratio_to_base']} of base", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    c1 = {(x["adapters"], x["popularity"]): x["images_per_s"] for x in cells if x["concurrency"] == min(args.concurrency)}
    for x in cells:
        x["batching_gain"] = round(x["images_per_s"] / c1[(x["adapters"], x["popularity"])], 3)
    return {
        "model": args.model,
        "blocks": len(backbone.blocks),
        "active_blocks_per_adapter": active,
        "active_fraction": round(active / len(backbone.blocks), 4),
        "rank": args.rank,
        "image_size_sent": args.image_size,
        "seconds_per_cell": args.seconds,
        "server": {"max_batch_size": 32, "max_wait_ms": 5.0, "kernel_backend": _backend()},
        "targets": {"ratio_to_base_at_5pct": TARGET_RATIO, "batching_gain": TARGET_BATCHING},
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", ".venv/bin/python"] + sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": _torch()},
        "note": "client and server share this machine's CPU cores (other work may have run at the same time): "
        "compare ratios within this run, not absolute numbers",
        "cells": cells,
    }


def _backend() -> str:
    """The kernel backend the server resolves from the same settings and environment."""
    from selora.server.settings import Settings

    return Settings.load().kernel_config().backend


def _torch() -> str:
    import torch

    return torch.__version__


def markdown(res: dict) -> str:
    lines = [
        f"# Serving benchmark: {res['model']}",
        "",
        f"{res['blocks']} blocks, {res['active_blocks_per_adapter']} active per adapter "
        f"({100 * res['active_fraction']:.1f} %), LoRA r={res['rank']}; one {res['image_size_sent']} px PNG per request; "
        f"closed loop, {res['seconds_per_cell']} s per cell; kernel backend {res['server']['kernel_backend']}.",
        "",
        f"Targets: throughput with adapters >= {res['targets']['ratio_to_base_at_5pct']}x the base model alone "
        f"(same concurrency); dynamic batching >= {res['targets']['batching_gain']}x the concurrency-1 throughput.",
        "",
        "| adapters | popularity | concurrency | images/s | p50 ms | p99 ms | x base (target 0.90) | x c=1 (target 3) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for x in res["cells"]:
        ratio = x.get("ratio_to_base", "")
        lines.append(f"| {x['adapters']} | {x['popularity']} | {x['concurrency']} | {x['images_per_s']} | {x['p50_ms']} | "
                     f"{x['p99_ms']} | {ratio} | {x['batching_gain']} |")
    lines += ["", f"Command: `{res['command']}`", "", f"Machine: {res['machine']}", "", f"Note: {res['note']}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_MODEL}, 3 s per cell (a few minutes on CPU)")
    p.add_argument("--model", default=None, help=f"{QUICK_MODEL} (default) or any selora serve model id")
    p.add_argument("--seconds", type=float, default=None, help="load duration of each cell")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--fraction", type=float, default=0.05, help="active blocks per adapter")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="output stem (default results/serve_<model>)")
    p.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--import-root", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_worker:
        return serve_quick(args)
    args.model = args.model or QUICK_MODEL
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    res = run_benchmark(args)
    stem = args.out or RESULTS / f"serve_{args.model.replace(':', '_').replace('/', '_')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
