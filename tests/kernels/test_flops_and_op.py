"""The custom op ``selora::lora_linear``: schema/fake impl, and the FLOPs FlopCounterMode sees."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selora.kernels.batch import LayerBatch
from selora.kernels.ops import host_meta, lora_linear, lora_linear_flops
from tests.kernels.cases import CASES, build_case


def counted(inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.layer)
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_flop_counter_sees_base_gemm_plus_active_entries_only(case, monkeypatch):
    monkeypatch.setenv("SELORA_KERNEL", "torch")
    inputs = build_case(case)
    items, tokens, d_in = inputs.x.shape
    by_hand = 2 * items * tokens * d_in * case.d_out
    if inputs.layer is not None:
        for e in inputs.layer.entries:  # shrink + expand over the entry's rows only
            rows = (e.item_end - e.item_start) * tokens
            by_hand += 2 * rows * d_in * e.rank + 2 * rows * e.rank * case.out_size
    assert lora_linear_flops(inputs.x.shape, inputs.weight.shape, inputs.layer) == by_hand
    assert counted(inputs) == by_hand


def test_flops_of_inactive_blocks_and_base_rows_are_zero(monkeypatch):
    monkeypatch.setenv("SELORA_KERNEL", "torch")
    inputs = build_case(CASES[1])
    base = 2 * inputs.x.shape[0] * inputs.x.shape[1] * inputs.x.shape[2] * CASES[1].d_out
    more_base_rows = torch.cat([torch.zeros_like(inputs.x[:3]), inputs.x])  # 3 more items, no adapter
    shifted = type(inputs)(more_base_rows, inputs.weight, inputs.bias, inputs.layer)
    # shifting entries by 3 items: their LoRA FLOPs stay, only the base GEMM grows
    entries = [replace(e, item_start=e.item_start + 3, item_end=e.item_end + 3) for e in inputs.layer.entries]
    shifted.layer = LayerBatch(entries, inputs.layer.out_size, inputs.layer.lora_a, inputs.layer.lora_bt,
                               inputs.layer.scales, inputs.layer.meta, inputs.layer.dora_factor)
    lora_part = counted(inputs) - base
    assert lora_part > 0
    assert counted(shifted) == base * (inputs.x.shape[0] + 3) // inputs.x.shape[0] + lora_part


def test_custom_op_schema_and_fake_impl(monkeypatch):
    monkeypatch.setenv("SELORA_KERNEL", "torch")
    inputs = build_case(CASES[1])
    layer = inputs.layer
    args = (inputs.x, inputs.weight, inputs.bias, layer.lora_a, layer.lora_bt, layer.scales, layer.meta,
            layer.dora_factor, host_meta(layer), [e.scale for e in layer.entries])
    torch.library.opcheck(torch.ops.selora.lora_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_benchmark_refuses_cleanly_without_gpu(capsys):
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run instead of refusing")
    path = Path(__file__).parents[2] / "benchmarks" / "kernel.py"
    spec = importlib.util.spec_from_file_location("kernel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_benchmark_saves_autotuned_tiles_as_the_gpus_tuning_data(tmp_path, monkeypatch):
    import importlib.util
    import shutil
    from pathlib import Path

    from selora.kernels import triton_lora

    path = Path(__file__).parents[2] / "benchmarks" / "kernel.py"
    spec = importlib.util.spec_from_file_location("kernel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copy(triton_lora.CONFIG_DIR / "default.json", tmp_path)
    monkeypatch.setattr(triton_lora, "CONFIG_DIR", tmp_path)
    key, tile = "bf16 M<=16384 N=3072 K=768 out=3072 split=0 dora=0 base=fused", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 16}
    monkeypatch.setitem(triton_lora.TUNED, key, tile)
    saved = module.save_tuning("NVIDIA H100 80GB HBM3", "python benchmarks/kernel.py --save-tuning")
    assert saved == tmp_path / "nvidia-h100-80gb-hbm3.json"
    monkeypatch.setattr(triton_lora, "tuning", triton_lora.tuning.__wrapped__)  # no cached file contents
    data = triton_lora.tuning("NVIDIA H100 80GB HBM3")
    assert data["source"] == saved.name and data["tuned"] == {key: tile}
    assert data["configs"] == triton_lora.tuning("interpreter-free default")["configs"]
