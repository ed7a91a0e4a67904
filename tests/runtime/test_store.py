"""The store across processes: blob removal never races another writer's blob-to-commit window;
the change log tells readers what changed."""

from __future__ import annotations

import threading

import pytest

from selora.runtime import store as store_module
from selora.runtime.store import AdapterQuotaError, AdapterStore

CONFIG, WEIGHTS = b'{"r": 4}', b"weights of the new version"


def paused_upload(store: AdapterStore, started: threading.Event, release: threading.Event) -> threading.Thread:
    """``store.put_adapter`` in a thread, stopped after its blob is written and before its commit."""
    check = store._check_quota

    def wait_then_check(*args):
        started.set()
        assert release.wait(10)
        return check(*args)

    store._check_quota = wait_then_check
    thread = threading.Thread(target=store.put_adapter, args=("acme", "m", CONFIG, WEIGHTS, {}))
    thread.start()
    return thread


def test_recover_waits_for_an_upload_between_its_blob_and_its_commit(tmp_path):
    """A replica that starts (and recovers) while another uploads must not delete the blob the
    upload is about to commit: before, it did, and the committed version had no weights."""
    writer, starting = AdapterStore(tmp_path), AdapterStore(tmp_path)  # two processes' connections
    started, release = threading.Event(), threading.Event()
    upload = paused_upload(writer, started, release)
    assert started.wait(10)
    assert len(list(writer.blobs.iterdir())) == 1  # the blob is on disk, no row references it yet
    recovered: list = []
    recovery = threading.Thread(target=lambda: recovered.append(starting.recover()))
    recovery.start()
    recovery.join(0.5)
    assert recovery.is_alive() and not recovered  # it waits for the writer's transaction
    release.set()
    upload.join(10)
    recovery.join(10)
    assert recovered == [(0, 0)]
    entry = starting.entry("acme", "m")
    assert starting.read_blob(entry.sha256) == WEIGHTS


def test_recover_still_removes_a_crashed_writers_debris(tmp_path):
    store = AdapterStore(tmp_path)
    store.put_adapter("acme", "m", CONFIG, WEIGHTS, {})
    (store.blobs / ".tmp-crashed").write_bytes(b"partial")
    (store.blobs / ("0" * 64)).write_bytes(b"a blob whose commit never came")
    assert AdapterStore(tmp_path).recover() == (1, 1)
    assert [p.name for p in store.blobs.iterdir()] == [store.entry("acme", "m").sha256]


def test_change_log_names_what_was_put_or_deleted_since_a_number(tmp_path, monkeypatch):
    writer, reader = AdapterStore(tmp_path), AdapterStore(tmp_path)
    assert reader.last_change() == 0 and reader.changes_since(0) == (0, [])
    writer.put_adapter("acme", "a", CONFIG, WEIGHTS, {})
    writer.put_adapter("acme", "b", CONFIG, b"other weights", {})
    writer.put_adapter("acme", "a", CONFIG, b"a second version", {})
    writer.delete_adapter("acme", "b")
    assert reader.last_change() == 4
    assert reader.changes_since(0) == (4, [("acme", "a"), ("acme", "b")])
    assert reader.changes_since(3) == (4, [("acme", "b")]) and reader.changes_since(4) == (4, [])
    assert reader.changes_since(None) == (4, None)  # never read: everything
    assert reader.changes_since(9) == (4, None)  # a store older than what the reader saw
    writer.set_quota("acme", max_adapters=1)
    with pytest.raises(AdapterQuotaError):
        writer.put_adapter("acme", "c", CONFIG, WEIGHTS, {})
    writer.delete_adapter("acme", "missing")
    assert reader.last_change() == 4  # refusals and no-ops log nothing
    monkeypatch.setattr(store_module, "CHANGE_LOG_ROWS", 2)
    writer.put_adapter("acme", "a", CONFIG, WEIGHTS, {})  # 5: rows up to 3 pruned
    assert reader.changes_since(3) == (5, [("acme", "b"), ("acme", "a")])
    assert reader.changes_since(2) == (5, None)  # its next change is gone
