"""Compile the fused kernel for a GPU architecture ahead of time, on a machine without a GPU.

Triton's wheel carries its whole NVIDIA toolchain (its MLIR passes, LLVM and ``ptxas``), so the
launches that ``triton_lora.plan`` builds for real (CPU) tensors compile for sm_90 (H100/H200)
or sm_80 (A100) anywhere, specialised exactly as the JIT specialises them at launch (arguments
equal to 1 become constants, 16-aligned pointers and sizes are marked), one tuning config at a
time. ``ptxas -v`` then reports what decides whether a tile can be fast: registers per thread,
bytes spilled to local memory, shared memory; the PTX shows which tensor-core instructions the
dots became. The interpreter accepts code the GPU compiler rejects, so this is also the check
that the kernel is valid GPU code; and it sorts out spilling tiles before any GPU time is spent. Nothing here runs a kernel: speed still needs a GPU.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from selora.kernels import triton_lora
from selora.kernels.batch import LayerBatch
from selora.kernels.config import KernelConfig

ARCHS = {"sm_90": 90, "sm_80": 80}
_KERNELS = {"lora_linear": triton_lora._lora_linear_kernel, "lora_shrink": triton_lora._lora_shrink_kernel}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    arch: str
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    shared_bytes: int  # per program, as Triton allocates it
    tensor_cores: str  # how the dots are issued: "wgmma" (Hopper), "mma.sync" (Ampere), "none"
    seconds: float

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def as_dict(self) -> dict:
        return asdict(self) | {"spills": self.spills}


def _ptxas_report(ptx: str, capability: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        cmd = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(capability)}",
               src.name, "-o", "/dev/null"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    found = {
        "registers": re.search(r"Used (\d+) registers", log),
        "spill_stores": re.search(r"(\d+) bytes spill stores", log),
        "spill_loads": re.search(r"(\d+) bytes spill loads", log),
    }
    if not found["registers"]:
        raise RuntimeError(f"unexpected ptxas report:\n{log}")
    return {k: int(m.group(1)) if m else 0 for k, m in found.items()}


def compile_launch(launch: triton_lora.Launch, constexprs: dict, num_warps: int, num_stages: int, arch: str = "sm_90") -> Compiled:
    """Compile one launch with the given tile for ``arch``, as the JIT would at that launch."""
    capability = ARCHS[arch]
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = JITFunction(_KERNELS[launch.name])
    kwargs = launch.flags | constexprs | dict(num_warps=num_warps, num_stages=num_stages)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*launch.args, **kwargs)
    options, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    start = time.perf_counter()
    kernel = compile(ASTSource(fn, signature, consts, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return Compiled(launch.name, arch, shared_bytes=kernel.metadata.shared, tensor_cores=tensor_cores,
                    seconds=round(seconds, 2), **_ptxas_report(ptx, capability))


def compile_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch,
                  tuning: dict, arch: str = "sm_90", base_gemm: str | None = None) -> list[tuple[dict, Compiled]]:
    """Every launch of one layer call under every config of ``tuning`` (``selora.kernels.tuning``)."""
    config = KernelConfig("triton", base_gemm or tuning.get("base_gemm", "fused"), tuning["fused_shrink_max_rank"], tuning)
    _, launches = triton_lora.plan(x, weight, bias, layer, config)
    out = []
    for launch in launches:
        if launch.name == "lora_shrink":
            sh = tuning["shrink"]
            tile = {k: sh[k] for k in ("BLOCK_M", "BLOCK_K", "BLOCK_R")}
            out.append((tile, compile_launch(launch, tile, sh.get("num_warps", 4), sh.get("num_stages", 3), arch)))
            continue
        for cfg in tuning["configs"]:
            tile = {k: cfg[k] for k in triton_lora.TILE}
            out.append((cfg, compile_launch(launch, tile, cfg["num_warps"], cfg["num_stages"], arch)))
    return out


def toolchain_available() -> str | None:
    """None when Triton's NVIDIA backend and ptxas are usable here, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        subprocess.run([get_ptxas(90).path, "--version"], check=True, capture_output=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: no toolchain
        return f"Triton's NVIDIA toolchain is not usable here ({type(exc).__name__}: {exc})"
    if not hasattr(JITFunction, "_pack_args"):  # the JIT's specialisation is private API
        import triton

        return f"Triton {triton.__version__} lacks JITFunction._pack_args (written against 3.9)"
    return None
