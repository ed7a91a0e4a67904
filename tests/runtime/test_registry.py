import hashlib
import json
import os
import random

import pytest
import torch
from safetensors.torch import load as load_safetensors

from selora.adapters import AdapterError
from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.runtime import store as store_module
from selora.runtime.registry import (
    AdapterRegistry,
    AdapterTooLargeError,
    InvalidAdapterNameError,
    UnknownAdapterError,
    UnsafePathError,
    import_tree,
)
from selora.runtime.slots import DeviceSlotsFullError
from selora.runtime.store import AdapterStore
from tests.helpers import write_adapter


def _state(reg: AdapterRegistry):
    return (
        dict(reg.records),
        dict(reg.host.sizes),
        dict(reg.device.sizes),
        {k: (r.sparse is not None, r.device is not None) for k, r in reg.records.items()},
        reg.store.entries(),
        sorted(os.listdir(reg.store.blobs)),
    )


def _files(root, name):
    return (root / name / CONFIG_NAME).read_bytes(), (root / name / WEIGHTS_NAME).read_bytes()


@pytest.fixture
def three(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    root = tmp_path / "root"
    sizes = {n: write_adapter(tiny_vit, root, n, active=blocks[i : i + 2], seed=i).nbytes for i, n in enumerate(["x", "y", "z"])}
    return root, sizes


def _registry(tiny_vit, root, host_budget=1 << 20, device_budget=1 << 20, store=None, **kw):
    store = store or AdapterStore(root.parent / "store")
    import_tree(store, root, "default", tiny_vit.blocks)
    reg = AdapterRegistry(tiny_vit, store, host_budget, device_budget, import_root=root, **kw)
    reg.preload()
    return reg


def test_import_registers_every_valid_directory_and_skips_bad_ones(three, tiny_vit):
    root, _ = three
    (root / "broken").mkdir()
    (root / "broken" / CONFIG_NAME).write_text("{not json")
    (root / "broken" / WEIGHTS_NAME).write_bytes(b"")
    reg = _registry(tiny_vit, root)
    assert [r.address for r in reg.current()] == ["default/x", "default/y", "default/z"]
    assert [e.name for e in reg.store.entries()] == ["x", "y", "z"]


def test_host_cache_budget_evicts_lru_and_reloads_from_the_store(three, tiny_vit):
    root, sizes = three
    events = []
    reg = _registry(tiny_vit, root, host_budget=2 * sizes["x"], listener=lambda e, t: events.append((e, t)))
    assert [reg.get(f"default/{n}").sparse is not None for n in "xyz"] == [True, True, False]  # preload fills, never evicts
    record = reg.pin("default/z")  # reload on demand; evicts x (the LRU)
    assert record.sparse is not None and reg.get("default/x").sparse is None
    assert ("evict", "host") in events and events.count(("load", "host")) == 3
    reg.unpin(record)
    assert reg.host.nbytes <= reg.host.budget


def test_device_slots_evict_the_lru_unpinned_adapter_never_a_running_one(three, tiny_vit):
    root, _ = three  # x: vision.0.q+k, y: k+v, z: v+out, rank 4: one slot page per block
    reg = _registry(tiny_vit, root, device_budget=1)  # the smallest device: one page per block
    assert reg.slots.pages_per_block == 1 and reg.slots.buffers["blocks.0.attn.qkv"].pages == 3
    x, y, z = (reg.pin(f"default/{n}") for n in "xyz")
    (dev_x,) = reg.device_adapters([x])
    assert reg.device.nbytes == dev_x.nbytes == 2 * reg.slots.buffers["blocks.0.attn.qkv"].page_nbytes()
    with pytest.raises(DeviceSlotsFullError, match="in use"):  # y needs 2 of qkv's 3 pages; x's batch still reads them
        reg.device_adapters([y])
    assert x.device is dev_x and not dev_x.released and reg.slots.free_pages()["blocks.0.attn.qkv"] == 1
    reg.unpin(x)
    (dev_y,) = reg.device_adapters([y])  # x (unpinned, least recently used) gives its pages back
    assert x.device is None and dev_x.released and y.device is dev_y
    (dev_z,) = reg.device_adapters([z])  # qkv's last page and out's page: room without evicting
    assert y.device is dev_y and z.device is dev_z and reg.slots.free_pages()["blocks.0.attn.qkv"] == 0
    assert dict(reg.device.sizes) == {y.key: dev_y.nbytes, z.key: dev_z.nbytes}
    reg.unpin(y)
    reg.unpin(z)


def test_pinned_records_are_not_evicted(three, tiny_vit):
    root, sizes = three
    reg = _registry(tiny_vit, root, host_budget=sizes["x"])
    z = reg.pin("default/z")
    x = reg.pin("default/x")  # over budget while both are pinned: z stays
    assert z.sparse is not None and x.sparse is not None
    reg.unpin(x)
    reg.unpin(z)


def test_failed_put_leaves_registry_and_store_exactly_as_they_were(three, tiny_vit, tiny_clip):
    root, sizes = three
    reg = _registry(tiny_vit, root, host_budget=3 * sizes["x"])
    before = _state(reg)
    write_adapter(tiny_clip, root, "other_base", active=list(tiny_clip.blocks)[:2])
    with pytest.raises(AdapterError, match="base"):
        reg.import_dir("default", "x", "other_base")  # would replace x and need room: validated first
    config, _ = _files(root, "x")
    with pytest.raises(AdapterError, match="pickle"):
        reg.put("default", "new", config, b"\x80\x04pickle")
    with pytest.raises(AdapterError):
        reg.put("default", "x", b"{}", b"")
    write_adapter(tiny_vit, root, "big", active=list(tiny_vit.blocks)[:12])
    reg.host.budget = sizes["x"] * 5
    with pytest.raises(AdapterTooLargeError):
        reg.import_dir("default", "big", "big")
    reg.host.budget = 3 * sizes["x"]
    assert _state(reg) == before


@pytest.mark.parametrize("path", ["../x", "/etc", "x/../../x", ""])
def test_import_paths_stay_inside_the_root(three, tiny_vit, path):
    reg = _registry(tiny_vit, three[0])
    with pytest.raises(UnsafePathError):
        reg.import_dir("default", "n", path)


def test_symlink_escaping_the_root_is_refused(three, tiny_vit, tmp_path_factory):
    root, _ = three
    outside = tmp_path_factory.mktemp("outside")
    write_adapter(tiny_vit, outside, "evil", active=list(tiny_vit.blocks)[:1])
    os.symlink(outside / "evil", root / "link")
    os.mkdir(root / "half")
    os.symlink(outside / "evil" / CONFIG_NAME, root / "half" / CONFIG_NAME)
    os.symlink(outside / "evil" / WEIGHTS_NAME, root / "half" / WEIGHTS_NAME)
    reg = _registry(tiny_vit, root)
    for path in ("link", "half"):
        with pytest.raises(UnsafePathError):
            reg.import_dir("default", "n", path)
    assert [r.name for r in reg.current()] == ["x", "y", "z"]  # the links were not imported either


@pytest.mark.parametrize("name", ["", "base", "../x", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_names_are_validated(three, tiny_vit, name):
    reg = _registry(tiny_vit, three[0])
    with pytest.raises(InvalidAdapterNameError):
        reg.import_dir("default", name, "x")
    with pytest.raises(InvalidAdapterNameError):
        reg.put(name, "ok", *_files(three[0], "x"))


def test_replace_and_delete_keep_pinned_records_working(three, tiny_vit):
    root, _ = three
    reg = _registry(tiny_vit, root)
    old = reg.pin("default/x")
    reg.import_dir("default", "x", "y")  # replace x
    assert reg.get("default/x") is not old and reg.get("default/x").entry.version > old.entry.version
    (dev,) = reg.device_adapters([old])  # the in-flight request still has its own version
    assert dev.num_blocks == 2 and old.sparse is not None
    y = reg.pin("default/y")
    reg.delete("default", "y")
    assert reg.device_adapters([y])[0] is not None
    with pytest.raises(UnknownAdapterError):
        reg.get("default/y")
    reg.unpin(old)
    reg.unpin(y)
    assert old.sparse is None and old.key not in reg.host.sizes and y.key not in reg.device.sizes


def test_put_stores_one_content_addressed_blob_and_replaces_in_one_step(three, tiny_vit):
    root, _ = three
    reg = _registry(tiny_vit, root)
    config, weights = _files(root, "y")
    first = reg.put("t1", "fresh", config, weights)
    assert (reg.store.blobs / hashlib.sha256(weights).hexdigest()).read_bytes() == weights
    second = reg.put("t1", "fresh", *_files(root, "z"))
    assert second.entry.version > first.entry.version and second.entry.created == first.entry.created
    assert sorted(os.listdir(reg.store.blobs)) == sorted({e.sha256 for e in reg.store.entries()})  # y's kept: default/y
    reg.delete("t1", "fresh")
    reg.delete("default", "z")
    assert sorted(os.listdir(reg.store.blobs)) == sorted({e.sha256 for e in reg.store.entries()})


def test_alias_of_a_replaced_adapter_never_serves_the_new_bytes(three, tiny_vit):
    """The issue's scenario: load ``alias`` from ``lora1``'s directory, upload a new ``lora1``,
    evict everything: ``alias`` still serves (and describes) the old bytes."""
    root, sizes = three
    reg = _registry(tiny_vit, root, host_budget=sizes["x"], device_budget=sizes["x"])
    reg.import_dir("default", "alias", "x")
    alias_before = reg.get("default/alias").entry
    write_adapter(tiny_vit, root, "x", active=list(tiny_vit.blocks)[6:8], seed=42)  # a new lora1 on disk, same size
    reg.import_dir("default", "x", "x")
    for n in ("y", "z", "x", "y"):  # churn both caches
        r = reg.pin(f"default/{n}")
        reg.device_adapters([r])
        reg.unpin(r)
    alias = reg.pin("default/alias")
    (dev,) = reg.device_adapters([alias])
    assert alias.entry == alias_before and list(alias.sparse.blocks) == alias_before.info["active_blocks"]
    assert list(alias.sparse.blocks) != list(reg.get("default/x").entry.info["active_blocks"])
    reg.unpin(alias)


def _same_bytes(sparse, weights: bytes) -> bool:
    tensors = load_safetensors(weights)
    return set(sparse.tensors()) == set(tensors) and all(torch.equal(t, tensors[k]) for k, t in sparse.tensors().items())


def test_no_sequence_of_loads_replacements_and_evictions_serves_other_bytes(tmp_path, tiny_vit):
    """Random puts, replacements, deletions, pins and device loads under budgets of one or two
    adapters: every host copy served equals the bytes its (tenant, name, version) was committed
    with, and every device copy has its block count."""
    blocks = [b for b in tiny_vit.blocks if b.endswith((".q", ".k", ".v", ".out"))]  # one size: budgets count adapters
    rng = random.Random(0)
    variants = []
    for i in range(6):
        write_adapter(tiny_vit, tmp_path / "src", f"v{i}", active=rng.sample(blocks, 2), seed=i)
        variants.append(_files(tmp_path / "src", f"v{i}"))
    one = sum(t.numel() * 4 for t in load_safetensors(variants[0][1]).values())
    reg = AdapterRegistry(tiny_vit, AdapterStore(tmp_path / "store"), 2 * one, one)
    committed, checked = {}, 0  # (tenant, name, version) -> weights bytes
    for _ in range(80):
        tenant, name, action = rng.choice(["t1", "t2"]), rng.choice(["a", "b", "c"]), rng.random()
        if action < 0.35:
            config, weights = rng.choice(variants)
            committed[reg.put(tenant, name, config, weights).key] = weights
        elif action < 0.45 and (tenant, name) in reg.records:
            reg.delete(tenant, name)
        elif (tenant, name) in reg.records:
            record = reg.pin(f"{tenant}/{name}")
            (dev,) = reg.device_adapters([record])
            if record.sparse is not None:  # else its device copy stayed resident since it was checked
                assert _same_bytes(record.sparse, committed[record.key]) and dev.num_blocks == len(record.sparse.blocks)
                checked += 1
            reg.unpin(record)
    assert checked > 20 and reg.host.nbytes <= reg.host.budget and reg.device.nbytes <= reg.device.budget


def test_preload_skips_what_a_model_less_import_let_in(three, tiny_vit, caplog):
    """``selora store import`` loads no model: an adapter at a size this base cannot run, or
    larger than the host cache, is stored; the server then refuses to serve it, saying why."""
    root, sizes = three
    config = json.loads((root / "y" / CONFIG_NAME).read_text())
    (root / "y" / CONFIG_NAME).write_text(json.dumps(config | {"input_size": [33, 33]}))
    write_adapter(tiny_vit, root, "w", active=list(tiny_vit.blocks)[:6])  # three times x's blocks
    store = AdapterStore(root.parent / "store")
    assert import_tree(store, root, "default") == ["w", "x", "y", "z"]  # no table, no size check
    reg = AdapterRegistry(tiny_vit, store, host_budget=sizes["x"], device_budget=1 << 20)
    with caplog.at_level("WARNING"):
        assert reg.preload() == ["default/x", "default/z"]
    assert "default/y v3 is not served: trained at [33, 33] px" in caplog.text
    assert "default/w v1 is not served: it needs" in caplog.text


def test_commits_of_another_process_are_served_without_a_restart(three, tiny_vit, tiny_clip, tmp_path, caplog, monkeypatch):
    """``selora store import`` (or a second server) writes the store while this registry serves:
    the next lookup sees what it added, replaced or deleted; an adapter for another base stays
    out, with one warning; a lookup reads no manifest table, only the change log and the rows
    of the adapters that changed."""
    root, _ = three
    reg = _registry(tiny_vit, root)
    monkeypatch.setattr(reg.store, "entries", lambda: pytest.fail("read the whole table"))
    other = AdapterStore(reg.store.dir)  # its own SQLite connection, as another process has
    more = tmp_path / "more"
    blocks = list(tiny_vit.blocks)
    write_adapter(tiny_vit, more, "n", active=blocks[3:5], seed=7)
    write_adapter(tiny_vit, more, "x", active=blocks[5:7], seed=8)  # a new version of x
    old_x = reg.pin("default/x")  # a request holding the old version
    assert import_tree(other, more, "default") == ["n", "x"]
    assert reg.get("default/n").entry.sha256 == other.entry("default", "n").sha256
    new_x = reg.get("default/x")
    assert new_x.entry.version > old_x.entry.version and new_x.entry.sha256 == other.entry("default", "x").sha256
    assert old_x.sparse is not None  # the running request keeps its version until it unpins
    reg.unpin(old_x)
    assert old_x.sparse is None and old_x.key not in reg._by_key
    other.delete_adapter("default", "y")
    with pytest.raises(UnknownAdapterError):
        reg.pin("default/y")
    assert [r.address for r in reg.current()] == ["default/n", "default/x", "default/z"]
    clip = tmp_path / "clip"
    write_adapter(tiny_clip, clip, "c", active=list(tiny_clip.blocks)[:1])
    assert import_tree(other, clip, "default") == ["c"]  # no model loaded: stored
    with caplog.at_level("WARNING"):
        for _ in range(2):
            with pytest.raises(UnknownAdapterError):
                reg.get("default/c")
        write_adapter(tiny_vit, more, "m", active=blocks[1:2])
        assert import_tree(other, more, "default") == ["m", "n", "x"]  # c is not looked at again
        assert reg.get("default/m")
    assert caplog.text.count("default/c v") == 1 and "is for another base" in caplog.text
    assert reg.get("default/n") and reg.pin("default/z") and len(reg.current()) == 4
    write_adapter(tiny_clip, clip, "m", active=list(tiny_clip.blocks)[:1])
    assert import_tree(other, clip, "default") == ["c", "m"]  # m replaced by a version for another base
    with pytest.raises(UnknownAdapterError):  # its old version is not served on
        reg.get("default/m")
    assert [r.address for r in reg.current()] == ["default/n", "default/x", "default/z"]


def test_a_registry_behind_the_pruned_change_log_reads_the_whole_table(three, tiny_vit, tmp_path, monkeypatch):
    """Past ``CHANGE_LOG_ROWS`` the log forgets; a registry that fell further behind must still
    see every addition, replacement and deletion it missed."""
    monkeypatch.setattr(store_module, "CHANGE_LOG_ROWS", 2)
    root, _ = three
    reg = _registry(tiny_vit, root)
    other = AdapterStore(reg.store.dir)
    reads = []
    entries = reg.store.entries
    monkeypatch.setattr(reg.store, "entries", lambda: reads.append(1) or entries())
    x = reg.get("default/x")
    more = tmp_path / "more"
    write_adapter(tiny_vit, more, "n", active=list(tiny_vit.blocks)[3:5], seed=7)
    write_adapter(tiny_vit, more, "x", active=list(tiny_vit.blocks)[5:7], seed=8)
    import_tree(other, more, "default")
    other.delete_adapter("default", "y")  # three changes: the first is pruned
    assert [r.address for r in reg.current()] == ["default/n", "default/x", "default/z"] and reads == [1]
    assert reg.get("default/x").entry.version > x.entry.version
    other.delete_adapter("default", "z")  # within the log again: no table read
    assert [r.address for r in reg.current()] == ["default/n", "default/x"] and reads == [1]
