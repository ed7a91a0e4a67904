"""Scale-out on a real local Ray cluster: the ingress and 2 engine replicas of ``tiny-vit`` on one
shared store, driven over HTTP on 127.0.0.1 (``selora serve --ray`` builds the same application).

Expected answers come from a single-process engine on the same store and the same base weights
(``tiny-vit``'s random weights are seeded, so every process builds the same model)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.server.settings import Settings
from tests.helpers import image_b64, make_engine, write_adapter

ray = pytest.importorskip("ray", reason="selora[ray] is not installed")
from ray import serve  # noqa: E402

from selora.server.ray_serve import build_application  # noqa: E402

TENANTS = ("t1", "t2")
ADAPTERS = [(t, f"a{i}") for t in TENANTS for i in range(4)]  # 8 adapters of 2 tenants
IMAGES = [image_b64(i) for i in range(4)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(root, name) -> dict:
    return {"config": (root / name / CONFIG_NAME).read_bytes(), "weights": (root / name / WEIGHTS_NAME).read_bytes()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_vit):
    """The running application, its store, keys per tenant and adapter sources on disk."""
    tmp = tmp_path_factory.mktemp("ray")
    src, store_dir = tmp / "src", tmp / "store"
    blocks = list(tiny_vit.blocks)
    for i, (tenant, name) in enumerate(ADAPTERS):
        write_adapter(tiny_vit, src, f"{tenant}-{name}", "dora" if i % 3 == 2 else "lora", active=blocks[i % 9 : i % 9 + 3], seed=i)
    for v in range(3):  # versions of the adapter that the staleness test replaces
        write_adapter(tiny_vit, src, f"hot-v{v}", active=blocks[v : v + 4], seed=100 + v)
    local = make_engine(tiny_vit, tmp / "no-root", store=str(store_dir))  # the single-process reference
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(local.start(), loop).result()
    store = local.registry.store
    keys = {t: store.create_key(t)[1] for t in TENANTS}
    keys["admin"] = store.create_key("ops", admin=True)[1]

    port = _free_port()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = Settings(model="tiny-vit", store=str(store_dir), import_root=str(tmp / "no-root"), max_wait_ms=5.0, replicas=2)
    serve.run(build_application(settings, replicas=2), name="selora", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        for tenant, name in ADAPTERS:
            r = client.post("/v1/adapters", data={"name": name}, files=_files(src, f"{tenant}-{name}"), headers=_auth(keys[tenant]))
            assert r.status_code == 200, r.text
    try:
        yield {"url": url, "store": store, "keys": keys, "src": src, "local": local, "loop": loop}
    finally:
        serve.shutdown()
        ray.shutdown()
        asyncio.run_coroutine_threadsafe(local.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _expected(cluster, tenant: str, model: str, images: list[str]) -> np.ndarray:
    """The single-process answer, from the store's committed state."""
    engine = cluster["local"]
    address = "base" if model == "base" else f"{tenant}/{model}"  # engine.embed takes the store's latest version
    return asyncio.run_coroutine_threadsafe(engine.embed(address, "image", images, False), cluster["loop"]).result().vectors.numpy()


def _embed(client, key: str, model: str, images: list[str]) -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": model, "input": images, "normalize": False}, headers=_auth(key))


def _rows(response: httpx.Response) -> np.ndarray:
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_mixed_traffic_over_two_tenants_equals_the_single_process_answer(cluster):
    jobs = [(t, n, [IMAGES[(i + j) % 4] for j in range(1 + i % 2)]) for i, (t, n) in enumerate(ADAPTERS * 3)]
    jobs += [("t1", "base", IMAGES[:2])] * 4

    async def fire():
        async with httpx.AsyncClient(base_url=cluster["url"], timeout=60) as client:
            return await asyncio.gather(*[
                client.post("/v1/embeddings", json={"model": n, "input": imgs, "normalize": False}, headers=_auth(cluster["keys"][t]))
                for t, n, imgs in jobs
            ])

    responses = asyncio.run(fire())
    replicas = set()
    for (tenant, name, imgs), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        replicas.add(r.headers["x-selora-replica"])
        np.testing.assert_allclose(_rows(r), _expected(cluster, tenant, name, imgs), atol=1e-5, rtol=1e-5)
    assert len(replicas) == 2, f"traffic reached only {replicas}"


def test_other_tenants_adapter_is_a_404_through_ray(cluster):
    with httpx.Client(base_url=cluster["url"], timeout=60) as client:
        r = _embed(client, cluster["keys"]["t2"], "t1/a0", IMAGES[:1])
        assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found"
        assert "x-selora-replica" in r.headers
        assert client.get("/v1/adapters", headers={}).status_code == 401
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {cluster['keys']['t2']}"})
        assert models.status_code == 200 and models.json()["kernel_backend"] in ("torch", "triton")  # the resolved config


