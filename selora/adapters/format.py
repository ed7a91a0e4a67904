"""Adapter file format v1 (DESIGN.md): ``adapter_config.json`` + ``adapter_model.safetensors``.

Only active blocks are stored, so a file grows with active blocks, not with all blocks. Loading
validates everything and raises one typed error per kind of problem; only safetensors is read,
never a pickle.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from selora.models.blocks import KINDS, BlockTable

FORMAT = "selora-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AdapterError(ValueError):
    """Base of every adapter validation error; the message names the problem."""


class AdapterNotFoundError(AdapterError):
    pass


class ConfigFileError(AdapterError):
    pass


class FormatVersionError(AdapterError):
    pass


class BaseModelMismatchError(AdapterError):
    pass


class UnknownBlockError(AdapterError):
    pass


class ShapeError(AdapterError):
    pass


class DtypeError(AdapterError):
    pass


class NonFiniteError(AdapterError):
    pass


class MissingTensorError(AdapterError):
    pass


class UnexpectedTensorError(AdapterError):
    pass


class CorruptFileError(AdapterError):
    pass


@dataclass
class BlockWeights:
    lora_A: torch.Tensor  # [r, d_in]
    lora_B: torch.Tensor  # [d_out, r]
    magnitude: torch.Tensor | None = None  # [d_out], DoRA only


# What a classification head applies to: the embedding as served ("raw", the ``classify``
# recipe trains it so), or its L2-normalised form ("normalized": a CLIP zero-shot head, whose
# weights are unit text embeddings times the logit scale). Absent means "raw".
HEAD_INPUTS = ("raw", "normalized")


def head_logits(weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor, head_input: str) -> torch.Tensor:
    """The head's logits for ``feats`` [n, embed_dim], in fp32."""
    feats = feats.float()
    if head_input == "normalized":
        feats = torch.nn.functional.normalize(feats, dim=-1)
    return feats @ weight.float().t() + bias.float()


@dataclass
class SparseAdapter:
    """A validated adapter in host memory: only its active blocks."""

    base_model: str
    base_fingerprint: str
    variant: str
    r: int
    lora_alpha: float
    blocks: dict[str, BlockWeights]
    gate: dict = field(default_factory=dict)
    head_classes: list[str] | None = None
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    head_input: str = "raw"  # what the head applies to: one of HEAD_INPUTS

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.tensors().items() if not k.startswith("head."))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for b, w in self.blocks.items():
            out[f"{b}.lora_A"], out[f"{b}.lora_B"] = w.lora_A, w.lora_B
            if w.magnitude is not None:
                out[f"{b}.magnitude"] = w.magnitude
        if self.head_weight is not None:
            out["head.weight"], out["head.bias"] = self.head_weight, self.head_bias
        return out

    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "variant": self.variant,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "blocks": list(self.blocks),
            "gate": self.gate,
            "head": None if self.head_classes is None else {"classes": self.head_classes, "input": self.head_input},
        }


# -- writing ------------------------------------------------------------------------------
def save_adapter(adapter: SparseAdapter, directory: str | Path) -> Path:
    """Write both files atomically (temp file + rename, each) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.tensors().items()}
    _atomic_write(directory / WEIGHTS_NAME, save_safetensors(tensors, metadata={"format": FORMAT}))
    _atomic_write(directory / CONFIG_NAME, json.dumps(adapter.config_dict(), indent=2).encode())
    return directory


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- reading ------------------------------------------------------------------------------
def load_adapter(directory: str | Path, table: BlockTable | None = None) -> SparseAdapter:
    """Read and validate an adapter directory (against ``table`` when given)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterNotFoundError(f"{directory}: no such adapter directory")
    files = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise AdapterNotFoundError(f"{directory}: {name} is missing")
        files[name] = (directory / name).read_bytes()
    return parse_adapter(files[CONFIG_NAME], files[WEIGHTS_NAME], table)


