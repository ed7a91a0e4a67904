"""Hugging Face PEFT LoRA/DoRA adapters in and out, block pruning, and the merged export.

A PEFT adapter is ``adapter_config.json`` (``"peft_type": "LORA"``) plus
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` ``[r, d_in]``,
``….lora_B.weight`` ``[d_out, r]`` and, for DoRA, ``….lora_magnitude_vector`` ``[d_out]``: plain
safetensors and JSON, so reading one needs no ``peft`` import. PEFT modules and selora sites:

- timm ViT / DINOv2: ``blocks.i.attn.qkv`` (q/k/v), ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``;
- open_clip: ``….resblocks.i.attn`` (PEFT's ``nn.MultiheadAttention`` layer: its own
  ``lora_A``/``lora_B`` adapt ``in_proj`` = q/k/v, and ``….attn.base_layer.out_proj`` adapts
  ``out_proj`` with the same rank and alpha), ``mlp.c_fc``, ``mlp.c_proj``. PEFT applies that
  out_proj delta twice (``MHA_OUT_PROJ_FACTOR``): conversions keep what the PEFT model computes.

**Ranks.** A selora adapter has one rank ``R`` and one ``lora_alpha``; a PEFT adapter has a
rank and a scale per module (``rank_pattern``, ``alpha_pattern``, ``use_rslora``). Import takes
``R`` = the largest module rank and ``lora_alpha = R`` (scale 1): each module's ``A`` gets zero
rows up to ``R``, its ``B`` zero columns, and its own scale (``alpha/r``, or ``alpha/√r`` with
rsLoRA) is folded into ``B``. A fused ``qkv`` LoRA becomes q, k and v blocks that share its ``A``
and take their rows of ``B`` (and of the DoRA magnitude, which is per output row); each block
keeps only the rank components its rows of ``B`` use, and a LoRA block whose rows of ``B`` are
all zero (no update at all) is left out: exact, as zero rank components add nothing. Export stacks the blocks of one fused module instead: ``n``
blocks give ``A = [A_q; A_k; …]`` ``[n·R, d_in]`` and a block-diagonal ``B``, rank ``n·R`` and
alpha ``n·lora_alpha`` in ``rank_pattern``/``alpha_pattern`` (same scale ``lora_alpha/R``);
rows of a q/k/v slice without a block get ``B = 0`` and, for DoRA, the base rows' own norm as
magnitude, so they stay exactly ``W0``.

**Refused** (``PeftConversionError``, a 422 on upload): tuner types other than LoRA, trained
biases (``bias`` not ``"none"``, ``lora_bias``), embedding or other non-block modules,
``modules_to_save`` other than a timm ``head``, forward-changing LoRA options selora does not
implement, pattern keys that are not plain module names; on export, DoRA on open_clip attention
and a head on open_clip (PEFT has no place for either).

**Pruning.** ``prune`` keeps the blocks with the largest ``‖ΔW‖_F`` (``ΔW`` = the block's
merged weight minus ``W0``, so DoRA's rescaling counts) and reports the kept share of
``Σ‖ΔW‖²_F``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from selora.adapters.format import (
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    AdapterError,
    BlockWeights,
    SparseAdapter,
    _parse_weights,
    parse_adapter,
)
from selora.adapters.merge import merged_block_weight
from selora.models.blocks import BlockSpec
from selora.models.factory import Backbone

PREFIX = "base_model.model."
HEAD = "head"  # the timm classification head, the one module_to_save selora takes
# LoRA options that change the forward in ways selora does not implement (must be unset/false).
UNSUPPORTED_OPTIONS = (
    "lora_bias", "fan_in_fan_out", "layer_replication", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config", "monteclora_config", "use_qalora",
    "megatron_config",
)
# PEFT's MultiheadAttention layer adds its out_proj delta twice, in forward and in merge (it writes
# W + ΔW into out_proj's base weight, then calls out_proj's own merge, which adds ΔW again; seen
# in peft 0.21.2 and pinned by a test): the model a user trained computes W + 2·ΔW there.
MHA_OUT_PROJ_FACTOR = 2
PATTERN_KEY = re.compile(r"[\w.\\^$|()-]{1,300}")  # module names, escaped or anchored: no quantifiers
MAX_PATTERN_KEYS = 1024  # per rank_pattern / alpha_pattern: each key is matched against every module


class PeftConversionError(AdapterError):
    """A PEFT adapter selora cannot represent, or a selora adapter PEFT cannot."""


def is_peft_config(config_bytes: bytes) -> bool:
    """PEFT's ``adapter_config.json`` names its ``peft_type``; selora's names its ``format``."""
    try:
        cfg = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(cfg, dict) and "peft_type" in cfg and cfg.get("format") != FORMAT


# -- module names ---------------------------------------------------------------------------
def peft_modules(backbone: Backbone) -> dict[str, str]:
    """PEFT module name -> the selora site it adapts."""
    out = {}
    for site in backbone.blocks.sites():
        if backbone.library == "open_clip" and site.endswith(".attn.in_proj"):
            out[site.removesuffix(".in_proj")] = site
        elif backbone.library == "open_clip" and site.endswith(".attn.out_proj"):
            out[site.replace(".attn.out_proj", ".attn.base_layer.out_proj")] = site
        else:
            out[site] = site
    return out


def _pattern_module(module: str) -> str:
    """The module whose rank/alpha pattern applies (open_clip's out_proj follows its attention)."""
    return module.removesuffix(".base_layer.out_proj")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# -- PEFT -> selora -------------------------------------------------------------------------
def _peft_config(config_bytes: bytes) -> dict:
    try:
        cfg = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PeftConversionError(f"{CONFIG_NAME} is not valid JSON: {_short(str(e))}") from None
    if not isinstance(cfg, dict):
        raise PeftConversionError(f"{CONFIG_NAME} must hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise PeftConversionError(f"PEFT adapter type {_short(cfg.get('peft_type'))} cannot be served: selora serves LORA (and DoRA)")
    if cfg.get("bias", "none") != "none":
        raise PeftConversionError(f"PEFT bias={_short(cfg['bias'])} trains biases; selora adapters hold no biases")
    for option in UNSUPPORTED_OPTIONS:
        if cfg.get(option):
            raise PeftConversionError(f"PEFT option {option}={_short(cfg[option])} is not supported by selora")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(field) or {}
        if not isinstance(patterns, dict) or len(patterns) > MAX_PATTERN_KEYS:
            raise PeftConversionError(f"{field} must be an object of at most {MAX_PATTERN_KEYS} module names")
        for key, value in patterns.items():
            if not PATTERN_KEY.fullmatch(key) or not _compiles(key):
                raise PeftConversionError(f"{field} key {_short(key)} is not a module name (regex quantifiers are not accepted)")
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
                raise PeftConversionError(f"{field}[{key!r}] must be a positive number")
    r = cfg.get("r", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise PeftConversionError(f"r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise PeftConversionError(f"lora_alpha must be a positive number, got {alpha!r}")
    saved = cfg.get("modules_to_save") or []
    if not isinstance(saved, list) or any(m != HEAD for m in saved):
        raise PeftConversionError(f"modules_to_save {_short(saved)}: selora takes only a timm classification head ('head')")
    return cfg


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<part>`` -> (module, part); part is lora_A, lora_B, magnitude or head."""
    if not key.startswith(PREFIX):
        raise PeftConversionError(f"tensor {_short(key)} does not start with {PREFIX!r}")
    name = key[len(PREFIX):]
    for suffix, part in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                         (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude")):
        if name.endswith(suffix):
            return name.removesuffix(suffix), part
    if name in (f"{HEAD}.weight", f"{HEAD}.bias"):
        return HEAD, name.rpartition(".")[2]
    if "lora_embedding" in name:
        raise PeftConversionError(f"tensor {_short(key)}: LoRA on embedding layers cannot be served")
    if name.endswith(".bias"):
        raise PeftConversionError(f"tensor {_short(key)}: trained biases cannot be served")
    raise PeftConversionError(f"tensor {_short(key)} is not a LoRA/DoRA weight selora can serve")


def from_peft(config_bytes: bytes, weights_bytes: bytes, backbone: Backbone) -> SparseAdapter:
    """A PEFT LoRA/DoRA adapter as an exact selora adapter for ``backbone`` (every block active)."""
    cfg = _peft_config(config_bytes)
    dora = bool(cfg.get("use_dora"))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _parse_weights(weights_bytes, 3 * len(backbone.blocks) + 2).items():  # A, B, magnitude per site + head
        module, part = _split_key(key)
        groups.setdefault(module, {})[part] = tensor.float()
    head = groups.pop(HEAD, None)
    if (head is not None) != (HEAD in (cfg.get("modules_to_save") or [])):
        raise PeftConversionError("modules_to_save and the file disagree on a classification head 'head'")
    if head is not None and backbone.library != "timm":
        raise PeftConversionError("a classification head is only taken from a timm model's modules_to_save 'head'")
    sites = peft_modules(backbone)
    per_site = {}
    for module, parts in groups.items():
        if module not in sites:
            kinds = ", ".join(sorted({re.sub(r"^.*?\.\d+\.", "", m) for m in sites}))
            raise PeftConversionError(f"PEFT module {_short(module)} is not a block of this base (adaptable: {kinds})")
        needed = ["lora_A", "lora_B"] + (["magnitude"] if dora else [])
        if sorted(parts) != sorted(needed):
            raise PeftConversionError(f"PEFT module {_short(module)} holds {sorted(parts)}, expected {needed}")
        a, b = parts["lora_A"], parts["lora_B"]
        specs = backbone.blocks.sites()[sites[module]]
        d_out, d_in = sum(s.d_out for s in specs), specs[0].d_in
        r = a.shape[0] if a.dim() == 2 else 0
        if r < 1 or a.shape[1] != d_in or tuple(b.shape) != (d_out, r):
            raise PeftConversionError(f"PEFT module {_short(module)}: lora_A {list(a.shape)} / lora_B {list(b.shape)} "
                                      f"do not fit its base layer [{d_out}, {d_in}]")
        if dora and tuple(parts["magnitude"].shape) != (d_out,):
            raise PeftConversionError(f"PEFT module {_short(module)}: magnitude {list(parts['magnitude'].shape)}, expected [{d_out}]")
        configured = _pattern_value(cfg.get("rank_pattern") or {}, _pattern_module(module), cfg.get("r", 8))
        if configured != r:
            raise PeftConversionError(f"PEFT module {_short(module)} has rank {r}, its config says {configured}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, _pattern_module(module), cfg.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        if module.endswith(".base_layer.out_proj"):
            scale *= MHA_OUT_PROJ_FACTOR
        per_site[sites[module]] = (specs, a, b * scale, parts.get("magnitude"))
    if not per_site:
        raise PeftConversionError("the PEFT adapter holds no LoRA weights")
    parts = {}  # block id -> (A, B, magnitude) with only the rank components its B rows use
    for specs, a, b, mag in per_site.values():
        offset = specs[0].out_start
        for spec in specs:
            rows = slice(spec.out_start - offset, spec.out_start - offset + spec.d_out)
            used = b[rows].any(dim=0)
            if dora or used.any():  # a LoRA block with B = 0 changes nothing; DoRA's magnitude still does
                parts[spec.block_id] = (a[used], b[rows][:, used], None if mag is None else mag[rows])
    rank = max([1] + [a.shape[0] for a, _, _ in parts.values()])
    blocks = {}
    for block_id in backbone.blocks:
        if block_id in parts:
            a, b, mag = parts[block_id]
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
            blocks[block_id] = BlockWeights(a.contiguous(), b.contiguous(), None if mag is None else mag.clone())
    return SparseAdapter(
        backbone.model_id, backbone.fingerprint, "dora" if dora else "lora", rank, float(rank), blocks,
        {"gated": False, "source": "peft"}, *_head(head, backbone),
    )


def _head(head: dict | None, backbone: Backbone) -> tuple:
    """(class names, weight, bias) of a timm head from ``modules_to_save``, or Nones."""
    if head is None:
        return None, None, None
    weight, bias = head.get("weight"), head.get("bias")
    if weight is None or bias is None or weight.dim() != 2 or weight.shape[1] != backbone.embed_dim \
            or tuple(bias.shape) != (weight.shape[0],):
        shapes = {k: list(v.shape) for k, v in head.items()}
        raise PeftConversionError(f"head {shapes} is not a linear classifier over the {backbone.embed_dim}-wide embedding")
    return [str(i) for i in range(weight.shape[0])], weight, bias


def to_selora_files(adapter: SparseAdapter) -> tuple[bytes, bytes]:
    """The adapter as the bytes of selora's two files."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.tensors().items()}
    return json.dumps(adapter.config_dict(), indent=2).encode(), save_safetensors(tensors, metadata={"format": FORMAT})


def as_selora_files(config_bytes: bytes, weights_bytes: bytes, backbone: Backbone) -> tuple[bytes, bytes]:
    """An upload's two files in selora format: a PEFT adapter is converted (then validated as any
    selora upload is); anything else passes through unchanged."""
    if not is_peft_config(config_bytes):
        return config_bytes, weights_bytes
    return to_selora_files(from_peft(config_bytes, weights_bytes, backbone))


def read_adapter(directory: str | Path, backbone: Backbone) -> SparseAdapter:
    """A selora or PEFT adapter directory, validated against ``backbone``."""
    directory = Path(directory)
    files = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise AdapterError(f"{directory}: {name} is missing")
        files[name] = (directory / name).read_bytes()
    config_bytes, weights_bytes = as_selora_files(files[CONFIG_NAME], files[WEIGHTS_NAME], backbone)
    return parse_adapter(config_bytes, weights_bytes, backbone.blocks)


# -- pruning --------------------------------------------------------------------------------
def _base_rows(backbone: Backbone, spec: BlockSpec) -> torch.Tensor:
    weight = backbone.model.get_submodule(spec.site).weight
    return weight[spec.out_start : spec.out_start + spec.d_out].detach().float().cpu()


@torch.no_grad()
def block_energy(adapter: SparseAdapter, backbone: Backbone) -> dict[str, float]:
    """``‖ΔW‖²_F`` per block, ``ΔW`` = merged block weight − ``W0`` (in fp64 sums)."""
    out = {}
    for b in adapter.blocks:
        w0 = _base_rows(backbone, backbone.blocks[b])
        out[b] = float((merged_block_weight(w0, adapter, b) - w0).double().pow(2).sum())
    return out


def prune(adapter: SparseAdapter, backbone: Backbone, max_active_blocks: int | None = None,
          min_energy: float | None = None) -> tuple[SparseAdapter, float]:
    """Keep the blocks with the largest ``‖ΔW‖_F``: at most ``max_active_blocks``, or the fewest
    whose share of ``Σ‖ΔW‖²`` reaches ``min_energy``. Returns the pruned adapter and that share."""
    if max_active_blocks is not None and min_energy is not None:
        raise ValueError("give max_active_blocks or min_energy, not both")
    if max_active_blocks is not None and max_active_blocks < 1:
        raise ValueError(f"max_active_blocks must be >= 1, got {max_active_blocks}")
    if min_energy is not None and not 0 < min_energy <= 1:
        raise ValueError(f"min_energy must be in (0, 1], got {min_energy}")
    energy = block_energy(adapter, backbone)
    total = sum(energy.values())
    ranked = sorted(energy, key=energy.get, reverse=True)
    if max_active_blocks is not None:
        keep = ranked[:max_active_blocks]
    elif min_energy is not None:
        keep, kept = [], 0.0
        for b in ranked:
            if total > 0 and kept / total >= min_energy:
                break
            keep.append(b)
            kept += energy[b]
    else:
        keep = ranked
    share = sum(energy[b] for b in keep) / total if total > 0 else 1.0
    blocks = {b: w for b, w in adapter.blocks.items() if b in set(keep)}
    gate = {**adapter.gate, "pruned_to": len(blocks), "energy_kept": round(share, 6)}
    return replace(adapter, blocks=blocks, gate=gate), share


# -- selora -> PEFT -------------------------------------------------------------------------
def _stack(adapter: SparseAdapter, specs: list[BlockSpec], rank: int, backbone: Backbone):
    """One PEFT module's A [rank, d_in], B [d_out, rank] and DoRA magnitude from the site's blocks."""
    d_out, d_in, offset = sum(s.d_out for s in specs), specs[0].d_in, specs[0].out_start
    a, b = torch.zeros(rank, d_in), torch.zeros(d_out, rank)
    mag = torch.zeros(d_out) if adapter.variant == "dora" else None
    col = 0
    for spec in specs:
        rows = slice(spec.out_start - offset, spec.out_start - offset + spec.d_out)
        blk = adapter.blocks.get(spec.block_id)
        if blk is None:
            if mag is not None:
                mag[rows] = torch.linalg.norm(_base_rows(backbone, spec), dim=1)
            continue
        a[col : col + adapter.r] = blk.lora_A.float()
        b[rows, col : col + adapter.r] = blk.lora_B.float()
        if mag is not None:
            mag[rows] = blk.magnitude.float()
        col += adapter.r
    return a, b, mag


def _check_head(adapter: SparseAdapter, backbone: Backbone, target: str) -> None:
    """A head leaves selora only as a timm ``head`` over the raw embedding."""
    if adapter.head_weight is None:
        return
    if backbone.library != "timm":
        raise PeftConversionError(f"{target} has no place for a classification head on an open_clip model")
    if adapter.head_input != "raw":
        raise PeftConversionError(f"{target} has no place for a head over the normalised embedding (timm's head reads it raw)")


def to_peft(adapter: SparseAdapter, backbone: Backbone) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter as a PEFT ``LoraConfig`` dict and its ``adapter_model.safetensors`` tensors,
    loadable with ``peft.PeftModel.from_pretrained`` on the plain timm/open_clip model."""
    if backbone.fingerprint != adapter.base_fingerprint:
        raise PeftConversionError("the adapter is for another base model")
    _check_head(adapter, backbone, "PEFT")
    sites = peft_modules(backbone)
    table_sites = backbone.blocks.sites()
    modules: dict[str, list[BlockSpec]] = {}
    for module, site in sites.items():
        if any(s.block_id in adapter.blocks for s in table_sites[site]):
            modules[module] = table_sites[site]
    if backbone.library == "open_clip":  # PEFT adapts in_proj and out_proj of one MHA together
        for module in list(modules):
            attn = _pattern_module(module)
            if attn.endswith(".attn"):
                if adapter.variant == "dora":
                    raise PeftConversionError(f"PEFT cannot represent DoRA on open_clip attention ({attn}): "
                                              "its MultiheadAttention layer has no DoRA")
                modules.setdefault(attn, table_sites[sites[attn]])
                modules.setdefault(f"{attn}.base_layer.out_proj", table_sites[sites[f"{attn}.base_layer.out_proj"]])
    ranks = {m: adapter.r * max(1, sum(s.block_id in adapter.blocks for s in specs)) for m, specs in modules.items()}
    for m in ranks:  # an MHA's out_proj takes its attention's rank
        if m.endswith(".base_layer.out_proj"):
            ranks[m] = ranks[_pattern_module(m)]
    tensors = {}
    for m, specs in modules.items():
        a, b, mag = _stack(adapter, specs, ranks[m], backbone)
        if m.endswith(".base_layer.out_proj"):
            b = b / MHA_OUT_PROJ_FACTOR
        tensors[f"{PREFIX}{m}.lora_A.weight"], tensors[f"{PREFIX}{m}.lora_B.weight"] = a, b
        if mag is not None:
            tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = mag
    if adapter.head_weight is not None:
        tensors[f"{PREFIX}{HEAD}.weight"], tensors[f"{PREFIX}{HEAD}.bias"] = adapter.head_weight, adapter.head_bias
    targets = [m for m in modules if not m.endswith(".base_layer.out_proj")]
    multiples = {m: ranks[m] // adapter.r for m in targets if ranks[m] != adapter.r}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.r,
        "lora_alpha": adapter.lora_alpha,
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in targets) + ")$",
        "rank_pattern": {f"^{re.escape(m)}": adapter.r * k for m, k in multiples.items()},
        "alpha_pattern": {f"^{re.escape(m)}": adapter.lora_alpha * k for m, k in multiples.items()},
        "use_dora": adapter.variant == "dora",
        "use_rslora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": [HEAD] if adapter.head_weight is not None else None,
        "inference_mode": True,
    }
    return config, {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}


def save_peft(adapter: SparseAdapter, backbone: Backbone, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config, tensors = to_peft(adapter, backbone)
    save_file(tensors, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


# -- merged ---------------------------------------------------------------------------------
def plain_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The base's weights under the library's own key names (no ``AdaptedLinear`` wrappers; open_clip's
    ``attn.in_proj_weight``/``in_proj_bias`` as ``nn.MultiheadAttention`` holds them)."""
    out = {}
    for key, value in backbone.model.state_dict().items():
        key = re.sub(r"\.base\.(weight|bias)$", r".\1", key)
        if backbone.library == "open_clip":
            key = re.sub(r"\.attn\.in_proj\.(weight|bias)$", r".attn.in_proj_\1", key)
        out[key] = value.detach().cpu().contiguous()
    return out


@torch.no_grad()
def merged_state_dict(adapter: SparseAdapter, backbone: Backbone) -> dict[str, torch.Tensor]:
    """The base's own state dict with ``adapter`` merged (timm: with the head as ``head.*``)."""
    if backbone.fingerprint != adapter.base_fingerprint:
        raise PeftConversionError("the adapter is for another base model")
    _check_head(adapter, backbone, "a merged model")
    state = plain_state_dict(backbone)
    for b in adapter.blocks:
        spec = backbone.blocks[b]
        key = f"{spec.site}.weight"
        if backbone.library == "open_clip" and spec.site.endswith(".attn.in_proj"):
            key = f"{spec.site}_weight"
        w = state[key].clone()
        rows = slice(spec.out_start, spec.out_start + spec.d_out)
        w[rows] = merged_block_weight(w[rows], adapter, b).to(w.dtype)
        state[key] = w
    if adapter.head_weight is not None:
        state[f"{HEAD}.weight"], state[f"{HEAD}.bias"] = adapter.head_weight.float(), adapter.head_bias.float()
    return state
