"""CLIP prompt templates and the zero-shot classifier built from them (used by serving and eval)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selora.models.factory import Backbone

# The compact ImageNet ensemble of the CLIP authors' prompt-engineering notebook (also FLYP's).
TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@torch.no_grad()
def zero_shot_weights(backbone: Backbone, classnames: list[str], templates=TEMPLATES, encode_text=None) -> torch.Tensor:
    """``[n_classes, embed_dim]``: per class, the normalised mean of its normalised prompt embeddings.

    ``encode_text`` (tokens -> embeddings) defaults to the base model; the server passes one
    that runs the request's adapter.
    """
    encode_text = encode_text or backbone.encode_text
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = backbone.tokenize(prompts).to(backbone.device)
    emb = F.normalize(encode_text(tokens).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)
