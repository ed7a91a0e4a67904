"""Base backbones (open_clip CLIP, timm ViT/DINO, DINOv2) and their block tables."""

from selora.models.blocks import KINDS, BlockSpec, BlockTable, fingerprint
from selora.models.factory import DEFAULT_MODEL, Backbone, ModelError, list_models, load_backbone

__all__ = [
    "KINDS", "BlockSpec", "BlockTable", "fingerprint",
    "DEFAULT_MODEL", "Backbone", "ModelError", "list_models", "load_backbone",
]
