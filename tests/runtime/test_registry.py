import os

import pytest

from selora.adapters import AdapterError
from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from selora.runtime.registry import (
    AdapterRegistry,
    AdapterTooLargeError,
    InvalidAdapterNameError,
    UnknownAdapterError,
    UnsafePathError,
)
from tests.helpers import write_adapter


def _state(reg: AdapterRegistry):
    return (
        {n: reg.records[n] for n in reg.records},
        dict(reg.host.sizes),
        dict(reg.device.sizes),
        {n: (r.sparse is not None, r.device is not None) for n, r in reg.records.items()},
    )


@pytest.fixture
def three(tmp_path, tiny_vit):
    blocks = list(tiny_vit.blocks)
    sizes = {n: write_adapter(tiny_vit, tmp_path, n, active=blocks[i : i + 2], seed=i).nbytes for i, n in enumerate(["x", "y", "z"])}
    return tmp_path, sizes


def test_preload_registers_every_valid_directory_and_skips_bad_ones(three, tiny_vit):
    root, _ = three
    (root / "broken").mkdir()
    (root / "broken" / CONFIG_NAME).write_text("{not json")
    (root / "broken" / WEIGHTS_NAME).write_bytes(b"")
    reg = AdapterRegistry(tiny_vit, root, 1 << 20, 1 << 20)
    assert reg.preload() == ["x", "y", "z"]
    assert reg.names() == ["x", "y", "z"]


def test_host_cache_budget_evicts_lru_and_reloads_from_disk(three, tiny_vit):
    root, sizes = three
    events = []
    reg = AdapterRegistry(tiny_vit, root, host_budget=2 * sizes["x"], device_budget=1 << 20, listener=lambda e, t: events.append((e, t)))
    reg.preload()
    assert [reg.records[n].sparse is not None for n in "xyz"] == [False, True, True]  # x was least recently used
    assert reg.host.nbytes <= reg.host.budget
    record = reg.pin("x")  # reload on demand; evicts y (now the LRU)
    assert record.sparse is not None and reg.records["y"].sparse is None
    assert ("evict", "host") in events and events.count(("load", "host")) == 4
    reg.unpin(record)


def test_device_cache_budget_counts_active_blocks_and_evicts_lru(three, tiny_vit):
    root, sizes = three
    reg = AdapterRegistry(tiny_vit, root, 1 << 20, device_budget=2 * sizes["x"])
    reg.preload()
    recs = [reg.pin(n) for n in "xyz"]
    reg.device_adapters(recs[:2])
    assert reg.device.nbytes == 2 * sizes["x"]  # fp32 device copy = the stored active blocks
    for r in recs:
        reg.unpin(r)
    z = reg.pin("z")
    (dev,) = reg.device_adapters([z])
    assert reg.records["x"].device is None and reg.records["y"].device is not None and z.device is dev
    reg.unpin(z)


def test_pinned_records_are_not_evicted(three, tiny_vit):
    root, sizes = three
    reg = AdapterRegistry(tiny_vit, root, host_budget=sizes["x"], device_budget=1 << 20)
    reg.preload()
    z = reg.pin("z")
    x = reg.pin("x")  # over budget while both are pinned: z stays
    assert z.sparse is not None and x.sparse is not None
    reg.unpin(x)
    reg.unpin(z)


def test_failed_load_leaves_registry_exactly_as_it_was(three, tiny_vit, tiny_clip):
    root, sizes = three
    reg = AdapterRegistry(tiny_vit, root, host_budget=3 * sizes["x"], device_budget=1 << 20)
    reg.preload()
    before = _state(reg)
    write_adapter(tiny_clip, root, "other_base", active=list(tiny_clip.blocks)[:2])
    with pytest.raises(AdapterError, match="base"):
        reg.load("x", "other_base")  # would replace x and need room: validated first
    (root / "bad").mkdir()
    (root / "bad" / CONFIG_NAME).write_bytes((root / "x" / CONFIG_NAME).read_bytes())
    (root / "bad" / WEIGHTS_NAME).write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match="pickle"):
        reg.load("new", "bad")
    with pytest.raises(AdapterError):
        reg.upload("x", b"{}", b"")
    assert _state(reg) == before
    assert (root / "x" / WEIGHTS_NAME).is_file() and not (root / "new").exists()


