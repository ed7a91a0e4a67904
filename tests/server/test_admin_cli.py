"""``selora keys`` and ``selora store``: the operator's side of the store."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.cli import main
from selora.runtime.store import AdapterStore, hash_key
from tests.helpers import image_b64, make_app, write_adapter


def _run(capsys, *argv) -> list[str]:
    assert main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_keys_create_list_revoke(tmp_path, capsys):
    store_dir = str(tmp_path / "s")
    out = _run(capsys, "keys", "--store", store_dir, "create", "--tenant", "acme", "--admin")
    key = out[-1]
    assert key.startswith("sk-selora-") and len(key) >= 10 + 43 and " " not in key
    store = AdapterStore(store_dir)
    assert store.authenticate(key).tenant == "acme" and store.authenticate(key).admin
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "s").glob("selora.db*"))
    assert key.encode() not in on_disk and hash_key(key) in on_disk  # only its hash is kept
    listed = _run(capsys, "keys", "--store", store_dir, "list")
    assert "acme" in listed[1] and "yes" in listed[1] and key not in "\n".join(listed)
    _run(capsys, "keys", "--store", store_dir, "revoke", "1")
    assert store.authenticate(key) is None and store.list_keys()[0]["revoked"] is not None
    with pytest.raises(SystemExit, match="no key with id 9"):
        main(["keys", "--store", store_dir, "revoke", "9"])
    for bad in ("shared", "a/b", "../x"):
        with pytest.raises(SystemExit):
            main(["keys", "--store", store_dir, "create", "--tenant", bad])


def test_store_quota_and_import(tmp_path, capsys, tiny_vit):
    store_dir = str(tmp_path / "s")
    out = _run(capsys, "store", "--store", store_dir, "quota", "acme", "--max-adapters", "3", "--max-mb", "1.5", "--rate", "5")
    assert out == ["tenant acme: adapters 3, bytes 1572864, requests/s 5.0, burst unlimited; using 0 adapters, 0 bytes"]
    out = _run(capsys, "store", "--store", store_dir, "quota", "acme", "--max-adapters", "none")
    assert out == ["tenant acme: adapters unlimited, bytes 1572864, requests/s 5.0, burst unlimited; using 0 adapters, 0 bytes"]
    with pytest.raises(SystemExit, match="rate must be above 0"):
        main(["store", "--store", store_dir, "quota", "acme", "--rate", "0"])
    for i, name in enumerate(["p", "q"]):
        write_adapter(tiny_vit, tmp_path / "root", name, active=list(tiny_vit.blocks)[i : i + 1], seed=i)
    (tmp_path / "root" / "junk").mkdir()
    out = _run(capsys, "store", "--store", store_dir, "import", str(tmp_path / "root"), "--tenant", "acme")
    assert out == ["imported 2 adapters into tenant acme: p, q"]
    assert [(e.tenant, e.name) for e in AdapterStore(store_dir).entries()] == [("acme", "p"), ("acme", "q")]
    assert _run(capsys, "store", "--store", store_dir, "quota", "acme")[0].endswith(
        f"using 2 adapters, {sum(e.bytes for e in AdapterStore(store_dir).entries())} bytes")
    listed = _run(capsys, "store", "--store", store_dir, "list")
    assert [line.split()[:3] for line in listed[1:]] == [["acme", "p", "1"], ["acme", "q", "2"]]


def test_a_running_server_serves_what_store_import_adds_without_a_restart(tmp_path, capsys, tiny_vit):
    root, more, blocks = tmp_path / "root", tmp_path / "more", list(tiny_vit.blocks)
    root.mkdir()
    with TestClient(make_app(tiny_vit, root)) as client:
        embed = lambda model: client.post("/v1/embeddings", json={"model": model, "input": [image_b64(0)]})  # noqa: E731
        assert embed("p").status_code == 404
        write_adapter(tiny_vit, more, "p", active=blocks[:2], seed=1)
        assert _run(capsys, "store", "--store", f"{root}.store", "import", str(more)) == ["imported 1 adapters into tenant default: p"]
        served = embed("p")
        assert served.status_code == 200 and "p" in [a["name"] for a in client.get("/v1/adapters").json()["data"]]
        files = {"config": (more / "p" / CONFIG_NAME).read_bytes(), "weights": (more / "p" / WEIGHTS_NAME).read_bytes()}
        assert client.post("/v1/adapters", data={"name": "q"}, files=files).status_code == 200
        assert embed("q").json()["data"] == served.json()["data"]  # the same bytes, through the API
        assert embed("p").json()["data"] != embed("base").json()["data"]


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    with pytest.raises(SystemExit, match="holds no API key.*--allow-unauthenticated"):
        main(["serve", "--model", "tiny-vit", "--host", "0.0.0.0", "--store", str(tmp_path)])
