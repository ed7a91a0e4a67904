"""The Triton kernel against the torch reference (the spec), on the interpreter and on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selora.kernels import triton_lora
from selora.kernels.config import KernelConfig, KernelConfigError
from selora.kernels.ops import lora_linear
from selora.kernels.reference import lora_linear_reference
from tests.helpers import CUDA, NO_GPU
from tests.kernels.cases import CASES, build_case

# Kernel (in dtype) against the reference on the same dtype-rounded values computed in fp32.
TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="interpreter-fp32"),
    pytest.param("cpu", torch.float16, id="interpreter-fp16"),
    *[pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.skipif(not CUDA, reason=NO_GPU))
      for dt in (torch.float32, torch.float16, torch.bfloat16)],
]


def expected(inputs, dtype):
    """The reference in fp32 on the inputs rounded to ``dtype`` (so only the kernel's error remains)."""
    exact = inputs.to(dtype).to(torch.float32)
    if exact.layer is None:
        return F.linear(exact.x, exact.weight, exact.bias)
    return lora_linear_reference(exact.x, exact.weight, exact.bias, exact.layer)


@pytest.mark.parametrize("base_gemm", ["fused", "library"], ids=["base-in-tile", "base-by-torch"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(case, device, dtype, base_gemm, interpreter):
    inputs = build_case(case)
    run = inputs.to(dtype, device)
    before = triton_lora.launch_count()
    y = lora_linear(run.x, run.weight, run.bias, run.layer, interpreter(device, base_gemm))
    assert y.dtype == dtype and y.shape == (*run.x.shape[:-1], case.d_out)
    torch.testing.assert_close(y.float().cpu(), expected(inputs, dtype), **TOLERANCE[dtype])
    split = run.layer is not None and run.layer.max_block_rank > 32
    assert triton_lora.launch_count() - before == (0 if run.layer is None else 1 + split)


@pytest.mark.parametrize("split_rank", [0, 1000], ids=["always-split-shrink", "always-fused-shrink"])
@pytest.mark.parametrize("case", CASES[1:3], ids=lambda c: c.name)
def test_both_shrink_modes_match_reference(case, split_rank, interpreter):
    inputs = build_case(case, seed=1)
    before = dict(triton_lora.LAUNCHES)
    y = lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.layer, interpreter("cpu", split_shrink_rank=split_rank))
    torch.testing.assert_close(y, expected(inputs, torch.float32), **TOLERANCE[torch.float32])
    shrinks = triton_lora.LAUNCHES["lora_shrink"] - before.get("lora_shrink", 0)
    assert shrinks == (1 if split_rank == 0 else 0)


def test_layer_without_entries_launches_only_the_base_gemm(interpreter):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    inputs = build_case(CASES[-1])
    assert inputs.layer is None
    before = triton_lora.launch_count()
    with Recorder() as rec:
        y = lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.layer, interpreter())
    assert triton_lora.launch_count() == before
    assert [op for op in rec.ops if op not in ("view", "t", "_unsafe_view", "reshape")] == ["addmm"]
    torch.testing.assert_close(y, F.linear(inputs.x, inputs.weight, inputs.bias))


def test_backend_setting(monkeypatch):
    monkeypatch.setenv("SELORA_KERNEL", "torch")  # the environment is the settings' business, not the kernel's
    assert KernelConfig.resolve("cpu").backend == "torch"
    assert KernelConfig.resolve("cuda", "torch").backend == "torch"
    if CUDA:
        assert KernelConfig.resolve("cuda", "triton").backend == "triton"
    else:
        with pytest.raises(KernelConfigError, match="no CUDA GPU"):
            KernelConfig.resolve("cuda", "triton")
    assert KernelConfig.resolve("cpu", "triton").backend == "triton-interpret"
    assert KernelConfig.resolve("cpu", "triton", "library", 7) == KernelConfig("triton-interpret", "library", 7)
    with pytest.raises(KernelConfigError, match="expected one of"):
        KernelConfig.resolve("cpu", "cuda-please")
    with pytest.raises(KernelConfigError, match="base GEMM"):
        KernelConfig.resolve("cpu", "triton", "cublas")
    with pytest.raises(KernelConfigError, match="split shrink rank"):
        KernelConfig.resolve("cpu", "triton", None, -1)


def test_auto_on_cpu_runs_the_reference_not_the_kernel():
    inputs = build_case(CASES[1])
    before = triton_lora.launch_count()
    y = lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.layer, KernelConfig.resolve("cpu"))
    assert triton_lora.launch_count() == before
    torch.testing.assert_close(y, lora_linear_reference(inputs.x, inputs.weight, inputs.bias, inputs.layer))


