"""``KernelConfig``: how adapted layers compute, resolved once at start-up and handed down.

The server resolves it from its settings (``--kernel``, ``--base-gemm``, ``--split-shrink-rank``,
or their ``SELORA_*`` variables, read in ``selora.server.settings`` only); a bad value is refused
there, before the model loads. Nothing on the per-layer path reads the environment: every
layer gets this object with its batch (``ModelBatch.config``).

- ``backend``: ``triton`` (the compiled kernel, CUDA), ``triton-interpret`` (the same kernel in
  Triton's CPU interpreter: tests), ``torch`` (the reference loop). The setting ``auto`` means
  Triton on CUDA, torch elsewhere; ``triton`` on a CPU device means the interpreter.
- ``base_gemm``: ``fused`` (x·W0ᵀ in the kernel's tiles) or ``library`` (torch's GEMM first);
  default: the device's tuning file.
- ``split_shrink_rank``: blocks of a larger rank use the split (two-launch) shrink; default:
  the tuning file's ``fused_shrink_max_rank``.
- ``tuning``: the device's tuning data (``selora.kernels.tuning``), read once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

from selora.kernels.tuning import tuning_for

BACKEND_SETTINGS = ("auto", "triton", "torch")
BACKENDS = ("triton", "triton-interpret", "torch")
BASE_GEMMS = ("fused", "library")  # where the base GEMM runs: in the Triton tile, or torch's (cuBLAS)


class KernelConfigError(ValueError):
    """A kernel setting that cannot run here; the message names the setting and why."""


@dataclass(frozen=True)
class KernelConfig:
    backend: str = "torch"
    base_gemm: str = "fused"
    split_shrink_rank: int = 32
    tuning: dict = field(default_factory=dict, compare=False)

    @classmethod
    def resolve(cls, device: torch.device | str, kernel: str = "auto", base_gemm: str | None = None,
                split_shrink_rank: int | None = None) -> "KernelConfig":
        """The configuration for tensors on ``device``; ``KernelConfigError`` if it cannot run."""
        dev = torch.device(device)
        kernel = (kernel or "auto").strip().lower()
        if kernel not in BACKEND_SETTINGS:
            raise KernelConfigError(f"kernel {kernel!r}: expected one of {', '.join(BACKEND_SETTINGS)}")
        triton_here = importlib.util.find_spec("triton") is not None
        if kernel == "triton" and not triton_here:
            raise KernelConfigError("kernel 'triton' but the triton package is not installed")
        if kernel == "torch" or (kernel == "auto" and not (dev.type == "cuda" and triton_here)):
            backend = "torch"
        elif dev.type == "cuda":
            if not torch.cuda.is_available():
                raise KernelConfigError("kernel 'triton' on cuda, but no CUDA GPU is visible")
            backend = "triton"
        elif dev.type == "cpu":
            backend = "triton-interpret"
        else:
            raise KernelConfigError(f"kernel 'triton' cannot run on {dev.type} tensors")
        data = tuning_for(dev) if backend != "torch" else {}
        base_gemm = base_gemm or data.get("base_gemm", "fused")
        if base_gemm not in BASE_GEMMS:
            raise KernelConfigError(f"base GEMM {base_gemm!r}: expected one of {', '.join(BASE_GEMMS)}")
        if split_shrink_rank is None:
            split_shrink_rank = data.get("fused_shrink_max_rank", 32)
        if split_shrink_rank < 0:
            raise KernelConfigError(f"split shrink rank must be >= 0, got {split_shrink_rank}")
        return cls(backend, base_gemm, int(split_shrink_rank), data)