def test_requests_for_one_adapter_stay_on_the_replica_that_holds_it(cluster):
    counts: dict[str, dict[str, int]] = {}
    with httpx.Client(base_url=cluster["url"], timeout=60) as client:
        for tenant, name in ADAPTERS:  # each adapter loads on some replica: not counted
            assert _embed(client, cluster["keys"][tenant], name, IMAGES[:1]).status_code == 200
        time.sleep(2)  # a replica reports what it loaded to the routers asynchronously (via Serve's controller)
        for _ in range(5):
            for tenant, name in ADAPTERS:
                r = _embed(client, cluster["keys"][tenant], name, IMAGES[:1])
                assert r.status_code == 200
                by = counts.setdefault(f"{tenant}/{name}", {})
                by[r.headers["x-selora-replica"]] = by.get(r.headers["x-selora-replica"], 0) + 1
    on_home = sum(max(by.values()) for by in counts.values()) / sum(sum(by.values()) for by in counts.values())
    assert on_home >= 0.9, counts


def test_an_upload_is_never_answered_stale_by_any_replica(cluster):
    """100 trials: replace ``hot`` with another version, then embed with it at once."""
    src, key = cluster["src"], cluster["keys"]["t1"]
    expected = {}
    seen = set()
    with httpx.Client(base_url=cluster["url"], timeout=60) as client:
        for trial in range(100):
            version = f"hot-v{trial % 3}"
            r = client.post("/v1/adapters", data={"name": "hot"}, files=_files(src, version), headers=_auth(key))
            assert r.status_code == 200, r.text
            if version not in expected:
                expected[version] = _expected(cluster, "t1", "hot", IMAGES[:1])
            r = _embed(client, key, "hot", IMAGES[:1])
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-selora-replica"])
            np.testing.assert_allclose(_rows(r), expected[version], atol=1e-5, rtol=1e-5, err_msg=f"trial {trial}: stale answer")
    assert len(seen) == 2, f"every answer came from {seen}"


def test_a_deleted_adapter_is_a_404_from_every_replica(cluster):
    key = cluster["keys"]["t2"]
    with httpx.Client(base_url=cluster["url"], timeout=60) as client:
        for _ in range(4):  # the adapter is resident on its replica first
            assert _embed(client, key, "a3", IMAGES[:1]).status_code == 200
        assert client.delete("/v1/adapters/a3", headers=_auth(key)).status_code == 200
        answers = [_embed(client, key, "a3", IMAGES[:1]) for _ in range(10)]
    assert {r.status_code for r in answers} == {404}
    assert cluster["store"].entry("t2", "a3") is None


def test_a_replica_killed_during_traffic_gives_no_wrong_answer_and_no_hang(cluster):
    tenant, name = "t1", "a1"
    key, want = cluster["keys"][tenant], _expected(cluster, tenant, "a1", IMAGES[:1])
    results: list[tuple[int, np.ndarray | None, str | None]] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(base_url=cluster["url"], timeout=90) as client:
            while not stop.is_set():
                r = _embed(client, key, name, IMAGES[:1])
                results.append((r.status_code, _rows(r) if r.status_code == 200 else None, r.headers.get("retry-after")))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(2)
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SeloraEngine" in a["name"]]
    assert len(victims) == 2
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
    time.sleep(8)
    stop.set()
    for w in workers:
        w.join(timeout=120)
        assert not w.is_alive(), "a request hung"
    assert results, "no request completed"
    for status, rows, retry_after in results:
        assert status in (200, 503), status
        if status == 200:
            np.testing.assert_allclose(rows, want, atol=1e-5, rtol=1e-5)
        else:
            assert retry_after is not None
    with httpx.Client(base_url=cluster["url"], timeout=60) as client:  # the cluster serves on
        np.testing.assert_allclose(_rows(_embed(client, key, name, IMAGES[:1])), want, atol=1e-5, rtol=1e-5)


def test_deploy_configs_are_valid_ray_serve_configs_of_this_application():
    """deploy/serve.yaml and the RayService's serveConfigV2 pass Ray Serve's own schema, and their
    args build the application (without starting it)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from selora.server.ray_serve import app_builder

    deploy = __import__("pathlib").Path(__file__).resolve().parents[2] / "deploy"
    serve_cfg = yaml.safe_load((deploy / "serve.yaml").read_text())
    service = next(yaml.safe_load_all((deploy / "rayservice.yaml").read_text()))
    for cfg in (serve_cfg, yaml.safe_load(service["spec"]["serveConfigV2"])):
        app = ServeDeploySchema(**cfg).applications[0]
        assert app.import_path == "selora.server.ray_serve:app_builder"
        assert isinstance(app_builder({**app.args, "device": "cpu"}), serve.Application)
