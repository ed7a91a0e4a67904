"""Wrap every block site of a backbone in ``AdaptedLinear`` and attach trainable adapters."""

from __future__ import annotations

import contextlib

from torch import nn

from selora.adapters.layer import AdaptedLinear
from selora.adapters.lora import GatedAdapter
from selora.models.factory import Backbone


def inject(backbone: Backbone) -> dict[str, AdaptedLinear]:
    """Idempotent: wraps each site's ``nn.Linear`` once; returns ``site -> AdaptedLinear``."""
    done = backbone.meta.get("adapted_layers")
    if done:  # already wrapped (and not a copy sharing ``meta`` with another model): one lookup
        site, layer = next(iter(done.items()))
        if backbone.model.get_submodule(site) is layer:
            return done
    layers = {}
    for site, specs in backbone.blocks.sites().items():
        module = backbone.model.get_submodule(site)
        if not isinstance(module, AdaptedLinear):
            parent, _, child = site.rpartition(".")
            module = AdaptedLinear(module, site, specs)
            setattr(backbone.model.get_submodule(parent), child, module)
        layers[site] = module
    backbone.meta["adapted_layers"] = layers
    return layers


def adapted_layers(model: nn.Module) -> list[AdaptedLinear]:
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


def attach(backbone: Backbone, adapter: GatedAdapter) -> None:
    """Route the backbone's adapted layers through ``adapter`` (training / in-process use)."""
    inject(backbone)
    for layer in adapted_layers(backbone.model):
        layer.adapter = adapter


def detach(backbone: Backbone) -> None:
    for layer in adapted_layers(backbone.model):
        layer.adapter = None


@contextlib.contextmanager
def attached(backbone: Backbone, adapter: GatedAdapter):
    attach(backbone, adapter)
    try:
        yield adapter
    finally:
        detach(backbone)
