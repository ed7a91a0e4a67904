"""Resumable training state without pickle: tensors in one safetensors file, the rest in JSON.

``state.safetensors`` holds the trainable tensors (``param.<name>``), every optimiser's per-parameter
state (``opt<i>.<param index>.<key>``) and the torch RNG state; ``state.json`` the step counters,
the config and the optimisers' non-tensor per-parameter values. Both are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _flatten_optimizer(i: int, optimizer, tensors: dict, scalars: dict) -> None:
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            name = f"opt{i}.{idx}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().clone()
            else:
                scalars[name] = value


def _restore_optimizer(i: int, optimizer, tensors: dict, scalars: dict) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict] = {}
    prefix = f"opt{i}."
    for name, value in [*tensors.items(), *scalars.items()]:
        if name.startswith(prefix):
            idx, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    sd["state"] = state
    optimizer.load_state_dict(sd)


def save_state(directory: Path, params: dict[str, torch.Tensor], optimizer, score_optimizer, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().contiguous().clone() for k, v in params.items()}
    scalars: dict = {}
    for i, opt in enumerate((optimizer, score_optimizer)):
        if opt is not None:
            _flatten_optimizer(i, opt, tensors, scalars)
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = directory / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / STATE_TENSORS)
    tmp = directory / f".{STATE_JSON}.tmp"
    tmp.write_text(json.dumps({**meta, "optimizer_scalars": scalars}, indent=1))
    os.replace(tmp, directory / STATE_JSON)


def load_state(directory: Path, optimizer, score_optimizer):
    """``(params, meta)`` restored into the optimisers and the RNG, or None when there is no checkpoint."""
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        return None
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    scalars = meta.pop("optimizer_scalars", {})
    for i, opt in enumerate((optimizer, score_optimizer)):
        if opt is not None:
            _restore_optimizer(i, opt, tensors, scalars)
    torch.set_rng_state(tensors["rng.torch"])
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    return params, meta