def test_too_large_adapter_is_refused_without_eviction(three, tiny_vit):
    root, sizes = three
    reg = AdapterRegistry(tiny_vit, root, host_budget=sizes["x"] + 1, device_budget=1 << 20)
    reg.preload()
    before = _state(reg)
    write_adapter(tiny_vit, root, "big", active=list(tiny_vit.blocks)[:6])
    with pytest.raises(AdapterTooLargeError):
        reg.load("big", "big")
    assert _state(reg) == before


@pytest.mark.parametrize("path", ["../x", "/etc", "x/../../x", ""])
def test_paths_stay_inside_the_root(three, tiny_vit, path):
    reg = AdapterRegistry(tiny_vit, three[0], 1 << 20, 1 << 20)
    with pytest.raises(UnsafePathError):
        reg.load("n", path)


def test_symlink_escaping_the_root_is_refused(three, tiny_vit, tmp_path_factory):
    root, _ = three
    outside = tmp_path_factory.mktemp("outside")
    write_adapter(tiny_vit, outside, "evil", active=list(tiny_vit.blocks)[:1])
    os.symlink(outside / "evil", root / "link")
    os.mkdir(root / "half")
    os.symlink(outside / "evil" / CONFIG_NAME, root / "half" / CONFIG_NAME)
    os.symlink(outside / "evil" / WEIGHTS_NAME, root / "half" / WEIGHTS_NAME)
    reg = AdapterRegistry(tiny_vit, root, 1 << 20, 1 << 20)
    for path in ("link", "half"):
        with pytest.raises(UnsafePathError):
            reg.load("n", path)
    assert reg.preload() == ["x", "y", "z"]


@pytest.mark.parametrize("name", ["", "base", "../x", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_names_are_validated(three, tiny_vit, name):
    reg = AdapterRegistry(tiny_vit, three[0], 1 << 20, 1 << 20)
    with pytest.raises(InvalidAdapterNameError):
        reg.load(name, "x")


def test_replace_and_delete_keep_pinned_records_working(three, tiny_vit):
    root, _ = three
    reg = AdapterRegistry(tiny_vit, root, 1 << 20, 1 << 20)
    reg.preload()
    old = reg.pin("x")
    reg.load("x", "y")  # replace x
    assert reg.get("x") is not old
    (dev,) = reg.device_adapters([old])  # the in-flight request still has its own version
    assert dev.num_blocks == 2 and old.sparse is not None
    y = reg.pin("y")
    reg.delete("y")
    assert reg.device_adapters([y])[0] is not None
    with pytest.raises(UnknownAdapterError):
        reg.get("y")
    reg.unpin(old)
    reg.unpin(y)
    assert old.sparse is None and old.serial not in reg.host.sizes and y.serial not in reg.device.sizes


def test_upload_writes_both_files_under_the_root_and_replaces_atomically(three, tiny_vit):
    root, _ = three
    reg = AdapterRegistry(tiny_vit, root, 1 << 20, 1 << 20)
    files = {n: (root / "y" / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    record = reg.upload("fresh", files[CONFIG_NAME], files[WEIGHTS_NAME])
    assert (root / "fresh" / WEIGHTS_NAME).read_bytes() == files[WEIGHTS_NAME]
    assert record.info["active_blocks"] == reg.upload("fresh", files[CONFIG_NAME], files[WEIGHTS_NAME]).info["active_blocks"]
    assert sorted(p.name for p in root.iterdir()) == ["fresh", "x", "y", "z"]  # no staging leftovers
