"""Device slots: adapters written once into preallocated pages; a batch passes only indices."""

from __future__ import annotations


import pytest
import torch

from selora.adapters import export_adapter, inject
from selora.kernels.batch import SiteBuffers
from selora.kernels.config import KernelConfig
from selora.runtime.batch import StaleAdapterError, build_batch, forward_mixed, plan_rows
from selora.runtime.slots import DeviceSlots, DeviceSlotsFullError
from tests.helpers import assert_rows_equal_merged, image_b64, make_adapter, make_app, run_with_client, write_adapter


def sparse(bb, variant="lora", r=4, active=None, seed=0):
    return export_adapter(make_adapter(bb, variant, r, active, seed=seed), bb.model_id, bb.fingerprint)


def taken(dev) -> set[tuple[str, int]]:
    return {(site, page + i) for site, runs in dev.pages.items() for page, n in runs for i in range(n)}


def test_reload_into_other_slots_gives_identical_outputs(tiny_vit):
    inject(tiny_vit)
    blocks = list(tiny_vit.blocks)
    slots = DeviceSlots(tiny_vit, pages_per_block=4)
    filler = slots.load(sparse(tiny_vit, r=20, active=blocks, seed=1))  # two pages per block, from the start
    adapter = sparse(tiny_vit, "dora", 8, blocks[::2], seed=2)
    first = slots.load(adapter)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = forward_mixed(tiny_vit, x, [first], [0, -1, 0])
    slots.release(first)
    slots.release(filler)
    slots.load(sparse(tiny_vit, r=4, active=blocks, seed=3))  # takes the first page of every site
    again = slots.load(adapter)
    assert taken(again).isdisjoint(taken(first))  # the same adapter, other pages
    assert torch.equal(forward_mixed(tiny_vit, x, [again], [0, -1, 0]), before)
    with pytest.raises(StaleAdapterError):  # a released adapter is never read again
        forward_mixed(tiny_vit, x, [first], [0, -1, 0])


