"""Tenants, keys, isolation, quotas, rate limits and the browser Origin gate, on the real app."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.server.metrics import MAX_TENANT_LABELS, Metrics
from tests.helpers import image_b64, make_app, write_adapter

HEAD = ["cat", "dog"]


def _files(root, name):
    return {"config": (root / name / CONFIG_NAME).read_bytes(), "weights": (root / name / WEIGHTS_NAME).read_bytes()}


@pytest.fixture
def world(tmp_path, tiny_vit):
    """Tenants t1 (adapter ``a``) and t2 (adapter ``b``), a shared adapter ``s``, an admin of
    tenant ``ops``, and a revoked key of t1."""
    blocks = list(tiny_vit.blocks)
    src = tmp_path / "src"
    for i, name in enumerate(["a", "b", "s", "new"]):
        write_adapter(tiny_vit, src, name, active=blocks[2 * i : 2 * i + 2], seed=i, head_classes=HEAD)
    root = tmp_path / "empty-root"
    root.mkdir()
    app = make_app(tiny_vit, root)
    store = app.state.store
    keys = {t: store.create_key(t)[1] for t in ("t1", "t2")}
    keys["admin"] = store.create_key("ops", admin=True)[1]
    revoked_id, keys["revoked"] = store.create_key("t1")
    store.revoke_key(revoked_id)
    with TestClient(app) as client:
        for tenant, name in (("t1", "a"), ("t2", "b"), ("shared", "s")):
            r = client.post("/v1/adapters", data={"name": f"{tenant}/{name}"}, files=_files(src, name), headers=_auth(keys["admin"]))
            assert r.status_code == 200, r.text
        yield client, store, keys, src


def _auth(key):
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def _snapshot(store):
    return [(e.tenant, e.name, e.version, e.sha256) for e in store.entries()], sorted(os.listdir(store.blobs))


def _do(client, op, ref, key, src):
    h = _auth(key)
    if op == "get":
        return client.get(f"/v1/adapters/{ref}", headers=h)
    if op == "embed":
        return client.post("/v1/embeddings", json={"model": ref, "input": [image_b64(0)]}, headers=h)
    if op == "classify":
        return client.post("/v1/classify", json={"model": ref, "input": [image_b64(0)], "labels": None}, headers=h)
    if op == "upload":  # a new name in the target's namespace
        return client.post("/v1/adapters", data={"name": ref + "-new"}, files=_files(src, "new"), headers=h)
    if op == "replace":
        return client.post("/v1/adapters", data={"name": ref}, files=_files(src, "new"), headers=h)
    return client.delete(f"/v1/adapters/{ref}", headers=h)


OPS = ("get", "embed", "classify", "upload", "replace", "delete")
ALL_OK = dict.fromkeys(OPS, 200)
# caller -> target -> (how the caller writes it, expected status per op)
MATRIX = {
    "t1": {
        "own": ("a", ALL_OK),
        "own as t1/a": ("t1/a", ALL_OK),
        "another's": ("t2/b", dict.fromkeys(OPS, 404)),
        "shared": ("shared/s", {"get": 200, "embed": 200, "classify": 200, "upload": 403, "replace": 403, "delete": 403}),
    },
    "admin": {"t1's": ("t1/a", ALL_OK), "t2's": ("t2/b", ALL_OK), "shared": ("shared/s", ALL_OK)},
    "none": {t: (ref, dict.fromkeys(OPS, 401)) for t, ref in (("own", "a"), ("another's", "t2/b"), ("shared", "shared/s"))},
    "revoked": {t: (ref, dict.fromkeys(OPS, 401)) for t, ref in (("own", "a"), ("another's", "t2/b"), ("shared", "shared/s"))},
}


def test_isolation_matrix(world):
    client, store, keys, src = world
    owner = {"a": "t1", "t1/a": "t1", "t2/b": "t2", "shared/s": "shared"}
    wrong = []
    for caller, targets in MATRIX.items():
        for target, (ref, expected) in targets.items():
            for op in OPS:
                before = _snapshot(store)
                r = _do(client, op, ref, keys.get(caller), src)
                if r.status_code != expected[op]:
                    wrong.append((caller, target, op, r.status_code, r.text[:120]))
                    continue
                if r.status_code != 200:
                    assert _snapshot(store) == before, (caller, target, op)  # a refusal changes nothing
                    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"type", "message"}
                elif op in ("upload", "replace", "delete"):  # put the world back for the next cell
                    tenant, name = owner[ref], ref.rpartition("/")[2]
                    if op == "upload":
                        assert client.delete(f"/v1/adapters/{tenant}/{name}-new", headers=_auth(keys["admin"])).status_code == 200
                    else:
                        client.post("/v1/adapters", data={"name": f"{tenant}/{name}"}, files=_files(src, name),
                                    headers=_auth(keys["admin"])).raise_for_status()
    assert wrong == []


def test_another_tenants_adapter_is_indistinguishable_from_an_absent_one(world):
    client, _, keys, _ = world
    h = _auth(keys["t1"])
    others = [client.get(f"/v1/adapters/{ref}", headers=h) for ref in ("t2/b", "t3/b", "b", "nobody/b")]
    assert {r.status_code for r in others} == {404} and len({r.text for r in others}) == 1
    embed = [client.post("/v1/embeddings", json={"model": ref, "input": [image_b64(0)]}, headers=h) for ref in ("t2/b", "b")]
    assert embed[0].text == embed[1].text and "t2" not in embed[0].text
    delete = [client.delete(f"/v1/adapters/{ref}", headers=h) for ref in ("t2/b", "t2/zz")]
    assert [r.status_code for r in delete] == [404, 404]


def test_listing_shows_own_and_shared_only_admin_sees_all(world):
    client, _, keys, _ = world
    names = lambda key, path="/v1/adapters": [a["name"] for a in client.get(path, headers=_auth(key)).json()["data"]]  # noqa: E731
    assert names(keys["t1"]) == ["shared/s", "a"]
    assert names(keys["t2"]) == ["shared/s", "b"]
    assert names(keys["admin"]) == ["shared/s", "t1/a", "t2/b"]
    assert [m["id"] for m in client.get("/v1/models", headers=_auth(keys["t1"])).json()["data"]] == ["base", "shared/s", "a"]
    info = client.get("/v1/adapters/a", headers=_auth(keys["t1"])).json()
    assert info["tenant"] == "t1" and info["version"] > 0 and len(info["content_hash"]) == 64


def test_open_paths_metrics_and_json_import_need_the_right_key(world):
    client, _, keys, _ = world
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    for path in ("/v1/models", "/v1/adapters", "/openapi.json", "/docs", "/metrics"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/metrics", headers=_auth(keys["t1"])).status_code == 403
    metrics = client.get("/metrics", headers=_auth(keys["admin"])).text
    assert 'selora_tenant_requests_total{tenant="t1"}' in metrics and 'selora_tenant_adapters{tenant="t2"} 1.0' in metrics
    assert 'selora_tenant_adapters{tenant="shared"} 1.0' in metrics and 'selora_tenant_stored_bytes{tenant="t1"}' in metrics
    r = client.post("/v1/adapters", json={"name": "x", "path": "a"}, headers=_auth(keys["t1"]))
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    assert client.get("/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    spec = client.get("/openapi.json", headers=_auth(keys["t1"])).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/embeddings"]["post"]["security"] == [{"HTTPBearer": []}]
    assert client.get("/v1/models", headers=_auth(keys["t1"] + "x")).status_code == 401


def test_revocation_holds_from_the_next_request(world):
    client, store, _, _ = world
    key_id, key = store.create_key("t1")
    assert client.get("/v1/adapters", headers=_auth(key)).status_code == 200
    store.revoke_key(key_id)
    r = client.get("/v1/adapters", headers=_auth(key))
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid or revoked API key"


def test_quotas_refuse_with_a_typed_error_and_store_nothing(world):
    client, store, keys, src = world
    h = _auth(keys["t1"])
    store.set_quota("t1", max_adapters=1)
    before = _snapshot(store)
    r = client.post("/v1/adapters", data={"name": "second"}, files=_files(src, "new"), headers=h)
    assert (r.status_code, r.json()["error"]["type"]) == (403, "adapter_quota_exceeded") and _snapshot(store) == before
    assert client.post("/v1/adapters", data={"name": "a"}, files=_files(src, "new"), headers=h).status_code == 200  # replacing fits
    store.set_quota("t1", max_adapters=None, max_bytes=100)
    before = _snapshot(store)
    r = client.post("/v1/adapters", data={"name": "second"}, files=_files(src, "new"), headers=h)
    assert (r.status_code, r.json()["error"]["type"]) == (403, "storage_quota_exceeded") and _snapshot(store) == before
    assert client.post("/v1/adapters", data={"name": "t2/x"}, files=_files(src, "new"), headers=h).status_code == 404


def test_rate_limit_is_a_token_bucket_per_tenant(world):
    client, store, keys, _ = world
    store.set_quota("t1", rate_per_s=0.5, burst=2)
    codes = [client.get("/v1/adapters", headers=_auth(keys["t1"])) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert codes[2].headers["retry-after"] == "2" and codes[2].json()["error"]["type"] == "rate_limited"
    assert client.get("/v1/adapters", headers=_auth(keys["t2"])).status_code == 200  # another tenant's bucket


def test_foreign_origins_are_refused_before_anything_changes(tmp_path, tiny_vit):
    src = tmp_path / "src"
    write_adapter(tiny_vit, src, "a", active=list(tiny_vit.blocks)[:2])
    (tmp_path / "root").mkdir()
    app = make_app(tiny_vit, tmp_path / "root", cors_origins="https://app.example, http://localhost:3000/")
    with TestClient(app) as client:
        before = _snapshot(app.state.store)
        evil = {"Origin": "https://evil.example"}
        refused = [
            client.post("/v1/adapters", data={"name": "a"}, files=_files(src, "a"), headers=evil),  # a form: no preflight
            client.post("/v1/adapters", content=b'{"name": "a", "path": "a"}', headers={**evil, "content-type": "text/plain"}),
            client.delete("/v1/adapters/a", headers=evil),
            client.get("/v1/adapters", headers={"Origin": "null"}),
        ]
        assert [(r.status_code, r.json()["error"]["type"]) for r in refused] == [(403, "origin_not_allowed")] * 4
        assert _snapshot(app.state.store) == before and before[0] == []
        pre = client.options("/v1/adapters", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        ok = client.post("/v1/adapters", data={"name": "a"}, files=_files(src, "a"), headers={"Origin": "http://localhost:3000"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert client.get("/v1/adapters").status_code == 200  # no Origin: not a browser


def test_tenant_metric_labels_are_bounded():
    metrics = Metrics()
    for i in range(MAX_TENANT_LABELS + 10):
        metrics.on_request(f"t{i}")
    metrics.on_request("t0")
    text = metrics.render().decode()
    assert text.count("selora_tenant_requests_total{") == MAX_TENANT_LABELS + 1
    assert 'selora_tenant_requests_total{tenant="other"} 10.0' in text and 'tenant="t0"} 2.0' in text
