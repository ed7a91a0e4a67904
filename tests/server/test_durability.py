"""What survives a restart: exactly the acknowledged state, also after a SIGKILL mid-upload."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers import image_b64, make_app, write_adapter


def _files(root, name):
    return {"config": (root / name / CONFIG_NAME).read_bytes(), "weights": (root / name / WEIGHTS_NAME).read_bytes()}


def _sha(files):
    return hashlib.sha256(files["weights"]).hexdigest()


def _served(client):
    return {a["name"]: (a["version"], a["content_hash"]) for a in client.get("/v1/adapters").json()["data"]}


def _no_debris(store_dir: Path) -> None:
    """Every blob is referenced by the manifest and matches its hash; no temp files."""
    with sqlite3.connect(store_dir / "selora.db") as db:
        referenced = {r[0] for r in db.execute("SELECT sha256 FROM adapters")}
    blobs = {p.name: p for p in (store_dir / "blobs").iterdir()}
    assert set(blobs) == referenced, sorted(blobs)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == name for name, p in blobs.items())


def test_restart_serves_exactly_the_acknowledged_state(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    src, root = tmp_path / "src", tmp_path / "root"
    for i, name in enumerate(["one", "two", "three"]):
        write_adapter(tiny_vit, src, name, active=blocks[2 * i : 2 * i + 2], seed=i)
    write_adapter(tiny_vit, root, "preexisting", active=blocks[7:9], seed=7)
    with TestClient(make_app(tiny_vit, root)) as client:
        for name in ("one", "two"):
            assert client.post("/v1/adapters", data={"name": name}, files=_files(src, name)).status_code == 200
        assert client.post("/v1/adapters", data={"name": "one"}, files=_files(src, "three")).status_code == 200  # replace
        assert client.delete("/v1/adapters/two").status_code == 200
        assert client.delete("/v1/adapters/preexisting").status_code == 200  # imported from the root, then deleted
        assert client.post("/v1/adapters", json={"name": "alias", "path": "preexisting"}).status_code == 200
        acknowledged = _served(client)
        embedding = client.post("/v1/embeddings", json={"model": "alias", "input": [image_b64(0)]}).json()
    assert acknowledged["one"][1] == _sha(_files(src, "three")) and set(acknowledged) == {"one", "alias"}
    with TestClient(make_app(tiny_vit, root)) as client:  # the same store and import root: a restart
        assert _served(client) == acknowledged  # no deleted adapter back, alias kept its name, no re-import
        again = client.post("/v1/embeddings", json={"model": "alias", "input": [image_b64(0)]}).json()
        assert again["data"] == embedding["data"]
    _no_debris(Path(f"{root}.store"))


def test_an_existing_adapter_root_is_imported_once_and_says_so(tmp_path, tiny_vit, caplog):
    root = tmp_path / "adapters"
    for i, name in enumerate(["p", "q"]):
        write_adapter(tiny_vit, root, name, active=list(tiny_vit.blocks)[i : i + 1], seed=i)
    (root / ".upload-q-crashed").mkdir()  # debris of the old layout is not an adapter
    with caplog.at_level(logging.WARNING, "selora.server"):
        with TestClient(make_app(tiny_vit, root)) as client:
            assert sorted(_served(client)) == ["p", "q"]
            client.delete("/v1/adapters/p").raise_for_status()
    assert "imported 2 adapters" in caplog.text and "once" in caplog.text
    caplog.clear()
    write_adapter(tiny_vit, root, "r", active=list(tiny_vit.blocks)[3:4])
    with caplog.at_level(logging.WARNING, "selora.server"):
        with TestClient(make_app(tiny_vit, root)) as client:
            assert sorted(_served(client)) == ["q"]
    assert "imported" not in caplog.text


class Zygote:
    """``forking_server.py``: every ``start()`` is a fresh server process on the same store."""

    def __init__(self, store: Path, root: Path):
        repo = str(Path(__file__).resolve().parents[2])  # the script imports tests.helpers, from any working directory
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        script = Path(__file__).with_name("forking_server.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(store), str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

        self.children: list[int] = []

    def start(self) -> tuple[int, str]:
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()
        pid, port = map(int, self.proc.stdout.readline().split())
        self.children.append(pid)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return pid, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.02)

    def close(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_sigkill_at_random_moments_of_an_upload_leaves_old_or_new_intact(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    src, root, store = tmp_path / "src", tmp_path / "root", tmp_path / "store"
    root.mkdir()
    versions = []
    for i in range(3):
        write_adapter(tiny_vit, src, f"v{i}", r=16, active=blocks[i:], seed=i)
        versions.append(_files(src, f"v{i}"))
    hashes = [_sha(v) for v in versions]
    rng = random.Random(11)
    zygote = Zygote(store, root)
    try:
        pid, url = zygote.start()
        started = time.perf_counter()
        assert httpx.post(f"{url}/v1/adapters", data={"name": "m"}, files=versions[0], timeout=30).status_code == 200
        upload_s = time.perf_counter() - started
        current, outcomes = hashes[0], []
        for round_ in range(20):
            new = (round_ + 1) % 3
            acked = []

            def upload():
                try:
                    acked.append(httpx.post(f"{url}/v1/adapters", data={"name": "m"}, files=versions[new], timeout=30).status_code)
                except httpx.TransportError:
                    pass

            t = threading.Thread(target=upload)
            t.start()
            time.sleep(rng.uniform(0, 2 * upload_s))
            os.kill(pid, signal.SIGKILL)
            t.join()
            pid, url = zygote.start()  # the restart: crash recovery, then the committed state
            got = httpx.get(f"{url}/v1/adapters/m")
            assert got.status_code == 200, (round_, got.text)
            served = got.json()["content_hash"]  # the restart read and hash-checked its blob to register it
            assert served in (current, hashes[new]) and (served == hashes[new] or acked != [200]), (round_, acked)
            _no_debris(store)
            outcomes.append(served == hashes[new])
            current = served
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "m", "input": [image_b64(0)]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == tiny_vit.embed_dim
    finally:
        zygote.close()
    print(f"20 kills: {sum(outcomes)} new version, {20 - sum(outcomes)} old version kept")
