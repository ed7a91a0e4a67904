"""A hostile corpus, generated here (nothing binary is committed): request bodies, images,
adapter configs and safetensors files, paths. Each case is ``Case(id, method, url, request,
status, kind)``: the request keywords for an httpx/TestClient call and the 4xx it must get.

``build(files)`` takes the two files of a valid adapter for the app's base (``files[CONFIG_NAME]``,
``files[WEIGHTS_NAME]``) and derives every bad adapter from them, so each case is bad in one way.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME

JSON = {"content-type": "application/json"}
POST_ROUTES = ("/v1/embeddings", "/v1/classify", "/v1/adapters")
MAX_BODY = 2 * 2**20  # tests.helpers.make_settings: max_body_mb=2.0
MAX_IMAGE_PIXELS = 1 << 20  # the adversarial app's limits (conftest)
MAX_REQUEST_PIXELS = 2 << 20


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    url: str
    request: dict
    status: int
    kind: str


def _png(w: int, h: int, mode: str = "L", fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _truncated_png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.frombytes("RGB", (w, h), bytes(range(256)) * (w * h * 3 // 256 + 1)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()[: buf.tell() // 2]).decode()


def _png_declaring(w: int, h: int) -> str:
    """A 1x1 PNG whose IHDR claims ``w x h`` (a decompression bomb's header, CRC fixed)."""
    import zlib

    raw = bytearray(base64.b64decode(_png(1, 1)))
    ihdr = raw[12:29]
    ihdr[4:12] = struct.pack(">II", w, h)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return base64.b64encode(bytes(raw)).decode()


def body_cases() -> list[Case]:
    cases = []
    for route in POST_ROUTES:
        r = route.rsplit("/", 1)[1]
        cases += [
            Case(f"{r}-not-utf8", "POST", route, {"content": b'{"input": ["\xff\xfe"]}', "headers": JSON}, 400, "invalid_encoding"),
            Case(f"{r}-utf16", "POST", route, {"content": '{"input": ["x"]}'.encode("utf-16"), "headers": JSON}, 400, "invalid_encoding"),
            Case(f"{r}-nested-100000", "POST", route, {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON}, 413, "json_too_complex"),
            Case(f"{r}-int-5000-digits", "POST", route, {"content": b'{"top_k": ' + b"9" * 5000 + b"}", "headers": JSON}, 413, "json_too_complex"),
            Case(f"{r}-duplicate-keys", "POST", route, {"content": b'{"name": "a", "name": "b", "input": []}', "headers": JSON}, 422, "invalid_json"),
            Case(f"{r}-nan", "POST", route, {"content": b'{"top_k": NaN, "input": []}', "headers": JSON}, 422, "invalid_json"),
            Case(f"{r}-bom", "POST", route, {"content": b'\xef\xbb\xbf{"input": []}', "headers": JSON}, 422, "invalid_json"),
            Case(f"{r}-truncated", "POST", route, {"content": b'{"input": ["', "headers": JSON}, 422, "invalid_json"),
            Case(f"{r}-text-plain", "POST", route, {"content": b"hello", "headers": {"content-type": "text/plain"}}, 422, "invalid_json"),
            Case(f"{r}-over-limit", "POST", route, {"content": b" " * (MAX_BODY + 1), "headers": JSON}, 413, "payload_too_large"),
            Case(f"{r}-array", "POST", route, {"json": [1, 2]}, 422, "invalid_request"),
        ]
    cases += [
        Case("get-with-huge-body", "GET", "/v1/adapters", {"content": b"{" * (MAX_BODY + 1)}, 413, "payload_too_large"),
        Case("get-with-deep-body", "GET", "/v1/models", {"content": b"[" * 1000, "headers": JSON}, 413, "json_too_complex"),
        Case("delete-with-bad-body", "DELETE", "/v1/adapters/a1", {"content": b"\xc3\x28", "headers": JSON}, 400, "invalid_encoding"),
        Case("embeddings-input-int", "POST", "/v1/embeddings", {"json": {"input": 5}}, 422, "invalid_request"),
        Case("embeddings-input-objects", "POST", "/v1/embeddings", {"json": {"input": [{"a": 1}]}}, 422, "invalid_request"),
        Case("classify-top-k-huge", "POST", "/v1/classify", {"json": {"input": ["x"], "top_k": 10**30}}, 422, "invalid_request"),
        Case("embeddings-text-on-vit", "POST", "/v1/embeddings", {"json": {"input": ["hi"], "modality": "text"}}, 422, "unsupported_modality"),
        Case("embeddings-unknown-adapter", "POST", "/v1/embeddings", {"json": {"model": "nope\x00", "input": ["x"]}}, 404, "adapter_not_found"),
    ]
    return cases


def image_cases() -> list[Case]:
    def emb(case_id, images, status, kind):
        return Case(case_id, "POST", "/v1/embeddings", {"json": {"model": "a1", "input": images}}, status, kind)

    side = int(MAX_IMAGE_PIXELS**0.5)
    return [
        emb("image-400000x1", [_png(400_000, 1)], 413, "image_too_large"),
        emb("image-1x400000", [_png(1, 400_000)], 413, "image_too_large"),
        emb("image-aspect-17", [_png(17 * 8, 8)], 413, "image_too_large"),
        emb("image-over-pixels", [_png(side + 1, side)], 413, "image_too_large"),
        emb("image-bomb-header", [_png_declaring(100_000, 100_000)], 413, "image_too_large"),
        emb("image-bomb-header-max", [_png_declaring(2**31 - 1, 2**31 - 1)], 413, "image_too_large"),
        emb("image-request-pixels", [_png(side, side)] * 3, 413, "image_too_large"),
        emb("image-truncated", [_truncated_png(64, 64)], 400, "invalid_image"),
        emb("image-random-bytes", [base64.b64encode(bytes(range(256)) * 4).decode()], 400, "invalid_image"),
        emb("image-not-base64", ["%%%%"], 400, "invalid_image"),
        emb("image-bad-data-uri", ["data:image/png,abc"], 400, "invalid_image"),
        emb("image-tiff", [_png(8, 8, "RGB", "TIFF")], 400, "invalid_image"),
        emb("image-eps-header", [base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n").decode()], 400, "invalid_image"),
        emb("image-one-bad-of-two", [_png(8, 8, "RGB"), "%%%%"], 400, "invalid_image"),
    ]


def _upload(case_id: str, config: bytes, weights: bytes, status: int = 422, kind: str = "invalid_adapter") -> Case:
    request = {"data": {"name": "a1"}, "files": {"config": ("c.json", config), "weights": ("w.safetensors", weights)}}
    return Case(case_id, "POST", "/v1/adapters", request, status, kind)


def _header_file(header: str, payload: bytes = b"") -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def adapter_cases(files: dict[str, bytes]) -> list[Case]:
    config, weights = files[CONFIG_NAME], files[WEIGHTS_NAME]
    cfg = json.loads(config)
    tensors = load_safetensors(weights)
    block = cfg["blocks"][0]

    def with_cfg(**changes) -> bytes:
        return json.dumps({**cfg, **changes}).encode()

    def with_tensors(**changes) -> bytes:
        return save_safetensors({**tensors, **{k.replace("__", "."): v for k, v in changes.items()}})

    header = json.loads(weights[8 : 8 + struct.unpack("<Q", weights[:8])[0]])
    name, entry = next((k, v) for k, v in header.items() if k != "__metadata__")
    dup = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(entry)}}}"
    payload = weights[8 + struct.unpack("<Q", weights[:8])[0] :]
    many = "{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(5000)) + "}"
    scores_unknown = {f"vision.{i}.q": 0.2 for i in range(100, 140)}
    scores_many = {f"vision.{i}.fc1": 0.2 for i in range(20000)}
    lora_b = tensors[f"{block}.lora_B"]
    big_head = {"head.weight": torch.zeros(2, 7), "head.bias": torch.zeros(2)}

    return [
        _upload("cfg-not-utf8", b'{"format": "\xff"}', weights),
        _upload("cfg-nested-deep", b"[" * 50_000 + b"]" * 50_000, weights),
        _upload("cfg-nested-100000", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", weights),
        _upload("cfg-r-huge-int", with_cfg(r=10**4000), weights),
        _upload("cfg-alpha-huge-int", with_cfg(lora_alpha=10**4000), weights),
        _upload("cfg-r-2000", with_cfg(r=2000), weights),
        _upload("cfg-r-bool", with_cfg(r=True), weights),
        _upload("cfg-alpha-1e308", with_cfg(lora_alpha=1e308), weights),
        _upload("cfg-blocks-lists", with_cfg(blocks=[[block]]), weights),
        _upload("cfg-blocks-objects", with_cfg(blocks=[{"id": block}]), weights),
        _upload("cfg-blocks-unknown", with_cfg(blocks=["vision.999.q"]), weights),
        _upload("cfg-variant-list", with_cfg(variant=["lora"]), weights),
        _upload("cfg-version-string", with_cfg(format_version="1"), weights),
        _upload("cfg-version-true", with_cfg(format_version=True), weights),
        _upload("cfg-duplicate-keys", config[:-1] + b', "r": 8}', weights),
        _upload("cfg-scores-unknown-blocks", with_cfg(gate={**cfg.get("gate", {}), "scores": scores_unknown}), weights),
        _upload("cfg-scores-20000", with_cfg(gate={"scores": scores_many}), weights),
        _upload("cfg-scores-not-numbers", with_cfg(gate={"scores": {block: "high"}}), weights),
        _upload("cfg-gate-list", with_cfg(gate=[1]), weights),
        _upload("cfg-head-string", with_cfg(head="cats"), weights),
        _upload("cfg-head-classes-duplicate", with_cfg(head={"classes": ["a", "a"]}), with_tensors(**big_head)),
        _upload("cfg-head-classes-objects", with_cfg(head={"classes": [{"a": 1}, 2]}), with_tensors(**big_head)),
        _upload("head-width-mismatch", with_cfg(head={"classes": ["a", "b"]}), with_tensors(**big_head)),
        _upload("cfg-over-256k", with_cfg(base_model="x" * 300_000), weights),
        _upload("weights-duplicate-header-keys", config, _header_file(dup, payload)),
        _upload("weights-5000-tensors", config, _header_file(many)),
        _upload("weights-header-2-64", config, struct.pack("<Q", 2**64 - 1) + b"{}"),
        _upload("weights-header-past-end", config, struct.pack("<Q", 1000) + b"{}"),
        _upload("weights-header-deep", config, _header_file("[" * 10_000 + "]" * 10_000)),
        _upload("weights-header-not-utf8", config, struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"),
        _upload("weights-empty", config, b""),
        _upload("weights-pickle", config, b"\x80\x04\x95" + b"\x00" * 64),
        _upload("weights-zip", config, b"PK\x03\x04" + b"\x00" * 64),
        _upload("weights-int64", config, with_tensors(**{f"{block}__lora_B": lora_b.to(torch.int64)})),
        _upload("weights-float64", config, with_tensors(**{f"{block}__lora_B": lora_b.double()})),
        _upload("weights-nan", config, with_tensors(**{f"{block}__lora_B": torch.full_like(lora_b, float("nan"))})),
        _upload("weights-extra-tensor", config, with_tensors(extra=torch.zeros(1))),
        _upload("weights-wrong-shape", config, with_tensors(**{f"{block}__lora_B": lora_b[:, :1].contiguous()})),
        _upload("weights-ba-overflow", config, with_tensors(**{f"{block}__lora_B": torch.full_like(lora_b, 3e38),
                                                                f"{block}__lora_A": torch.full_like(tensors[f"{block}.lora_A"], 10.0)})),
        _upload("cfg-other-base", with_cfg(base_fingerprint="0" * 16), weights, 422, "base_model_mismatch"),
        Case("upload-no-files", "POST", "/v1/adapters", {"data": {"name": "a1"}, "files": {"x": ("x", b"1")}}, 422, "invalid_input"),
        Case("upload-bad-name", "POST", "/v1/adapters", {"data": {"name": "../a1"}, "files": {"config": ("c", config), "weights": ("w", weights)}}, 422, "invalid_adapter_name"),
    ]


def dora_overflow_case(files: dict[str, bytes]) -> Case:
    """A DoRA adapter whose magnitudes are finite but whose factor ``m / ‖W0 + ΔW‖`` is not."""
    tensors = load_safetensors(files[WEIGHTS_NAME])
    huge = {k: torch.full_like(v, 3e38) if k.endswith(".magnitude") else v for k, v in tensors.items()}
    return _upload("dora-magnitude-overflow", files[CONFIG_NAME], save_safetensors(huge))


def path_cases() -> list[Case]:
    def load(case_id, path, status=422, kind="unsafe_path"):
        return Case(case_id, "POST", "/v1/adapters", {"json": {"name": "a1", "path": path}}, status, kind)

    return [
        load("path-nul", "a1\x00x"),
        load("path-component-300", "x" * 300),
        load("path-5000", "/".join(["abcdefgh"] * 560)),
        load("path-symlink-loop", "loop/a1"),
        load("path-symlink-self", "self"),
        Case("path-lone-surrogate", "POST", "/v1/adapters", {"content": b'{"name": "a1", "path": "\\ud800"}', "headers": JSON}, 422, "unsafe_path"),
        load("path-dotdot", "a1/../../etc"),
        load("path-absolute", "/etc"),
        load("path-outside-link", "outside"),
        load("path-empty", ""),
        load("path-int", 5, 422, "invalid_request"),
        load("path-list", ["a1"], 422, "invalid_request"),
        load("path-null", None, 422, "invalid_request"),
        load("path-a-file", "a1/adapter_config.json", 404, "adapter_files_not_found"),
        load("path-missing", "missing", 404, "adapter_files_not_found"),
        Case("name-int", "POST", "/v1/adapters", {"json": {"name": 5, "path": "a1"}}, 422, "invalid_request"),
        Case("name-nul", "POST", "/v1/adapters", {"json": {"name": "a\x00", "path": "a1"}}, 422, "invalid_adapter_name"),
    ]
