"""Soak: minutes of mixed traffic on ``selora serve`` (a process on 127.0.0.1) while adapters are
replaced, deleted and re-added and a decode-cost attack runs.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/soak.py                  # ~4 minutes on CPU
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/soak.py --baseline-s 20 --attack-s 40

Base ``tiny-clip`` (images and texts). Normal clients send one image or one text under the base,
a stable adapter or one of two churned adapters. Phase 1 (baseline): normal traffic alone.
Phase 2 (attack): the same normal traffic while attack clients send requests of the largest
allowed images (the per-request pixel budget), pathological images (400,000 × 1, a bomb header)
are sent and timed, and a mutator uploads the other version of a churned adapter, deletes it
and re-adds it, over and over.

Reported: requests and status counts per phase, lost requests (no answer, or a 5xx), torn
results (an answer equal to neither version's reference embedding, referenced per version
before the soak), p50/p99 latency of normal requests per phase and their ratio, the refusal time
of pathological images, and the server's RSS over time. Targets: 0 lost, 0 torn, p99 under attack
≤ 3× baseline, pathological images refused within 50 ms, RSS flat within 5 % (from the first
fifth of the attack phase, once its decode buffers exist, to the end). Results: ``benchmarks/results/soak.{json,md}``.
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
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve import free_port, wait_ready  # noqa: E402  (sibling script: one way to start and wait for a server)

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny-clip"
STABLE, CHURNED = "stable", ("churn-a", "churn-b")
TEXTS = ["a photo of a cat", "a red car", "two dogs playing", "a bowl of soup"]
MAX_IMAGE_PIXELS = 4096 * 4096
TOLERANCE = 1e-4  # batch composition changes float summation order, not the version


def png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_declaring(w: int, h: int) -> str:
    raw = bytearray(base64.b64decode(png(np.zeros((1, 1, 3), np.uint8)).split(",", 1)[1]))
    raw[16:24] = struct.pack(">II", w, h)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return "data:image/png;base64," + base64.b64encode(bytes(raw)).decode()


def write_versions(root: Path, staging: Path) -> dict[str, list[dict]]:
    """A stable adapter under the root; two versions of each churned adapter in ``staging``
    (their file bytes, for uploads); the first version of each under the root too."""
    import selora.compat  # noqa: F401

    from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME, save_adapter
    from selora.adapters.synthetic import random_adapter
    from selora.models import load_backbone

    backbone = load_backbone(MODEL)
    blocks = list(backbone.blocks)
    rng = random.Random(0)

    def make(seed: int):
        return random_adapter(backbone.blocks, rng.sample(blocks, 6), 8, seed=seed, base_model=MODEL)

    save_adapter(make(1), root / STABLE)
    versions = {}
    for i, name in enumerate(CHURNED):
        versions[name] = []
        for v in range(2):
            d = save_adapter(make(10 + 2 * i + v), staging / f"{name}-v{v}")
            versions[name].append({n: (d / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)})
        save_adapter(make(10 + 2 * i), root / name)
    return versions


def start_server(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "SELORA_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)}
    cmd = [sys.executable, "-m", "selora.cli", "serve", "--model", MODEL, "--import-root", str(root), "--store", f"{root}.store",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return wait_ready(proc, port, 120)


class Soak:
    def __init__(self, client: httpx.AsyncClient, versions: dict, images: list[str]):
        self.client, self.versions, self.images = client, versions, images
        self.inputs = [("image", s) for s in images] + [("text", t) for t in TEXTS]
        self.refs: dict[tuple[str, int], list[np.ndarray]] = {}  # (model, input) -> embeddings of each version
        self.phase = "warmup"
        self.latency: dict[str, list[float]] = {"baseline": [], "attack": []}
        self.status: dict[str, Counter] = {}
        self.lost, self.torn, self.max_deviation = [], [], 0.0
        self.refusals_ms: list[float] = []
        self.mutations = Counter()

    async def embed(self, model: str, i: int) -> httpx.Response:
        modality, value = self.inputs[i]
        return await self.client.post("/v1/embeddings", json={"model": model, "input": [value], "modality": modality})

    async def upload(self, name: str, version: int) -> int:
        files = self.versions[name][version]
        r = await self.client.post("/v1/adapters", data={"name": name},
                                   files={"config": files["adapter_config.json"], "weights": files["adapter_model.safetensors"]})
        return r.status_code

    async def reference(self) -> None:
        """Each input's embedding under the base, the stable adapter and both versions of each churned one."""
        for model in ("base", STABLE):
            for i in range(len(self.inputs)):
                self.refs[(model, i)] = [np.array((await self.embed(model, i)).json()["data"][0]["embedding"])]
        for name in CHURNED:
            for version in (1, 0):  # ends on version 0, as the soak starts
                assert await self.upload(name, version) == 200
                for i in range(len(self.inputs)):
                    emb = np.array((await self.embed(name, i)).json()["data"][0]["embedding"])
                    self.refs.setdefault((name, i), []).append(emb)

    def count(self, kind: str, status) -> None:
        self.status.setdefault(f"{self.phase}/{kind}", Counter())[str(status)] += 1

    async def normal_client(self, stop: float, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            model, i = rng.choice(("base", STABLE) + CHURNED), rng.randrange(len(self.inputs))
            phase, started = self.phase, time.perf_counter()
            try:
                r = await self.embed(model, i)
            except httpx.HTTPError as e:
                self.lost.append(f"{model} {i}: {type(e).__name__}")
                continue
            elapsed = time.perf_counter() - started
            self.count("normal", r.status_code)
            if r.status_code >= 500:
                self.lost.append(f"{model} {i}: {r.status_code}")
            if r.status_code != 200:
                continue  # a 404 while a churned adapter is deleted is an answer, not a loss
            if phase in self.latency:
                self.latency[phase].append(elapsed)
            got = np.array(r.json()["data"][0]["embedding"])
            deviation = min(float(np.abs(got - ref).max()) for ref in self.refs[(model, i)])
            if deviation > TOLERANCE:
                self.torn.append(f"{model} input {i}: {deviation:.3g} from the nearest version")
            else:
                self.max_deviation = max(self.max_deviation, deviation)

    async def attack_client(self, stop: float, big: list[str]) -> None:
        while time.monotonic() < stop:
            try:
                r = await self.client.post("/v1/embeddings", json={"model": STABLE, "input": big}, timeout=120)
                self.count("attack", r.status_code)
                if r.status_code >= 500:
                    self.lost.append(f"attack: {r.status_code}")
            except httpx.HTTPError as e:
                self.lost.append(f"attack: {type(e).__name__}")

    async def pathological_client(self, stop: float, bad: list[str]) -> None:
        rng = random.Random(7)
        while time.monotonic() < stop:
            started = time.perf_counter()
            r = await self.client.post("/v1/embeddings", json={"model": STABLE, "input": [rng.choice(bad)]})
            self.refusals_ms.append((time.perf_counter() - started) * 1000)
            self.count("pathological", r.status_code)
            await asyncio.sleep(0.2)

    async def mutator(self, stop: float) -> None:
        rng, current = random.Random(3), {n: 0 for n in CHURNED}
        while time.monotonic() < stop:
            name = rng.choice(CHURNED)
            action = rng.choice(("replace", "replace", "delete-readd"))
            if action == "replace":
                current[name] = 1 - current[name]
                status = await self.upload(name, current[name])
            else:
                status = (await self.client.delete(f"/v1/adapters/{name}")).status_code
                self.mutations[f"delete {status}"] += 1
                await asyncio.sleep(0.2)
                status = await self.upload(name, current[name])
            self.mutations[f"{action} {status}"] += 1
            if status >= 500:
                self.lost.append(f"mutation {action}: {status}")
            await asyncio.sleep(0.3)


def pathological() -> list[str]:
    return [png(np.zeros((1, 400_000), np.uint8)), png(np.zeros((400_000, 1), np.uint8)), png_declaring(100_000, 100_000)]


async def run(args, port: int, versions: dict, rss: list) -> dict:
    rng = np.random.default_rng(0)
    images = [png(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(4)]
    side = int(MAX_IMAGE_PIXELS**0.5)
    big = [png(np.full((side, side, 3), 40 * k, np.uint8)) for k in range(4)]  # the per-request pixel budget, each costly to decode
    bad = pathological()
    limits = httpx.Limits(max_connections=args.clients + args.attackers + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as client:
        soak = Soak(client, versions, images)
        await soak.reference()
        stop = time.monotonic() + 5
        soak.phase = "warmup"
        await asyncio.gather(*(soak.normal_client(stop, s) for s in range(args.clients)))
        soak.phase = "baseline"
        stop = time.monotonic() + args.baseline_s
        await asyncio.gather(*(soak.normal_client(stop, s) for s in range(args.clients)))
        soak.phase = "attack"
        rss.append(time.monotonic() + args.attack_s / 5)  # RSS is compared from here (the attack's buffers allocated) to the end
        stop = time.monotonic() + args.attack_s
        await asyncio.gather(
            *(soak.normal_client(stop, 100 + s) for s in range(args.clients)),
            *(soak.attack_client(stop, big) for _ in range(args.attackers)),
            soak.pathological_client(stop, bad),
            soak.mutator(stop),
        )
        return {"soak": soak}


def gate_refusal_ms(bad: list[str]) -> float:
    """The slowest of 20 refusals of each pathological image by the image gate itself (in this process)."""
    from selora.runtime.inputs import ImageTooLargeError, Limits, open_images

    worst = 0.0
    for image in bad * 20:
        started = time.perf_counter()
        try:
            open_images([image], Limits(max_image_pixels=MAX_IMAGE_PIXELS))
        except ImageTooLargeError:
            worst = max(worst, (time.perf_counter() - started) * 1000)
        else:
            raise AssertionError("a pathological image passed the gate")
    return worst


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-s", type=float, default=60)
    parser.add_argument("--attack-s", type=float, default=150)
    parser.add_argument("--clients", type=int, default=4, help="normal clients")
    parser.add_argument("--attackers", type=int, default=2, help="clients sending the largest allowed images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        root, staging = Path(tmp) / "root", Path(tmp) / "staging"
        versions = write_versions(root, staging)
        proc = start_server(root, port)
        server = psutil.Process(proc.pid)
        samples: list[tuple[float, int]] = []
        marks: list = []

        async def sample_rss(done: asyncio.Event):
            while not done.is_set():
                samples.append((time.monotonic(), server.memory_info().rss))
                await asyncio.sleep(1.0)

        async def both():
            done = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(done))
            try:
                return await run(args, port, versions, marks)
            finally:
                done.set()
                await sampler

        started = time.monotonic()
        try:
            soak = asyncio.run(both())["soak"]
        finally:
            proc.terminate()
            proc.wait(30)
    gate_ms = gate_refusal_ms(pathological())
    steady_from = marks[0]
    steady = [r for t, r in samples if t >= steady_from]
    head, tail = np.median(steady[:10]), np.median(steady[-10:])
    base_p99, attack_p99 = percentile(soak.latency["baseline"], 99), percentile(soak.latency["attack"], 99)
    result = {
        "model": MODEL,
        "args": vars(args),
        "seconds": round(time.monotonic() - started, 1),
        "status": {k: dict(v) for k, v in soak.status.items()},
        "requests": sum(sum(v.values()) for v in soak.status.values()),
        "lost": len(soak.lost), "lost_examples": soak.lost[:10],
        "torn": len(soak.torn), "torn_examples": soak.torn[:10], "max_deviation_within_version": soak.max_deviation,
        "latency_ms": {p: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)} for p, v in soak.latency.items()},
        "p99_attack_over_baseline": attack_p99 / base_p99,
        "gate_refusal_ms_max": gate_ms,
        "pathological_refusal_ms": {"n": len(soak.refusals_ms), "p50": float(np.median(soak.refusals_ms)) if soak.refusals_ms else None,
                                    "max": max(soak.refusals_ms, default=None)},
        "mutations": dict(soak.mutations),
        "rss_mb": {"attack_steady": head / 2**20, "end": tail / 2**20, "change": (tail - head) / head,
                   "window_min": min(steady) / 2**20, "window_max": max(steady) / 2**20,
                   "samples": [[round(t - samples[0][0], 1), round(r / 2**20, 1)] for t, r in samples]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "shared": "2 cores shared with other engineers' test runs: ratios within this run only"},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1))
    lat = result["latency_ms"]
    ref = result["pathological_refusal_ms"]
    lines = [
        "# Soak: mixed traffic, adapter churn and a decode-cost attack",
        "",
        f"Base {MODEL}; {args.clients} normal clients (one image or text each, under the base, a stable adapter or two churned "
        f"adapters); baseline {args.baseline_s:.0f} s, then {args.attack_s:.0f} s with {args.attackers} attack clients sending "
        f"4 images of {int(MAX_IMAGE_PIXELS**0.5)}² pixels per request (the per-request pixel budget), pathological images "
        "every 0.2 s, and a mutator replacing, deleting and re-adding the churned adapters.",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| requests | {result['requests']} | |",
        f"| lost (no answer or 5xx) | {result['lost']} | 0 |",
        f"| torn (equal to neither version) | {result['torn']} | 0 |",
        f"| normal p50 / p99 ms, baseline | {lat['baseline']['p50']:.1f} / {lat['baseline']['p99']:.1f} (n={lat['baseline']['n']}) | |",
        f"| normal p50 / p99 ms, under attack | {lat['attack']['p50']:.1f} / {lat['attack']['p99']:.1f} (n={lat['attack']['n']}) | |",
        f"| p99 under attack / baseline | {result['p99_attack_over_baseline']:.2f} | ≤ 3 |",
        f"| pathological image refusal ms by the image gate, worst of 60 | {gate_ms:.2f} | ≤ 50 |",
        f"| pathological image refusal ms, median / max, HTTP round trip under attack | {ref['p50']:.1f} / {ref['max']:.1f} (n={ref['n']}) | |",
        f"| server RSS MB, attack phase after its first fifth → end | {result['rss_mb']['attack_steady']:.1f} → {result['rss_mb']['end']:.1f} "
        f"({100 * result['rss_mb']['change']:+.1f} %; all samples from there on {result['rss_mb']['window_min']:.0f}–"
        f"{result['rss_mb']['window_max']:.0f}) | within ±5 % |",
        "",
        f"Statuses: {json.dumps(result['status'])}",
        "",
        f"Mutations: {json.dumps(result['mutations'])}",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python benchmarks/soak.py "
        f"--baseline-s {args.baseline_s:g} --attack-s {args.attack_s:g} --clients {args.clients} --attackers {args.attackers}`",
        "",
        f"Machine: {result['machine']}.",
    ]
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
