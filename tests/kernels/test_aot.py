"""The fused kernel compiles for Hopper (sm_90) and Ampere (sm_80) on this machine, no GPU needed.

The interpreter runs code the GPU compiler would reject (a ``tl.dot`` below 16, a dtype clash in
the epilogue): these cases compile the very launches the op builds, specialised as the JIT would
specialise them on a GPU, in every dtype (bf16 included), LoRA and DoRA, both shrink modes.
"""

from __future__ import annotations

import pytest
import torch

from selora.kernels import aot, triton_lora
from selora.kernels.config import BASE_GEMMS
from selora.kernels.tuning import tuning
from tests.kernels.cases import CASES, build_case

NO_TOOLCHAIN = aot.toolchain_available()
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN is not None, reason=str(NO_TOOLCHAIN))
# One small tile keeps each compile to about a second.
TUNING = {"source": "test", "fused_shrink_max_rank": 32, "shrink": {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_R": 16},
          "configs": [{"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_SIZE_M": 4, "num_warps": 4, "num_stages": 3}]}


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_kernel_compiles_for_gpu(dtype, arch):
    # Ranks 1..128, LoRA and DoRA entries: the layer takes the split shrink (two kernels).
    run = build_case(CASES[2]).to(dtype)
    compiled = aot.compile_layer(run.x, run.weight, run.bias, run.layer, TUNING, arch)
    assert [c.kernel for _, c in compiled] == ["lora_shrink", "lora_linear"]
    for _, c in compiled:
        assert c.arch == arch and 0 < c.registers <= 255 and c.shared_bytes > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
def test_fused_shrink_without_dora_compiles_without_spills(dtype):
    run = build_case(CASES[0]).to(dtype)  # rank 1, LoRA only: one launch, shrink in the epilogue
    [(_, c)] = aot.compile_layer(run.x, run.weight, run.bias, run.layer, TUNING, "sm_90")
    assert c.kernel == "lora_linear" and not c.spills, c


def test_autotuner_offers_each_call_only_its_listed_configs():
    _, autotuned, _ = triton_lora._kernels("NVIDIA H100 80GB HBM3")  # builds the autotuner; runs nothing
    listed = tuning("NVIDIA H100 80GB HBM3")["configs"]
    prune = autotuned.early_config_prune
    for dtype, name in triton_lora.DTYPE_NAMES.items():
        for base in BASE_GEMMS:
            kept = prune(autotuned.configs, {"x_ptr": torch.empty(0, dtype=dtype)}, BASE_FROM_Y=base == "library")
            expected = [c for c in listed if name in c["dtypes"] and base in c.get("base_gemms", BASE_GEMMS)]
            assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == \
                [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in expected]
            assert kept


def test_dots_use_each_architectures_tensor_cores():
    # wgmma needs a warp group of 4 warps on at least 64 rows: a Hopper-sized tile.
    tile = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_SIZE_M": 4, "num_warps": 4, "num_stages": 3}
    tuning = TUNING | {"configs": [tile]}
    run = build_case(CASES[0]).to(torch.bfloat16)
    [(_, hopper)] = aot.compile_layer(run.x, run.weight, run.bias, run.layer, tuning, "sm_90")
    [(_, ampere)] = aot.compile_layer(run.x, run.weight, run.bias, run.layer, tuning, "sm_80")
    assert (hopper.tensor_cores, ampere.tensor_cores) == ("wgmma", "mma.sync")
