"""Tuning data per GPU (``configs/<gpu>.json``): kernel tiles, shrink threshold, base-GEMM home.

Read once per device (``functools.cache``) when the ``KernelConfig`` is resolved.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")


def device_tuning_path(device_name: str) -> Path:
    """``configs/<slug of the GPU's name>.json``: that GPU's own tuning data (may not exist yet)."""
    return CONFIG_DIR / (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ".json")


@functools.cache
def tuning(device_name: str) -> dict:
    """Tuning data for a device: its own file if present, else the default (or interpreter) file."""
    path = device_tuning_path(device_name)
    if not path.exists():
        path = CONFIG_DIR / ("interpreter.json" if device_name == "interpreter" else "default.json")
    return json.loads(path.read_text()) | {"source": path.name}


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``interpreter`` for CPU tensors (Triton's interpreter)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


def tuning_for(device: torch.device) -> dict:
    return tuning(device_name(device))
