"""The whole mixed-batch model path with the Triton kernel forced on (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from selora.adapters import export_adapter, inject
from selora.kernels import triton_lora
from selora.kernels.config import KernelConfig
from selora.runtime.batch import forward_mixed
from tests.helpers import make_adapter, resident

TORCH, TRITON = KernelConfig.resolve("cpu", "torch"), KernelConfig.resolve("cpu", "triton")  # triton on CPU: the interpreter


@pytest.mark.parametrize("backbone_name", ["tiny_vit", "tiny_clip"])
def test_embeddings_with_kernel_equal_torch_path(backbone_name, request):
    bb = request.getfixturevalue(backbone_name)
    inject(bb)
    blocks = list(bb.blocks)
    specs = [("lora", 4, blocks[::3]), ("dora", 8, blocks[1::4]), ("lora", 48, blocks[2::5])]
    adapters = resident(bb, *[export_adapter(make_adapter(bb, v, r, act, seed=i), bb.model_id, bb.fingerprint)
                              for i, (v, r, act) in enumerate(specs)])
    rows = [1, -1, 0, 2, 0, 1]
    x = torch.randn(len(rows), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = forward_mixed(bb, x, adapters, rows, config=TORCH)
    before = triton_lora.launch_count()
    fused = forward_mixed(bb, x, adapters, rows, config=TRITON)
    assert triton_lora.launch_count() > before
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)


def test_text_tower_with_kernel_equals_torch_path(tiny_clip):
    inject(tiny_clip)
    blocks = [b for b in tiny_clip.blocks if b.startswith("text.")]
    [adapter] = resident(tiny_clip, export_adapter(make_adapter(tiny_clip, "dora", 4, blocks[::2]), tiny_clip.model_id,
                                                   tiny_clip.fingerprint))
    tokens = tiny_clip.tokenize(["a photo of a cat", "a dog", "a bird"])
    reference = forward_mixed(tiny_clip, tokens, [adapter], [0, -1, 0], modality="text", config=TORCH)
    fused = forward_mixed(tiny_clip, tokens, [adapter], [0, -1, 0], modality="text", config=TRITON)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)


def test_the_layer_path_reads_no_environment(tiny_vit, monkeypatch):
    """The kernel configuration comes resolved; no selora frame reads ``os.environ`` during a forward."""
    import os
    import sys

    reads = []

    class Watched(dict):
        def _note(self, key):
            frame = sys._getframe(2)
            while frame is not None:
                if f"{os.sep}selora{os.sep}" in frame.f_code.co_filename:
                    reads.append((key, frame.f_code.co_filename, frame.f_lineno))
                    break
                frame = frame.f_back

        def get(self, key, default=None):
            self._note(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self._note(key)
            return super().__getitem__(key)

    inject(tiny_vit)
    [adapter] = resident(tiny_vit, export_adapter(make_adapter(tiny_vit, "dora", 20, list(tiny_vit.blocks)[::2]), tiny_vit.model_id,
                                                  tiny_vit.fingerprint))
    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(os, "environ", Watched(os.environ))
    for config in (TORCH, TRITON):
        forward_mixed(tiny_vit, x, [adapter], [0, -1], config=config)
    assert reads == []
