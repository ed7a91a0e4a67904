"""/metrics as operators route by: requests by route, status and adapter (bounded), cache hits
and misses per tier, and running/waiting requests per adapter in vLLM's lora_requests_info shape."""

import asyncio
import re
import threading
import time

from tests.helpers import image_b64, make_app, run_with_client


def _value(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def test_request_counts_cache_lookups_and_lora_requests_info(vit_root, tiny_vit):
    app = make_app(tiny_vit, vit_root)

    async def scenario(client):
        engine = app.state.engine
        body = lambda model: {"model": model, "input": [image_b64(0)]}  # noqa: E731
        for model in ("a1", "a1", "base", "nope", "nope-2"):
            await client.post("/v1/embeddings", json=body(model))
        await client.post("/v1/embeddings", json={"model": "a1", "input": ["%%%"]})
        busy = threading.Event()  # hold the forward thread: the next requests wait in the queue
        engine._forward_pool.submit(busy.wait)
        held = [asyncio.create_task(client.post("/v1/embeddings", json=body(m))) for m in ("a1", "headed", "base")]
        deadline = time.monotonic() + 30
        while sum(engine.requests_by_adapter()[1].values()) + len(engine._running) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        during = (await client.get("/metrics")).text
        busy.set()
        await asyncio.gather(*held)
        return during, (await client.get("/metrics")).text

    during, after = run_with_client(app, scenario)
    route = "/v1/embeddings"
    assert _value(after, "selora_requests_total", adapter="default/a1", route=route, status="200") == 3
    assert _value(after, "selora_requests_total", adapter="default/a1", route=route, status="400") == 1
    assert _value(after, "selora_requests_total", adapter="unknown", route=route, status="404") == 2  # names never become labels
    assert _value(after, "selora_requests_total", adapter="base", route=route, status="200") == 2
    assert _value(after, "selora_adapter_cache_lookups_total", tier="device", result="miss") == 2  # a1, headed: first use
    assert _value(after, "selora_adapter_cache_lookups_total", tier="device", result="hit") >= 2
    assert _value(after, "selora_adapter_cache_lookups_total", tier="host", result="hit") >= 2
    info = re.search(r"selora_lora_requests_info\{(.*)\} \S+", during).group(1)
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    in_flight = set(filter(None, (labels["running_lora_adapters"] + "," + labels["waiting_lora_adapters"]).split(",")))
    assert in_flight == {"default/a1", "base", "default/headed"} and labels["max_lora"] == "32"
    idle = dict(re.findall(r'(\w+)="([^"]*)"', re.search(r"selora_lora_requests_info\{(.*)\} \S+", after).group(1)))
    assert idle["running_lora_adapters"] == idle["waiting_lora_adapters"] == ""
