"""The mechanisms on their own: the JSON decoder, the path resolver, the image gate, the
fair decoder and the validator's serving-dtype proof."""

from __future__ import annotations

import asyncio
import os
import struct
import threading

import pytest
import torch

from selora import safejson
from selora.adapters.format import (
    CONFIG_NAME, AdapterLimitError, CorruptFileError, ServingError, ServingTarget, check_serving, load_adapter, parse_adapter,
)
from selora.runtime.decode import FairDecoder
from selora.runtime.paths import UnsafePathError, resolve_inside
from tests.helpers import write_adapter


@pytest.mark.parametrize("data, error", [
    (b"[" * 100_000 + b"]" * 100_000, safejson.JSONLimitError),
    (b"[" + b"1" * 41 + b"]", safejson.JSONLimitError),
    (b'{"a": 1, "a": 1}', safejson.JSONSyntaxError),
    (b"[Infinity]", safejson.JSONSyntaxError),
    (b"\xff", safejson.JSONEncodingError),
    ("\ud800", safejson.JSONEncodingError),
])
def test_json_decoder_refuses_with_its_own_errors(data, error):
    with pytest.raises(error):
        safejson.loads(data)


def test_json_decoder_ignores_brackets_and_digits_inside_strings():
    text = '{"s": "' + "[" * 100 + "9" * 100 + '\\"]", "n": [[1.5e10]]}'
    assert safejson.loads(text) == {"s": "[" * 100 + "9" * 100 + '"]', "n": [[1.5e10]]}


def test_path_resolver_is_total(tmp_path):
    (tmp_path / "ok").mkdir()
    os.symlink("a", tmp_path / "b")
    os.symlink("b", tmp_path / "a")
    assert resolve_inside(tmp_path, "ok") == (tmp_path / "ok").resolve()
    for bad in (None, 3, b"ok", "", "x\x00", "\udcff", "x" * 256, "a/" * 600, "a", "a/x", "/ok", "ok/../.."):
        with pytest.raises(UnsafePathError) as e:
            resolve_inside(tmp_path, bad)
        assert str(tmp_path) not in str(e.value)


def test_header_of_200000_tensors_is_refused_before_it_is_parsed(tmp_path, tiny_vit):
    saved = write_adapter(tiny_vit, tmp_path, "a", active=list(tiny_vit.blocks)[:1])
    config = (tmp_path / "a" / CONFIG_NAME).read_bytes()
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(200_000)).encode()
    header = b"{" + entries + b"}"
    with pytest.raises(AdapterLimitError, match="header"):
        parse_adapter(config, struct.pack("<Q", len(header)) + header, tiny_vit.blocks)
    small = b"{" + b",".join(entries.split(b",")[: 3 * 60]) + b"}"  # under the byte limit, over the tensor count
    with pytest.raises(AdapterLimitError, match="tensors"):
        parse_adapter(config, struct.pack("<Q", len(small)) + small, tiny_vit.blocks)
    with pytest.raises(CorruptFileError, match="duplicate"):
        dup = b'{"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
        parse_adapter(config, struct.pack("<Q", len(dup)) + dup, tiny_vit.blocks)
    assert saved.blocks  # the valid adapter itself loads
    assert load_adapter(tmp_path / "a", tiny_vit.blocks, ServingTarget.of(tiny_vit)).blocks.keys() == saved.blocks.keys()


def test_serving_proof_depends_on_the_dtype(tmp_path, tiny_vit):
    adapter = write_adapter(tiny_vit, tmp_path, "d", "dora", active=list(tiny_vit.blocks)[:1])
    w = next(iter(adapter.blocks.values()))
    w.magnitude.fill_(1e6)  # the factor m/‖W0+ΔW‖ is finite in fp32 and bf16, infinite in fp16
    target = ServingTarget.of(tiny_vit)
    for dtype in (torch.float32, torch.bfloat16):
        check_serving(adapter, ServingTarget(target.embed_dim, dtype, target.base_weight))
    with pytest.raises(ServingError, match="DoRA factor.*float16"):
        check_serving(adapter, ServingTarget(target.embed_dim, torch.float16, target.base_weight))
    w.magnitude.fill_(1.0)
    w.lora_B.fill_(1e5)  # B itself overflows fp16
    with pytest.raises(ServingError, match="lora_B.*float16"):
        check_serving(adapter, ServingTarget(target.embed_dim, torch.float16, target.base_weight))


@pytest.mark.parametrize("client", [None, "one-tenant"], ids=["own-clients", "same-client"])
def test_fair_decoder_serves_a_small_flow_before_a_large_one_finishes(client):
    """Also when both come from one client (a server without keys: every caller is one tenant)."""
    decoder = FairDecoder(threads=2, reserved_small=1, small=10)
    order, gate = [], threading.Event()

    def job(name):
        if name == "big0":
            gate.wait(10)  # holds the one general thread
        order.append(name)
        return name

    async def main():
        big = asyncio.ensure_future(decoder.map(job, [(f"big{i}",) for i in range(4)], [1000] * 4, client))
        await asyncio.sleep(0.05)
        small = await decoder.run(job, "small", cost=1, client=client)  # served by the reserved thread meanwhile
        gate.set()
        return small, await big

    try:
        small, big = asyncio.run(main())
    finally:
        decoder.close()
    assert small == "small" and big == ["big0", "big1", "big2", "big3"]
    assert order[0] == "small"


def test_fair_decoder_shares_per_client_not_per_request():
    """A client sending many expensive requests at once gets one share: another client's request,
    arriving behind them, is decoded next (per request, it would wait for one job of each)."""
    decoder = FairDecoder(threads=2, reserved_small=1, small=10)
    order, gate = [], threading.Event()

    def job(name):
        if name == "a0.0":
            gate.wait(10)  # holds the one general thread while the queue fills
        order.append(name)
        return name

    async def main():
        flood = [asyncio.ensure_future(decoder.map(job, [(f"a{r}.{i}",) for i in range(2)], [1000] * 2, "tenant-a"))
                 for r in range(3)]
        await asyncio.sleep(0.05)
        other = asyncio.ensure_future(decoder.run(job, "b", cost=1000, client="tenant-b"))
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*flood, other)

    try:
        asyncio.run(main())
    finally:
        decoder.close()
    assert order[:2] == ["a0.0", "b"]
    assert order[2:] == ["a1.0", "a2.0", "a0.1", "a1.1", "a2.1"]  # the client's requests share its part
