"""Kernel tests run the real Triton kernel: compiled on CUDA, in Triton's interpreter on CPU.

Each test resolves its own ``KernelConfig`` (``kernel="triton"``: the interpreter on CPU
tensors, compiled on CUDA); nothing is read from the environment. The kernel module picks the
interpreter from the tensors' device when it builds its kernels, so the order in which other
test directories imported triton does not matter.
"""

from __future__ import annotations

import pytest

from selora.kernels import triton_lora
from selora.kernels import tuning as tuning_data
from selora.kernels.config import KernelConfig
from tests.helpers import CUDA

# The compiled cases' one tile: offered for every dtype and base GEMM (default.json). The
# autotuner's full list would compile each case's kernel once per candidate; that every
# candidate compiles is checked by test_aot for sm_90/sm_80, here or anywhere.
CUDA_TEST_TILE = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_SIZE_M": 8, "num_warps": 8, "num_stages": 3}


@pytest.fixture
def interpreter(monkeypatch, request):
    """A factory of Triton configs: ``interpreter(device, base_gemm=None, split_shrink_rank=None)``.
    CPU tensors run in Triton's interpreter, CUDA tensors compiled with one tile (tests marked
    ``autotune`` keep the real candidates)."""
    if CUDA and request.node.get_closest_marker("autotune") is None:
        real = tuning_data.tuning
        monkeypatch.setattr(tuning_data, "tuning",
                            lambda name: real(name) if name == "interpreter" else real(name) | {"configs": [CUDA_TEST_TILE]})
        triton_lora._kernels.cache_clear()
        request.addfinalizer(triton_lora._kernels.cache_clear)

    def config(device="cpu", base_gemm=None, split_shrink_rank=None) -> KernelConfig:
        return KernelConfig.resolve(device, "triton", base_gemm, split_shrink_rank)

    return config
