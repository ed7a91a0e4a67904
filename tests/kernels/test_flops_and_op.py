"""The custom op ``selora::lora_linear``: schema/fake impl, and the FLOPs FlopCounterMode sees."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selora.kernels.batch import COLUMN, layer_batch
from selora.kernels.config import KernelConfig
from selora.kernels.ops import lora_linear, lora_linear_flops
from tests.kernels.cases import CASES, build_case


def counted(inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.layer, KernelConfig())
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_flop_counter_sees_base_gemm_plus_active_entries_only(case):
    inputs = build_case(case)
    items, tokens, d_in = inputs.x.shape
    by_hand = 2 * items * tokens * d_in * case.d_out
    if inputs.layer is not None:
        for e in inputs.layer.entries:  # shrink + expand over the entry's rows only
            rows = (e.item_end - e.item_start) * tokens
            by_hand += 2 * rows * d_in * e.rank + 2 * rows * e.rank * case.out_size
    assert lora_linear_flops(inputs.x.shape, inputs.weight.shape, inputs.layer) == by_hand
    assert counted(inputs) == by_hand


def test_flops_of_inactive_blocks_and_base_rows_are_zero():
    inputs = build_case(CASES[1])
    base = 2 * inputs.x.shape[0] * inputs.x.shape[1] * inputs.x.shape[2] * CASES[1].d_out
    more_base_rows = torch.cat([torch.zeros_like(inputs.x[:3]), inputs.x])  # 3 more items, no adapter
    shifted = type(inputs)(more_base_rows, inputs.weight, inputs.bias, inputs.layer)
    # shifting entries by 3 items: their LoRA FLOPs stay, only the base GEMM grows
    host = inputs.layer.host.copy()
    host[:, [COLUMN["item_start"], COLUMN["item_end"]]] += 3
    shifted.layer = layer_batch(inputs.layer.buffers, host)
    lora_part = counted(inputs) - base
    assert lora_part > 0
    assert counted(shifted) == base * (inputs.x.shape[0] + 3) // inputs.x.shape[0] + lora_part


def test_custom_op_schema_and_fake_impl():
    inputs = build_case(CASES[1])
    layer, b = inputs.layer, inputs.layer.buffers
    args = (inputs.x, inputs.weight, inputs.bias, b.lora_a, b.lora_bt, b.dora_factor, b.scales, layer.meta,
            layer.host.ravel().tolist(), [e.scale for e in layer.entries], "torch", "fused", 32)
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
    from selora.kernels import tuning as tuning_data

    path = Path(__file__).parents[2] / "benchmarks" / "kernel.py"
    spec = importlib.util.spec_from_file_location("kernel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copy(tuning_data.CONFIG_DIR / "default.json", tmp_path)
    monkeypatch.setattr(tuning_data, "CONFIG_DIR", tmp_path)
    key, tile = "bf16 M<=16384 N=3072 K=768 out=3072 split=0 dora=0 base=fused", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 16}
    monkeypatch.setitem(triton_lora.TUNED, key, tile)
    saved = module.save_tuning("NVIDIA H100 80GB HBM3", "python benchmarks/kernel.py --save-tuning")
    assert saved == tmp_path / "nvidia-h100-80gb-hbm3.json"
    monkeypatch.setattr(tuning_data, "tuning", tuning_data.tuning.__wrapped__)  # no cached file contents
    data = tuning_data.tuning("NVIDIA H100 80GB HBM3")
    assert data["source"] == saved.name and data["tuned"] == {key: tile}
    assert data["configs"] == tuning_data.tuning("interpreter-free default")["configs"]