def parse_adapter(config_bytes: bytes, weights_bytes: bytes, table: BlockTable | None = None) -> SparseAdapter:
    """Validate the two files' contents; raises an ``AdapterError`` subclass naming the problem."""
    cfg = _parse_config(config_bytes)
    if table is not None and cfg["base_fingerprint"] != table.fingerprint:
        raise BaseModelMismatchError(
            f"adapter is for base {cfg['base_model']!r} (fingerprint {cfg['base_fingerprint']}), "
            f"not this base (fingerprint {table.fingerprint})"
        )
    tensors = _parse_weights(weights_bytes)
    r, variant = cfg["r"], cfg["variant"]
    blocks: dict[str, BlockWeights] = {}
    expected = set()
    for b in cfg["blocks"]:
        _check_block_id(b, table)
        names = [f"{b}.lora_A", f"{b}.lora_B"] + ([f"{b}.magnitude"] if variant == "dora" else [])
        missing = [n for n in names if n not in tensors]
        if missing:
            raise MissingTensorError(f"tensor {missing[0]} is missing for active block {b}")
        expected.update(names)
        a, bm = tensors[f"{b}.lora_A"], tensors[f"{b}.lora_B"]
        mag = tensors.get(f"{b}.magnitude") if variant == "dora" else None
        d_out, d_in = (table[b].d_out, table[b].d_in) if table is not None else (bm.shape[0], a.shape[-1])
        _check_shape(f"{b}.lora_A", a, (r, d_in))
        _check_shape(f"{b}.lora_B", bm, (d_out, r))
        if mag is not None:
            _check_shape(f"{b}.magnitude", mag, (d_out,))
        blocks[b] = BlockWeights(a, bm, mag)
    head = cfg["head"]
    weight = bias = None
    if head is not None:
        classes = head.get("classes") if isinstance(head, dict) else None
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise ConfigFileError("head.classes must be a non-empty list of class names")
        if head.get("input", "raw") not in HEAD_INPUTS:
            raise ConfigFileError(f"head.input must be one of {list(HEAD_INPUTS)}, got {head.get('input')!r}")
        for n in ("head.weight", "head.bias"):
            if n not in tensors:
                raise MissingTensorError(f"tensor {n} is missing for the classification head")
        weight, bias = tensors["head.weight"], tensors["head.bias"]
        if weight.dim() != 2 or weight.shape[0] != len(classes):
            raise ShapeError(f"head.weight has shape {list(weight.shape)}, expected [{len(classes)}, embed_dim]")
        _check_shape("head.bias", bias, (len(classes),))
        expected.update(("head.weight", "head.bias"))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UnexpectedTensorError(f"unexpected tensor {extra[0]} (not an active block of this adapter)")
    return SparseAdapter(
        cfg["base_model"], cfg["base_fingerprint"], variant, r, float(cfg["lora_alpha"]), blocks,
        cfg.get("gate") or {}, head["classes"] if head else None, weight, bias,
        head.get("input", "raw") if head else "raw",
    )


def _parse_config(data: bytes) -> dict:
    try:
        cfg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigFileError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigFileError(f"{CONFIG_NAME} must hold a JSON object")
    if cfg.get("format") != FORMAT:
        raise FormatVersionError(f"format is {cfg.get('format')!r}, expected {FORMAT!r}")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise FormatVersionError(f"format_version {cfg.get('format_version')!r} is not supported (this reads {FORMAT_VERSION})")
    for key, kind in (("base_model", str), ("base_fingerprint", str), ("variant", str), ("blocks", list)):
        if not isinstance(cfg.get(key), kind):
            raise ConfigFileError(f"{CONFIG_NAME}: field {key!r} must be a {kind.__name__}")
    if cfg["variant"] not in ("lora", "dora"):
        raise ConfigFileError(f"variant must be 'lora' or 'dora', got {cfg['variant']!r}")
    r = cfg.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ConfigFileError(f"r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ConfigFileError(f"lora_alpha must be a positive number, got {alpha!r}")
    if len(set(cfg["blocks"])) != len(cfg["blocks"]) or not all(isinstance(b, str) for b in cfg["blocks"]):
        raise ConfigFileError("blocks must be a list of distinct block ids")
    if not isinstance(cfg.get("gate", {}), (dict, type(None))):
        raise ConfigFileError("gate must be an object")
    cfg.setdefault("head", None)
    return cfg


def _parse_weights(data: bytes) -> dict[str, torch.Tensor]:
    # A safetensors file starts with its header's length (u64, little-endian) and then "{": a
    # length whose low byte is 0x80 is still safetensors, not a pickle's protocol opcode.
    if data[8:9] != b"{" and (data[:1] == b"\x80" or data[:2] == b"PK"):
        raise CorruptFileError(f"{WEIGHTS_NAME} looks like a pickle/zip checkpoint; only safetensors is read")
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error type for every malformed header
        raise CorruptFileError(f"{WEIGHTS_NAME} is not a valid safetensors file ({e})") from None
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise DtypeError(f"tensor {name} has dtype {t.dtype}; allowed: float32, float16, bfloat16")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"tensor {name} holds NaN or Inf")
    return tensors


def _check_block_id(block_id: str, table: BlockTable | None) -> None:
    if table is not None:
        if block_id not in table:
            raise UnknownBlockError(f"block {block_id!r} does not exist in this base model")
        return
    parts = block_id.split(".")
    if len(parts) != 3 or parts[0] not in ("vision", "text") or not parts[1].isdigit() or parts[2] not in KINDS:
        raise UnknownBlockError(f"{block_id!r} is not a block id (<vision|text>.<layer>.<{'|'.join(KINDS)}>)")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ShapeError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
