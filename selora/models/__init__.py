"""Base backbones (open_clip CLIP, timm ViT/DINO, DINOv2) and their block tables.

Names are imported on first use, so that reading the model catalog (``selora serve --help``)
does not import torch.
"""

import importlib

_EXPORTS = {
    "KINDS": "blocks", "BlockSpec": "blocks", "BlockTable": "blocks", "fingerprint": "blocks",
    "DEFAULT_MODEL": "catalog", "ModelError": "catalog", "list_models": "catalog",
    "Backbone": "factory", "load_backbone": "factory",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'selora.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"selora.models.{_EXPORTS[name]}"), name)
