"""Make torchvision importable on a CPU-only torch whose torchvision wheel was built for CUDA.

PyPI's torchvision ships a compiled ``_C.so`` for CUDA torch. On the CPU torch wheel that
library fails to load, and ``import torchvision`` then dies registering fake kernels for
``torchvision::nms``/``qnms``, operators that were never defined. open_clip and timm import
torchvision, so this module defines those two schemas (no kernels: selora never runs NMS)
before torchvision is imported, and only when its compiled ops really cannot load.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fragment: torch.library.Library | None = None


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to patch
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError):
        return False
    return True


def patch_torchvision() -> None:
    """Idempotent; must run before the first ``import torchvision``."""
    global _fragment
    if _fragment is not None or "torchvision" in sys.modules:
        return
    if _torchvision_ops_load():
        return
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        _fragment.define(schema)


patch_torchvision()
