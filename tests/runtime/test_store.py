"""The store across processes: blob removal never races another writer's blob-to-commit window."""

from __future__ import annotations

import threading

from selora.runtime.store import AdapterStore

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
