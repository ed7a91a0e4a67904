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
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from selora import safejson
from selora.adapters.lora import dora_norm
from selora.models.blocks import KINDS, BlockTable

FORMAT = "selora-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Limits on what a client may hand the validator; each is far above any real adapter.
MAX_CONFIG_BYTES = 256 * 1024
CONFIG_JSON = safejson.JSONLimits(max_depth=8, max_number_chars=40)
MAX_HEADER_BYTES = 1 << 20  # safetensors JSON header
HEADER_JSON = safejson.JSONLimits(max_depth=4, max_number_chars=20)
MAX_TENSORS = 4096  # without a block table; with one: 3 per block + the head's two
MAX_RANK = 1024
MAX_CLASSES, MAX_CLASS_NAME_CHARS = 100_000, 256


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


class AdapterLimitError(AdapterError):
    """A config or header over one of the limits above."""


class ServingError(AdapterError):
    """An adapter valid on paper that cannot serve on this base in its serving dtype."""


@dataclass(frozen=True)
class ServingTarget:
    """What an adapter must fit to serve: the base's embedding width, its serving dtype and
    (for DoRA) its base weights."""

    embed_dim: int
    dtype: torch.dtype
    base_weight: Callable[[str], torch.Tensor]  # block id -> W0 [d_out, d_in]

    @classmethod
    def of(cls, backbone) -> "ServingTarget":
        def base_weight(block_id: str) -> torch.Tensor:
            spec = backbone.blocks[block_id]
            return backbone.model.get_submodule(spec.site).weight[spec.out_start : spec.out_start + spec.d_out]

        return cls(backbone.embed_dim, backbone.dtype, base_weight)


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
    input_size: tuple[int, int] | None = None  # [H, W] it was trained at; None: the base's size
    preprocessing: dict | None = None  # the eval transform at input_size, as recorded (informative)

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
        } | ({} if self.input_size is None else {"input_size": list(self.input_size), "preprocessing": self.preprocessing})


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
def load_adapter(directory: str | Path, table: BlockTable | None = None, serving: ServingTarget | None = None) -> SparseAdapter:
    """Read and validate an adapter directory (against ``table`` and ``serving`` when given).
    Messages name the directory by its last component only."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterNotFoundError(f"{directory.name}: no such adapter directory")
    files = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise AdapterNotFoundError(f"{directory.name}: {name} is missing")
        files[name] = (directory / name).read_bytes()
    return parse_adapter(files[CONFIG_NAME], files[WEIGHTS_NAME], table, serving)


def parse_adapter(
    config_bytes: bytes, weights_bytes: bytes, table: BlockTable | None = None, serving: ServingTarget | None = None
) -> SparseAdapter:
    """Validate the two files' contents; raises an ``AdapterError`` subclass naming the problem.
    With ``serving`` it also proves the adapter serves on that base in its dtype."""
    cfg = _parse_config(config_bytes, table)
    tensors = _parse_weights(weights_bytes, MAX_TENSORS if table is None else 3 * len(table) + 2)
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
        if not (isinstance(classes, list) and 0 < len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes)):
            raise ConfigFileError(f"head.classes must be a list of 1 to {MAX_CLASSES} class names")
        if len(set(classes)) != len(classes) or not all(0 < len(c) <= MAX_CLASS_NAME_CHARS for c in classes):
            raise ConfigFileError(f"head.classes must be distinct names of 1 to {MAX_CLASS_NAME_CHARS} characters")
        if not isinstance(head.get("input", "raw"), str) or head.get("input", "raw") not in HEAD_INPUTS:
            raise ConfigFileError(f"head.input must be one of {list(HEAD_INPUTS)}")
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
    adapter = SparseAdapter(
        cfg["base_model"], cfg["base_fingerprint"], variant, r, float(cfg["lora_alpha"]), blocks,
        cfg.get("gate") or {}, head["classes"] if head else None, weight, bias,
        head.get("input", "raw") if head else "raw", cfg["input_size"], cfg.get("preprocessing"),
    )
    if serving is not None:
        check_serving(adapter, serving)
    return adapter


@torch.no_grad()
def check_serving(adapter: SparseAdapter, target: ServingTarget) -> None:
    """Prove ``adapter`` serves on ``target``: the head fits the embedding, and every factor the
    runtime computes (A, B, ``scale·B·A``, DoRA's ``m / ‖W0 + scale·B·A‖``, the head) is finite in
    the serving dtype, computed as ``selora.runtime.batch.to_device`` computes it."""

    def finite(name: str, t: torch.Tensor) -> None:
        if not torch.isfinite(t.to(target.dtype)).all():
            raise ServingError(f"{name} is not finite in {str(target.dtype).removeprefix('torch.')}, the serving dtype")

    if adapter.head_weight is not None:
        if adapter.head_weight.shape[1] != target.embed_dim:
            raise ServingError(f"head.weight is {list(adapter.head_weight.shape)}; this base's embedding width is {target.embed_dim}")
        finite("head.weight", adapter.head_weight)
        finite("head.bias", adapter.head_bias)
    for b, w in adapter.blocks.items():
        a, bm = w.lora_A.float(), w.lora_B.float()
        finite(f"{b}.lora_A", a)
        finite(f"{b}.lora_B", bm)
        finite(f"{b}: scale·B·A", adapter.scale * (bm @ a))
        if w.magnitude is not None:
            w0 = target.base_weight(b).float().cpu()
            finite(f"{b}: DoRA factor m/‖W0 + scale·B·A‖", w.magnitude.float() / dora_norm(w0, a, bm, adapter.scale))


def _parse_config(data: bytes, table: BlockTable | None) -> dict:
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterLimitError(f"{CONFIG_NAME} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        cfg = safejson.loads(data, CONFIG_JSON, CONFIG_NAME)
    except safejson.JSONLimitError as e:
        raise AdapterLimitError(str(e)) from None
    except safejson.JSONInputError as e:
        raise ConfigFileError(str(e)) from None
    if not isinstance(cfg, dict):
        raise ConfigFileError(f"{CONFIG_NAME} must hold a JSON object")
    if cfg.get("format") != FORMAT:
        raise FormatVersionError(f"format is {_shown(cfg.get('format'))}, expected {FORMAT!r}")
    if cfg.get("format_version") != FORMAT_VERSION or isinstance(cfg.get("format_version"), bool):
        raise FormatVersionError(f"format_version {_shown(cfg.get('format_version'))} is not supported (this reads {FORMAT_VERSION})")
    for key, kind in (("base_model", str), ("base_fingerprint", str), ("variant", str), ("blocks", list)):
        if not isinstance(cfg.get(key), kind):
            raise ConfigFileError(f"{CONFIG_NAME}: field {key!r} must be a {kind.__name__}")
    if table is not None and cfg["base_fingerprint"] != table.fingerprint:
        raise BaseModelMismatchError(
            f"adapter is for base {cfg['base_model'][:80]!r} (fingerprint {cfg['base_fingerprint'][:80]}), "
            f"not this base (fingerprint {table.fingerprint})"
        )
    if cfg["variant"] not in ("lora", "dora"):
        raise ConfigFileError(f"variant must be 'lora' or 'dora', got {cfg['variant'][:32]!r}")
    r = cfg.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_RANK):
        raise ConfigFileError(f"r must be an integer from 1 to {MAX_RANK}, got {_shown(r)}")
    alpha = cfg.get("lora_alpha")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ConfigFileError(f"lora_alpha must be a positive finite number, got {_shown(alpha)}")
    blocks = cfg["blocks"]
    if not all(isinstance(b, str) for b in blocks) or len(set(blocks)) != len(blocks):
        raise ConfigFileError("blocks must be a list of distinct block ids (strings)")
    if table is not None and len(blocks) > len(table):
        raise AdapterLimitError(f"{len(blocks)} blocks; this base has {len(table)}")
    gate = cfg.get("gate")
    if gate is not None:
        _check_gate(gate, table)
    cfg.setdefault("head", None)
    if cfg["head"] is not None and not isinstance(cfg["head"], dict):
        raise ConfigFileError("head must be null or an object")
    size = cfg.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ConfigFileError(f"input_size must be [height, width] in pixels, got {size!r}")
    cfg["input_size"] = None if size is None else tuple(size)
    if not isinstance(cfg.get("preprocessing", {}), (dict, type(None))):
        raise ConfigFileError("preprocessing must be an object")
    return cfg


def _shown(value) -> str:
    """A client's value in a message, shortened."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_gate(gate, table: BlockTable | None) -> None:
    if not isinstance(gate, dict):
        raise ConfigFileError("gate must be an object")
    scores = gate.get("scores", {})
    if not isinstance(scores, dict):
        raise ConfigFileError("gate.scores must be an object of block id -> score")
    limit = len(table) if table is not None else MAX_TENSORS
    if len(scores) > limit:
        raise AdapterLimitError(f"gate.scores holds {len(scores)} entries; at most {limit} (one per block)")
    for b, score in scores.items():
        _check_block_id(b, table)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ConfigFileError(f"gate.scores[{b!r}] must be a finite number")


def _read_header(data: bytes, max_tensors: int) -> dict:
    """The safetensors JSON header, parsed here (bounded, duplicate keys refused) before the
    bytes go to safetensors."""
    if len(data) < 8:
        raise CorruptFileError(f"{WEIGHTS_NAME} is too short to be a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES:
        raise AdapterLimitError(f"{WEIGHTS_NAME} declares a {size}-byte header; the limit is {MAX_HEADER_BYTES}")
    if 8 + size > len(data):
        raise CorruptFileError(f"{WEIGHTS_NAME}: header runs past the end of the file")
    raw = data[8 : 8 + size]
    if raw.count(b'"data_offsets"') > max_tensors:  # one per tensor: a cheap bound before parsing
        raise AdapterLimitError(f"{WEIGHTS_NAME} holds over {max_tensors} tensors, the limit")
    try:
        header = safejson.loads(raw, HEADER_JSON, f"{WEIGHTS_NAME} header")
    except safejson.JSONInputError as e:
        raise CorruptFileError(str(e)) from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{WEIGHTS_NAME} header must be a JSON object")
    count = len(header) - ("__metadata__" in header)
    if count > max_tensors:
        raise AdapterLimitError(f"{WEIGHTS_NAME} holds {count} tensors; the limit is {max_tensors}")
    return header


def _parse_weights(data: bytes, max_tensors: int) -> dict[str, torch.Tensor]:
    try:  # safetensors never unpickles; its header length (u64 LE) may well start with 0x80 or "PK"
        _read_header(data, max_tensors)
        tensors = load_safetensors(data)
    except Exception as e:  # our header checks, or safetensors' own error for a malformed file
        if data[8:9] != b"{" and (data[:1] == b"\x80" or data[:2] == b"PK"):  # no JSON header follows: a pickle/zip
            raise CorruptFileError(f"{WEIGHTS_NAME} looks like a pickle/zip checkpoint; only safetensors is read") from None
        if isinstance(e, AdapterError):
            raise
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
            raise UnknownBlockError(f"block {block_id[:80]!r} does not exist in this base model")
        return
    parts = block_id.split(".")
    if len(parts) != 3 or parts[0] not in ("vision", "text") or not parts[1].isdecimal() or len(parts[1]) > 4 or parts[2] not in KINDS:
        raise UnknownBlockError(f"{block_id[:80]!r} is not a block id (<vision|text>.<layer>.<{'|'.join(KINDS)}>)")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ShapeError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
