"""Store benchmark: what API keys, tenants and the durable store cost a request and an upload.

1. Per request: authentication (the key's SQLite row, read on every request so that a
   revocation holds at once) plus resolving the caller's adapter reference in the registry,
   timed alone over many calls, with 1,000 keys in 100 tenants and 100 stored adapters; and
   next to it one-image embedding requests through the real app (in process, ASGI), so the
   share of a request is read in one run. Target: <= 0.2 ms per request.
2. Upload to servable: a 5 %-active r=16 LoRA adapter uploaded as multipart through the app
   (validate, blob written and fsynced, one committed transaction), then its first embedding
   request, against a request on an adapter already resident.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/store.py            # about a minute on CPU

Model: ``quick-vit`` of ``benchmarks/serve.py`` (timm ViT-S/16 at 64 px, 72 blocks, random
weights). Results: ``benchmarks/results/store.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from serve import QUICK_MODEL, images, quick_backbone

RESULTS = Path(__file__).parent / "results"
TARGET_MS = 0.2


def _adapter_files(backbone, seed: int, fraction: float = 0.05, r: int = 16) -> tuple[bytes, bytes]:
    from safetensors.torch import save as save_safetensors

    from selora.adapters.synthetic import random_adapter

    blocks = list(backbone.blocks)
    chosen = random.Random(seed).sample(blocks, max(1, round(fraction * len(blocks))))
    adapter = random_adapter(backbone.blocks, chosen, r, seed=seed, base_model=backbone.model_id)
    weights = save_safetensors({k: v.contiguous() for k, v in adapter.tensors().items()})
    return json.dumps(adapter.config_dict()).encode(), weights


def _ms(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"mean_ms": round(1e3 * statistics.fmean(xs), 4), "p50_ms": round(1e3 * xs[len(xs) // 2], 4),
            "p99_ms": round(1e3 * xs[int(0.99 * (len(xs) - 1))], 4)}


def run(args) -> dict:
    import httpx

    from selora.server.app import build_engine, create_app
    from selora.server.auth import Authenticate, usable
    from selora.server.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="selora-store-bench-"))
    (work / "empty").mkdir()
    backbone = quick_backbone()
    settings = Settings(model=QUICK_MODEL, store=str(work / "store"), import_root=str(work / "empty"), max_wait_ms=1.0)
    engine = build_engine(settings, backbone=backbone)
    app = create_app(settings, engine)
    store, registry = app.state.store, engine.registry
    keys = [store.create_key(f"tenant{i % 100:03d}")[1] for i in range(args.keys)]
    for i in range(args.adapters):
        registry.put(f"tenant{i % 100:03d}", f"ad{i:03d}", *_adapter_files(backbone, i))
    mine = min(7, args.adapters - 1)
    key, ref = keys[mine], f"ad{mine:03d}"  # a tenant's own adapter

    auth = Authenticate(None, store)
    header = f"Bearer {key}".encode()
    for _ in range(200):
        registry.get(usable(auth.identify(header), ref))
    per_call = []
    for _ in range(args.calls):
        t = time.perf_counter()
        registry.get(usable(auth.identify(header), ref))
        per_call.append(time.perf_counter() - t)

    image = images(1, 64)[0]
    h = {"Authorization": f"Bearer {key}"}

    async def through_app():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://selora", timeout=60) as client:
                async def embed(model):
                    t = time.perf_counter()
                    r = await client.post("/v1/embeddings", json={"model": model, "input": [image]}, headers=h)
                    r.raise_for_status()
                    return time.perf_counter() - t

                for _ in range(5):
                    await embed(ref)
                warm = [await embed(ref) for _ in range(args.requests)]
                uploads, first, resident = [], [], []
                for i in range(args.uploads):
                    config, weights = _adapter_files(backbone, 1000 + i)
                    t = time.perf_counter()
                    r = await client.post("/v1/adapters", data={"name": f"fresh{i}"}, headers=h,
                                          files={"config": io.BytesIO(config), "weights": io.BytesIO(weights)})
                    r.raise_for_status()
                    uploads.append(time.perf_counter() - t)
                    first.append(await embed(f"fresh{i}"))
                    resident.append(await embed(ref))
                return warm, uploads, first, resident, len(weights)

    warm, uploads, first, resident, upload_bytes = asyncio.run(through_app())
    auth_ms, request_ms = 1e3 * statistics.fmean(per_call), 1e3 * statistics.median(warm)
    return {
        "model": QUICK_MODEL,
        "keys": args.keys, "tenants": 100, "adapters_stored": args.adapters,
        "auth_and_lookup": {**_ms(per_call), "calls": args.calls, "target_ms": TARGET_MS},
        "embedding_request": {**_ms(warm), "requests": args.requests},
        "auth_share_of_request": round(auth_ms / request_ms, 5),
        "upload": {**_ms(uploads), "uploads": args.uploads, "weights_bytes": upload_bytes, "active_fraction": 0.05, "rank": 16},
        "first_request_after_upload": _ms(first),
        "request_on_resident_adapter": _ms(resident),
        "upload_to_servable_over_request": round(statistics.median(uploads) / statistics.median(resident), 3),
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", ".venv/bin/python"] + sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "note": "a CPU machine shared with other work running at the same time: read the ratios measured in this "
        "run, not the absolute times; upload times include fsyncs of this machine's disk",
    }


def catch_up(sizes: tuple[int, ...], rounds: int, threads: int = 4) -> list[dict]:
    """Per stored size: each request thread's first lookup after another connection's commit."""
    from selora.adapters.format import parse_adapter
    from selora.runtime.registry import adapter_info

    backbone = quick_backbone()
    files = [_adapter_files(backbone, seed) for seed in (0, 1)]
    info = [adapter_info(parse_adapter(c, w, backbone.blocks)) for c, w in files]
    out = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="selora-store-catchup-") as work:
            out.append(_catch_up_at(backbone, Path(work), size, files, info, rounds, threads))
    return out


def _catch_up_at(backbone, work: Path, size: int, files: list, info: list, rounds: int, threads: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from selora.runtime.registry import AdapterRegistry
    from selora.runtime.store import AdapterStore

    store = AdapterStore(work)
    for i in range(size):
        store.put_adapter(f"tenant{i % 100:03d}", f"ad{i:05d}", *files[0], info[0])
    registry = AdapterRegistry(backbone, store, host_budget=2 * info[0]["bytes"], device_budget=1 << 20)
    registry.preload()
    other = AdapterStore(work)  # another process's connection
    ref = "tenant000/ad00000"

    def timed_get():
        t = time.perf_counter()
        registry.get(ref)
        return time.perf_counter() - t

    pools = [ThreadPoolExecutor(1) for _ in range(threads)]
    for pool in pools:  # each thread's first lookup (connection opened) is not counted
        pool.submit(timed_get).result()
    first, total = [], []
    for r in range(rounds):
        other.put_adapter("tenant001", "churned", *files[r % 2], info[r % 2])
        times = [pool.submit(timed_get).result() for pool in pools]
        first.append(times[0])
        total.append(sum(times))
    for pool in pools:
        pool.shutdown()
    row = {"stored": size, "threads": threads, "rounds": rounds, "first_thread": _ms(first), "all_threads": _ms(total)}
    print(f"catch-up, {size} stored: first thread {row['first_thread']['p50_ms']} ms, "
          f"{threads} threads together {row['all_threads']['p50_ms']} ms (medians)", flush=True)
    return row


def markdown(res: dict) -> str:
    a, e, u = res["auth_and_lookup"], res["embedding_request"], res["upload"]
    ok = "meets" if a["mean_ms"] <= TARGET_MS else "misses"
    return "\n".join([
        f"# Store benchmark: {res['model']}",
        "",
        f"{res['keys']} keys in {res['tenants']} tenants, {res['adapters_stored']} adapters in the store.",
        "",
        "| what | mean ms | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        f"| auth (key row read) + adapter lookup, {a['calls']} calls | {a['mean_ms']} | {a['p50_ms']} | {a['p99_ms']} |",
        f"| one-image embedding request through the app | {e['mean_ms']} | {e['p50_ms']} | {e['p99_ms']} |",
        f"| upload of a 5 %-active r=16 adapter ({u['weights_bytes']} B), 200 after commit | {u['mean_ms']} | {u['p50_ms']} | {u['p99_ms']} |",
        f"| first request on the new adapter | {res['first_request_after_upload']['mean_ms']} | "
        f"{res['first_request_after_upload']['p50_ms']} | {res['first_request_after_upload']['p99_ms']} |",
        f"| request on a resident adapter (same moments) | {res['request_on_resident_adapter']['mean_ms']} | "
        f"{res['request_on_resident_adapter']['p50_ms']} | {res['request_on_resident_adapter']['p99_ms']} |",
        "",
        f"Auth + lookup: {a['mean_ms']} ms per request ({ok} the {TARGET_MS} ms target), "
        f"{100 * res['auth_share_of_request']:.3f} % of a one-image request on this model.",
        f"Upload to servable: {res['upload_to_servable_over_request']}x one request on a resident adapter (medians); "
        "the adapter serves from the response on (it is already in the host cache).",
        "",
        "Catch-up after another connection replaces one adapter (ms, median and p99 over "
        f"{res['catch_up'][0]['rounds']} commits): the first request thread's next lookup, and the "
        f"{res['catch_up'][0]['threads']} request threads' next lookups together.",
        "",
        "| adapters stored | first thread p50 | p99 | all threads p50 | p99 |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {c['stored']} | {c['first_thread']['p50_ms']} | {c['first_thread']['p99_ms']} | {c['all_threads']['p50_ms']} | "
          f"{c['all_threads']['p99_ms']} |" for c in res["catch_up"]],
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']}",
        "",
        f"Note: {res['note']}.",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--uploads", type=int, default=10)
    p.add_argument("--stored", type=int, nargs="+", default=[100, 1000, 10000], help="store sizes of the catch-up part")
    p.add_argument("--rounds", type=int, default=20, help="foreign commits per store size")
    args = p.parse_args()
    res = run(args) | {"catch_up": catch_up(tuple(args.stored), args.rounds)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "store.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
