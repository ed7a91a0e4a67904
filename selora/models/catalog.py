"""The named models (``configs/*.json``) as data, readable without importing torch.

``selora serve --help`` lists them from here, so this module imports nothing heavy.
"""

from __future__ import annotations

import json
from importlib import resources

DEFAULT_MODEL = "dinov2-small"


class ModelError(ValueError):
    """Unknown model id or unusable weights."""


def _config_dir():
    return resources.files("selora.models") / "configs"


def list_models() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _config_dir().iterdir() if p.name.endswith(".json"))


def named_config(name: str) -> dict:
    path = _config_dir() / f"{name}.json"
    if not path.is_file():
        raise ModelError(f"unknown model {name!r}; named models: {list_models()}, or open_clip:<config>, timm:<name>")
    return json.loads(path.read_text())


def has_random_weights(name: str) -> bool:
    """A named model with no weights of its own (random init, for tests)."""
    return named_config(name).get("weights") is None
