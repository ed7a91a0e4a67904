"""``--cuda-graphs``: fixed-capacity metadata (checked here in Triton's interpreter), capture on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selora.adapters import export_adapter, inject
from selora.adapters.layer import use_batch
from selora.kernels.config import KernelConfig
from selora.models import load_backbone
from selora.runtime.batch import batch_rows, forward_mixed, plan_rows
from selora.runtime.graphs import CudaGraphs, StaticBatch, buckets
from selora.runtime.slots import DeviceSlots
from selora.server.settings import Settings, SettingsError
from tests.helpers import CUDA, make_adapter


def resident(bb, slots):
    """LoRA r 4, DoRA r 20 (two pages) and LoRA r 40 (three: the split shrink, eagerly), fragmented."""
    blocks = list(bb.blocks)
    specs = [("lora", 4, blocks[::2]), ("dora", 20, blocks[1::3]), ("lora", 40, blocks[:5])]
    return [slots.load(export_adapter(make_adapter(bb, v, r, active, seed=i), bb.model_id, bb.fingerprint))
            for i, (v, r, active) in enumerate(specs)]


def test_buckets_are_powers_of_two_and_the_largest_batch():
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(1) == [1]


def test_a_static_batch_computes_what_the_eager_batch_does(tiny_vit):
    """What a captured forward runs, without capture: every site's kernel over its whole region
    (empty rows included), DoRA factors and the fused shrink at every rank, rows past the batch
    zero. It must equal the eager forward (the torch reference) for the real rows."""
    inject(tiny_vit)
    slots = DeviceSlots(tiny_vit, pages_per_block=6)
    adapters = resident(tiny_vit, slots)
    triton = KernelConfig.resolve("cpu", "triton")  # the real kernel, in Triton's interpreter
    static = StaticBatch(slots, triton)
    rows = [2, -1, 0, 1, 2]
    x = torch.randn(len(rows), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plan = plan_rows(rows)
    static.fill(adapters, plan.groups)
    padded = torch.zeros(8, 3, 32, 32)  # the bucket of 8
    padded[: len(rows)] = x[plan.order]
    with torch.no_grad(), use_batch(static.batch(8)):
        out = tiny_vit.encode_image(padded)[: len(rows)][plan.inverse]
    eager = forward_mixed(tiny_vit, x, adapters, rows, config=KernelConfig.resolve("cpu", "torch"))
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def test_fill_puts_each_sites_rows_in_its_region_and_empties_the_rest(tiny_vit):
    slots = DeviceSlots(tiny_vit, pages_per_block=6)
    adapters = resident(tiny_vit, slots)
    static = StaticBatch(slots, KernelConfig())
    static.fill(adapters, plan_rows([0, 1, 2]).groups)
    static.fill(adapters[:1], plan_rows([0, 0]).groups)  # a smaller batch after a larger one
    _, rows, per_site = batch_rows(adapters[:1], plan_rows([0, 0]).groups)
    kept = 0
    for i in range(len(slots.site_names)):
        region = static.host[static.offsets[i] : static.offsets[i + 1]]
        n = per_site[i]
        assert (region[n:] == 0).all()  # no row of the earlier batch is left behind
        kept += n
        assert np.array_equal(region[:n], rows[rows[:, -1] == i, :-1])
    assert kept == len(rows) and torch.equal(static.meta, torch.from_numpy(static.host))


def test_cuda_graphs_are_refused_without_cuda_and_triton(tiny_vit):
    with pytest.raises(SettingsError, match="--cuda-graphs needs a CUDA GPU"):
        Settings(device="cpu", cuda_graphs=True).kernel_config()
    with pytest.raises(SettingsError, match="--cuda-graphs"):
        Settings(device="cpu", kernel="triton", cuda_graphs=True).kernel_config()  # the interpreter cannot be captured
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CudaGraphs(tiny_vit, DeviceSlots(tiny_vit, 1), KernelConfig(), 4)


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine: capture and replay need one")
def test_replayed_graphs_equal_the_eager_forward():
    bb = load_backbone("tiny-vit", device="cuda")  # its own copy: the session's tiny_vit stays on the CPU
    inject(bb)
    slots = DeviceSlots(bb, pages_per_block=6)
    adapters = resident(bb, slots)
    config = KernelConfig.resolve("cuda", "triton")
    graphs = CudaGraphs(bb, slots, config, max_batch_size=4)
    x = torch.randn(3, 3, 32, 32, device="cuda")
    assert graphs.capture({"image": x[0]}) == len(buckets(4))
    for rows in ([0, 1, 2], [2, -1, 2], [1]):
        got = graphs.run("image", x[: len(rows)], adapters, rows)
        torch.testing.assert_close(got, forward_mixed(bb, x[: len(rows)], adapters, rows, config=config), atol=1e-4, rtol=1e-4)
    assert graphs.run("image", torch.randn(5, 3, 32, 32, device="cuda"), adapters, [0] * 5) is None  # beyond the buckets
