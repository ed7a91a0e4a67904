"""Compile (and autotune) the fused kernel for every batch the server can form, before ``/ready``.

On a GPU the first call of each kernel key (row bucket, site shape, LoRA/DoRA, fused/split
shrink) JIT-compiles the kernel and autotunes its tile; a request that met such a call would
wait for it (a minute or more on a fresh machine; Triton's disk caches make later starts fast).
``warm_up`` makes those calls at start-up instead: for each modality, each kernel variant (a
random adapter with every block active) and each batch size up to the server's largest, one
forward — images at the base's size and at every other size a stored adapter was trained at
(its rows run at that size: other token counts, other row buckets). An adapter uploaded later
at a size not seen yet compiles on its first batches. The torch backend has nothing to compile,
so there it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable

import torch
from PIL import Image

from selora.adapters.synthetic import random_adapter
from selora.kernels.config import KernelConfig
from selora.models.factory import Backbone
from selora.runtime.batch import forward_mixed
from selora.runtime.slots import DeviceSlots

log = logging.getLogger("selora.warmup")
# (variant, rank): one adapter per kernel specialisation (DoRA or not × shrink fused or split).
VARIANTS = (("lora", 16), ("dora", 16), ("lora", 64), ("dora", 64))


def sample_inputs(backbone: Backbone, modality: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One preprocessed input of ``modality`` (images at ``size``, default the base's), as the
    server would batch it."""
    if modality == "image":
        image = Image.new("RGB", (256, 256), (127, 127, 127))
        return backbone.preprocess(image) if size is None else backbone.sizes.transform(size)(image)
    return backbone.tokenize(["warm-up"])[0]


def device_sample(backbone: Backbone, modality: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``sample_inputs`` on the backbone's device, images in its dtype."""
    one = sample_inputs(backbone, modality, size).to(backbone.device)
    return one.to(backbone.dtype) if one.is_floating_point() else one


@torch.inference_mode()
def warm_up(backbone: Backbone, max_batch_size: int, config: KernelConfig, force: bool = False,
            sizes: Iterable[tuple[int, int]] = ()) -> int:
    """Run every (modality and image size, variant, batch size) once; returns the forwards run
    (0: nothing to compile). ``sizes``: image sizes besides the base's (stored adapters').

    The warm-up adapters live in slots of their own, freed afterwards. ``force`` runs even when
    the backend compiles nothing (tests use it with the interpreter)."""
    if config.backend != "triton" and not force:
        return 0
    every_block = list(backbone.blocks)
    sparse = [random_adapter(backbone.blocks, every_block, rank, variant, base_model=backbone.model_id) for variant, rank in VARIANTS]
    slots = DeviceSlots.holding(backbone, sparse)
    adapters = [slots.load(a) for a in sparse]
    runs = 0
    extra = sorted({tuple(s) for s in sizes} - {tuple(backbone.input_size)}) if "image" in backbone.modalities else []
    for modality, size in [(m, None) for m in backbone.modalities] + [("image", s) for s in extra]:
        one = device_sample(backbone, modality, size)
        with backbone.sizes.at(size) if size is not None else contextlib.nullcontext():
            for (variant, rank), adapter in zip(VARIANTS, adapters):
                log.info("warm-up: %s tower%s, %s r%d, batches 1..%d", modality, "" if size is None else f" at {list(size)} px",
                         variant, rank, max_batch_size)
                for n in range(1, max_batch_size + 1):
                    forward_mixed(backbone, one.expand(n, *one.shape), [adapter], [0] * n, modality, config)
                    runs += 1
    return runs