@pytest.mark.parametrize("backbone_name", ["tiny_vit", "tiny_clip"])
def test_mixed_forward_equals_merged_weights_with_fragmented_slots(backbone_name, request):
    bb = request.getfixturevalue(backbone_name)
    inject(bb)
    blocks = list(bb.blocks)
    slots = DeviceSlots(bb, pages_per_block=10)
    holes = [slots.load(sparse(bb, r=r, active=blocks, seed=10 + r)) for r in (4, 20, 4)]  # 1, 2, 1 pages per block
    slots.release(holes[0])
    slots.release(holes[2])  # free: page 0 and pages 3.. of each block's share; 1-2 stay taken
    specs = [("lora", 20, blocks[::2]), ("dora", 16, blocks[1::3]), ("dora", 40, blocks[::5]), ("lora", 4, blocks[2::4])]
    adapters = [sparse(bb, v, r, act, seed=i) for i, (v, r, act) in enumerate(specs)]
    resident = [slots.load(a) for a in adapters]
    assert any(page == 0 for dev in resident for _, page in taken(dev))  # blocks landed in the holes
    rows = [1, -1, 0, 3, 2, 0, -1, 1, 2, 3]
    x = torch.randn(len(rows), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mixed = forward_mixed(bb, x, resident, rows)
    assert_rows_equal_merged(bb, x, mixed, rows, adapters)


def test_a_batch_allocates_no_adapter_weight(tiny_vit, monkeypatch):
    inject(tiny_vit)
    blocks = list(tiny_vit.blocks)
    slots = DeviceSlots(tiny_vit, pages_per_block=4)
    resident = [slots.load(sparse(tiny_vit, v, r, blocks[i::3], seed=i)) for i, (v, r) in enumerate([("lora", 4), ("dora", 20), ("lora", 8)])]
    writes = []
    monkeypatch.setattr(SiteBuffers, "write", lambda *args: writes.append(args))
    storages = {site: [t.untyped_storage().data_ptr() for t in (b.lora_a, b.lora_bt, b.dora_factor, b.scales)]
                for site, b in slots.buffers.items()}
    meta_storage = slots.meta.untyped_storage().data_ptr()
    for rows in ([0, 1, 2, -1], [2, 2, 0], [1, -1]):
        batch = build_batch(resident, plan_rows(rows).groups, KernelConfig())
        assert batch.layers
        for site, layer in batch.layers.items():
            assert layer.buffers is slots.buffers[site]  # the slot buffers themselves, not copies
            assert layer.meta.untyped_storage().data_ptr() == meta_storage  # a view of the one metadata buffer
        forward_mixed(tiny_vit, torch.randn(len(rows), 3, 32, 32), resident, rows)
    assert writes == []
    assert storages == {site: [t.untyped_storage().data_ptr() for t in (b.lora_a, b.lora_bt, b.dora_factor, b.scales)]
                        for site, b in slots.buffers.items()}


def test_batch_metadata_is_grouped_by_site_with_offsets(tiny_vit):
    blocks = ["vision.0.q", "vision.0.v", "vision.1.fc1"]
    slots = DeviceSlots(tiny_vit, pages_per_block=4)
    a = slots.load(sparse(tiny_vit, r=20, active=blocks[:2], seed=1))
    b = slots.load(sparse(tiny_vit, "dora", 4, blocks, seed=2))
    batch = build_batch([a, b], plan_rows([1, 0, 1, 1]).groups, KernelConfig())
    qkv = batch.layers["blocks.0.attn.qkv"]
    assert [(e.item_start, e.item_end, e.rank, e.dora) for e in qkv.entries] == [(0, 1, 20, False), (0, 1, 20, False),
                                                                                 (1, 4, 4, True), (1, 4, 4, True)]
    assert qkv.host[:, 5].tolist() == [0, 20, 40, 52]  # item_rank_offset: running Σ items × rank within the site
    assert (qkv.items_end, qkv.max_block_rank, qkv.max_entry_items, qkv.shrink_size, qkv.has_dora) == (4, 20, 3, 64, True)
    assert [(e.item_start, e.dora) for e in batch.layers["blocks.1.mlp.fc1"].entries] == [(1, True)]


def test_an_adapter_that_does_not_fit_changes_nothing(tiny_vit):
    slots = DeviceSlots(tiny_vit, pages_per_block=1)  # 3 pages per q/k/v site, 1 per other site
    first = slots.load(sparse(tiny_vit, active=["vision.1.q"]))
    slots.load(sparse(tiny_vit, active=["vision.1.k"]))
    slots.release(first)  # layer 1's qkv: pages 0 and 2 free, not adjacent
    free = slots.free_pages()
    big = sparse(tiny_vit, r=20, active=["vision.0.q", "vision.1.q"])  # 2 adjacent pages each
    assert slots.fits_empty(big) is None
    with pytest.raises(DeviceSlotsFullError, match="blocks.1.attn.qkv"):
        slots.load(big)
    assert slots.free_pages() == free  # vision.0.q's pages, taken first, were given back
    assert "need 4 slot pages" in slots.fits_empty(sparse(tiny_vit, r=64, active=["vision.0.fc1"]))


def test_full_device_slots_answer_503_and_later_requests_are_served(tmp_path, tiny_vit):
    import asyncio

    write_adapter(tiny_vit, tmp_path, "a", active=["vision.0.q", "vision.0.k"], seed=1)
    write_adapter(tiny_vit, tmp_path, "b", active=["vision.0.k", "vision.0.v"], seed=2)  # a and b need 4 of qkv's 3 pages
    app = make_app(tiny_vit, tmp_path, device_budget=1, max_wait_ms=200.0)  # one page per block

    def embed(client, model):
        return client.post("/v1/embeddings", json={"model": model, "input": [image_b64(0)]})

    async def scenario(client):
        together = await asyncio.gather(embed(client, "a"), embed(client, "b"))  # one batch reads both
        alone = [await embed(client, m) for m in ("a", "b", "a")]  # each batch evicts the other, unpinned
        return together, alone

    together, alone = run_with_client(app, scenario)
    assert [r.status_code for r in together] == [503, 503]
    assert together[0].json()["error"]["type"] == "device_slots_full" and together[0].headers["retry-after"] == "1"
    assert [r.status_code for r in alone] == [200, 200, 200]
