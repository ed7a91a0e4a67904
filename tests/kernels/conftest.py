"""Kernel tests run the real Triton kernel: compiled on CUDA, in Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` and ``SELORA_KERNEL`` are set per test (``monkeypatch``), never for the
whole pytest process: the kernel module picks the interpreter from the tensors' device when it
builds its kernels, so the order in which other test directories imported triton does not matter.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA GPU on this machine: the compiled-kernel cases (bf16 included) need one"


@pytest.fixture
def interpreter(monkeypatch):
    """Force the Triton backend; CPU tensors then run in Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SELORA_KERNEL", "triton")
    monkeypatch.delenv("SELORA_SPLIT_SHRINK_RANK", raising=False)
    monkeypatch.delenv("SELORA_BASE_GEMM", raising=False)
