"""The torch backend against the torch reference loop (the spec): batched units, forced on
every layer (``units``) or left to the entry-count rule (``auto``)."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from selora.kernels.batch import DeviceBlock, pack_layer
from selora.kernels.config import KernelConfig
from selora.kernels.ops import lora_linear
from selora.kernels.reference import lora_linear_reference
from selora.kernels import torch_lora
from selora.kernels.batch import COLUMN
from tests.helpers import CUDA, NO_GPU
from tests.kernels.cases import CASES, build_case
from tests.kernels.test_triton_lora import TOLERANCE, expected

DEVICE_DTYPES = [
    *[pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in (torch.float32, torch.float16, torch.bfloat16)],
    *[pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.skipif(not CUDA, reason=NO_GPU))
      for dt in (torch.float32, torch.bfloat16)],
]


@pytest.fixture
def units_always(monkeypatch):
    monkeypatch.setattr(torch_lora, "UNITS_FROM_ENTRIES", 0)


@pytest.mark.parametrize("path", ["units", "auto"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_backend_matches_reference(case, device, dtype, path, monkeypatch):
    if path == "units":
        monkeypatch.setattr(torch_lora, "UNITS_FROM_ENTRIES", 0)
    inputs = build_case(case)
    run = inputs.to(dtype, device)
    y = lora_linear(run.x, run.weight, run.bias, run.layer, KernelConfig("torch"))
    assert y.dtype == dtype and y.shape == (*run.x.shape[:-1], case.d_out)
    torch.testing.assert_close(y.float().cpu(), expected(inputs, dtype), **TOLERANCE[dtype])


def test_units_are_the_entries_items_times_pages():
    layer = build_case(CASES[2]).layer
    scale = layer.buffers.host_scales[layer.host[:, COLUMN["page"]]]
    u = torch_lora.UnitPlan(layer.host, layer.out_size, scale, np.array([0, layer.num_entries]), "cpu").segment(0)
    assert u.item.numel() == sum((e.item_end - e.item_start) * math.ceil(e.rank / 16) for e in layer.entries)
    for e in layer.entries:  # every (item, page) of every entry, once
        for item in range(e.item_start, e.item_end):
            pages = {p for i, p in zip(u.item.tolist(), u.page.tolist()) if i == item}
            assert set(range(e.page, e.page + math.ceil(e.rank / 16))) <= pages


def test_a_page_reused_by_a_smaller_rank_reads_no_stale_rows(units_always):
    """A rank-3 block written over a page that held a rank-16 block: the torch backend multiplies
    whole pages, so the rows past rank 3 must read as zeros, not the old block."""
    gen = torch.Generator().manual_seed(0)
    big = DeviceBlock("b0", 0, torch.randn(16, 8, generator=gen), torch.randn(16, 6, generator=gen), 1.0)
    small = DeviceBlock("b0", 0, torch.randn(3, 8, generator=gen), torch.randn(3, 6, generator=gen), 0.5)
    layer = pack_layer([(0, 2, small)], gap=0)  # page 0
    layer.buffers.write(0, big)  # another adapter's block held the page before
    layer.buffers.write(0, small)
    x, w = torch.randn(2, 4, 8, generator=gen), torch.randn(6, 8, generator=gen)
    y = lora_linear(x, w, None, layer, KernelConfig("torch"))
    torch.testing.assert_close(y, lora_linear_reference(x, w, None, layer))
    torch.testing.assert_close(y, F.linear(x, w) + 0.5 * (x @ small.lora_a.t()) @ small.lora_bt)