def test_bad_inputs_get_typed_errors(interpreter):
    inputs, config = build_case(CASES[1]), interpreter()
    with pytest.raises(ValueError, match="share one dtype"):
        lora_linear(inputs.x.half(), inputs.weight, inputs.bias, inputs.layer, config)
    with pytest.raises(ValueError, match="disagree"):
        lora_linear(inputs.x[..., :-1], inputs.weight[:, :-1], inputs.bias, inputs.layer, config)
    with pytest.raises(ValueError, match="outside"):
        lora_linear(inputs.x[:2], inputs.weight, inputs.bias, inputs.layer, config)
    bf16 = inputs.to(torch.bfloat16)
    with pytest.raises(KernelConfigError, match="bf16"):
        lora_linear(bf16.x, bf16.weight, bf16.bias, bf16.layer, config)


def test_tuned_table_entry_gives_the_tile(interpreter):
    """A tuning file's ``tuned`` entry for a call's key decides its tile (here an unusual one)."""
    inputs, config = build_case(CASES[1]), interpreter()
    _, [launch] = triton_lora.plan(inputs.x, inputs.weight, inputs.bias, inputs.layer, config)
    key = triton_lora.tune_key(launch)
    assert key == "fp32 M<=64 N=69 K=37 out=23 split=0 dora=1 base=fused"  # 11 items × 3 tokens = 33 rows
    tile = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_SIZE_M": 2, "num_warps": 4, "num_stages": 2}
    before = triton_lora.TILE_SOURCES["tuned"]
    tuned = KernelConfig(config.backend, config.base_gemm, config.split_shrink_rank, config.tuning | {"tuned": {key: tile}})
    with torch.no_grad():  # eager inference: the config object itself reaches the launcher (the custom op
        y = lora_linear(inputs.x, inputs.weight, inputs.bias, inputs.layer, tuned)  # re-reads the device's file)
    torch.testing.assert_close(y, expected(inputs, torch.float32), **TOLERANCE[torch.float32])
    assert triton_lora.TILE_SOURCES["tuned"] == before + 1


@pytest.mark.autotune
@pytest.mark.skipif(not CUDA, reason=NO_GPU)
def test_autotuner_choice_is_recorded_for_the_tuning_file(interpreter):
    """On a GPU without a ``tuned`` entry the autotuner picks among the candidates listed for
    the dtype, and the choice is recorded (``benchmarks/kernel.py --save-tuning`` saves it)."""
    run = build_case(CASES[1], seed=2).to(torch.bfloat16, "cuda")
    config = interpreter("cuda")
    cfg = config.tuning
    _, [launch] = triton_lora.plan(run.x, run.weight, run.bias, run.layer, config)
    key = triton_lora.tune_key(launch)
    if key in cfg.get("tuned", {}):
        pytest.skip(f"this GPU's tuning file already holds {key!r}")
    before = triton_lora.TILE_SOURCES["autotuned"]
    y = lora_linear(run.x, run.weight, run.bias, run.layer, config)
    torch.testing.assert_close(y.float().cpu(), expected(build_case(CASES[1], seed=2), torch.bfloat16), **TOLERANCE[torch.bfloat16])
    assert triton_lora.TILE_SOURCES["autotuned"] == before + 1
    chosen = triton_lora.TUNED[key]
    assert any(all(c[k] == chosen[k] for k in chosen) for c in cfg["configs"] if "bf16" in c["dtypes"])
