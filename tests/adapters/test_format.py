import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from selora.adapters import export_adapter, load_adapter, save_adapter
from selora.adapters import format as fmt
from selora.models import load_backbone
from tests.helpers import make_adapter


@pytest.fixture()
def saved(tmp_path, tiny_vit):
    adapter = make_adapter(tiny_vit, variant="dora", active=["vision.0.q", "vision.1.fc1"], head_classes=["a", "b"])
    path = save_adapter(export_adapter(adapter, tiny_vit.model_id, tiny_vit.fingerprint), tmp_path / "ad")
    return path


def test_file_holds_exactly_the_active_blocks(saved, tiny_vit):
    cfg = json.loads((saved / fmt.CONFIG_NAME).read_text())
    assert cfg["format"] == "selora-adapter" and cfg["format_version"] == 1
    assert cfg["base_fingerprint"] == tiny_vit.fingerprint and cfg["variant"] == "dora"
    assert cfg["blocks"] == ["vision.0.q", "vision.1.fc1"]
    assert cfg["head"] == {"classes": ["a", "b"], "input": "raw"}
    assert set(cfg["gate"]["scores"]) == set(tiny_vit.blocks)
    tensors = load_file(saved / fmt.WEIGHTS_NAME)
    assert sorted(tensors) == sorted([
        "vision.0.q.lora_A", "vision.0.q.lora_B", "vision.0.q.magnitude",
        "vision.1.fc1.lora_A", "vision.1.fc1.lora_B", "vision.1.fc1.magnitude", "head.weight", "head.bias",
    ])
    assert tensors["vision.1.fc1.lora_B"].shape == (256, 4) and tensors["vision.1.fc1.magnitude"].shape == (256,)
    loaded = load_adapter(saved, tiny_vit.blocks)
    assert loaded.r == 4 and list(loaded.blocks) == cfg["blocks"] and loaded.head_classes == ["a", "b"]


def test_file_size_scales_with_active_blocks(tmp_path):
    vit = load_backbone("timm:vit_small_patch16_224")
    assert len(vit.blocks) == 72
    some = [b for b in vit.blocks if b.endswith((".q", ".fc1"))][:5]
    sizes = {}
    for name, active in (("five", some), ("all", None)):
        adapter = make_adapter(vit, r=8, active=active)
        path = save_adapter(export_adapter(adapter, vit.model_id, vit.fingerprint), tmp_path / name)
        sizes[name] = (path / fmt.WEIGHTS_NAME).stat().st_size
    blocks = list(vit.blocks.values())
    param_ratio = sum(vit.blocks[b].d_out + vit.blocks[b].d_in for b in some) / sum(s.d_out + s.d_in for s in blocks)
    assert sizes["five"] / sizes["all"] == pytest.approx(param_ratio, rel=0.02)
    assert sizes["five"] < sizes["all"] / 10


def _corrupt_config(path, **changes):
    cfg = json.loads((path / fmt.CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / fmt.CONFIG_NAME).write_text(json.dumps(cfg))


def _rewrite_tensors(path, edit):
    tensors = load_file(path / fmt.WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / fmt.WEIGHTS_NAME)


BAD_FILES = {
    "wrong format": (lambda p: _corrupt_config(p, format="peft"), fmt.FormatVersionError, "format"),
    "wrong version": (lambda p: _corrupt_config(p, format_version=2), fmt.FormatVersionError, "format_version 2"),
    "other base": (lambda p: _corrupt_config(p, base_fingerprint="0" * 16), fmt.BaseModelMismatchError, "0000000000000000"),
    "unknown block": (lambda p: _corrupt_config(p, blocks=["vision.0.q", "vision.9.fc1"]), fmt.UnknownBlockError, "vision.9.fc1"),
    "bad json": (lambda p: (p / fmt.CONFIG_NAME).write_text("{nope"), fmt.ConfigFileError, "JSON"),
    "bad head input": (lambda p: _corrupt_config(p, head={"classes": ["a", "b"], "input": "logits"}), fmt.ConfigFileError, "head.input"),
    "wrong shape": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({"vision.0.q.lora_A": torch.zeros(4, 65)})),
        fmt.ShapeError, "vision.0.q.lora_A",
    ),
    "wrong dtype": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({"vision.0.q.lora_B": t["vision.0.q.lora_B"].to(torch.float64)})),
        fmt.DtypeError, "vision.0.q.lora_B",
    ),
    "nan": (
        lambda p: _rewrite_tensors(p, lambda t: t["vision.1.fc1.lora_A"].__setitem__((0, 0), float("nan"))),
        fmt.NonFiniteError, "vision.1.fc1.lora_A",
    ),
    "inf": (
        lambda p: _rewrite_tensors(p, lambda t: t["vision.0.q.magnitude"].__setitem__(0, float("inf"))),
        fmt.NonFiniteError, "vision.0.q.magnitude",
    ),
    "missing tensor": (lambda p: _rewrite_tensors(p, lambda t: t.pop("vision.1.fc1.lora_B")), fmt.MissingTensorError, "vision.1.fc1.lora_B"),
    "extra tensor": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({"vision.0.k.lora_A": torch.zeros(4, 64)})),
        fmt.UnexpectedTensorError, "vision.0.k.lora_A",
    ),
    "truncated": (
        lambda p: (p / fmt.WEIGHTS_NAME).write_bytes((p / fmt.WEIGHTS_NAME).read_bytes()[:-100]),
        fmt.CorruptFileError, "not a valid safetensors",
    ),
    "corrupt header": (lambda p: (p / fmt.WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}"), fmt.CorruptFileError, "safetensors"),
    "pickle": (
        lambda p: (p / fmt.WEIGHTS_NAME).write_bytes(pickle.dumps({"vision.0.q.lora_A": [1.0]})),
        fmt.CorruptFileError, "pickle",
    ),
    "missing file": (lambda p: (p / fmt.WEIGHTS_NAME).unlink(), fmt.AdapterNotFoundError, fmt.WEIGHTS_NAME),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_every_bad_file_has_its_own_error(case, saved, tiny_vit, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(saved, path)
    damage, error, words = BAD_FILES[case]
    damage(path)
    with pytest.raises(error, match=words):
        load_adapter(path, tiny_vit.blocks)


def test_a_header_length_whose_low_byte_is_0x80_is_still_safetensors(saved, tiny_vit):
    data = (saved / fmt.WEIGHTS_NAME).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header, body = data[8 : 8 + size], data[8 + size :]
    padded = size + (128 - size) % 256  # safetensors pads its JSON header with spaces
    (saved / fmt.WEIGHTS_NAME).write_bytes(padded.to_bytes(8, "little") + header.ljust(padded) + body)
    assert (saved / fmt.WEIGHTS_NAME).read_bytes()[:1] == b"\x80"
    assert list(load_adapter(saved, tiny_vit.blocks).blocks) == ["vision.0.q", "vision.1.fc1"]


def test_head_input_round_trips_and_defaults_to_raw(saved, tiny_vit):
    loaded = load_adapter(saved, tiny_vit.blocks)
    assert loaded.head_input == "raw"
    loaded.head_input = "normalized"
    again = load_adapter(save_adapter(loaded, saved.parent / "norm"), tiny_vit.blocks)
    assert again.head_input == "normalized"
    _corrupt_config(saved, head={"classes": ["a", "b"]})  # written before head.input existed
    assert load_adapter(saved, tiny_vit.blocks).head_input == "raw"


def test_errors_are_distinct_types():
    types = {error for _, error, _ in BAD_FILES.values()}
    assert len(types) == 11
    assert all(issubclass(t, fmt.AdapterError) for t in types)


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_safetensors_whose_header_length_looks_like_pickle_or_zip_is_read(saved, tiny_vit, first_bytes):
    """The first 8 bytes are the header length: 1 file in 256 starts with 0x80 by chance."""
    from safetensors.torch import save

    tensors = load_file(saved / fmt.WEIGHTS_NAME)
    step = 256 if first_bytes == b"\x80" else 65536  # the header length's low byte(s) must spell first_bytes
    target = int.from_bytes(first_bytes, "little")
    unpadded = save(tensors, metadata={"pad": ""})
    json_len = len(unpadded[8 : 8 + int.from_bytes(unpadded[:8], "little")].rstrip())
    length = next(t for t in range(target, 1 << 20, step) if t >= json_len)  # a multiple of 8, as safetensors pads
    data = save(tensors, metadata={"pad": "x" * (length - json_len)})
    assert data.startswith(first_bytes)
    (saved / fmt.WEIGHTS_NAME).write_bytes(data)
    assert set(load_adapter(saved, tiny_vit.blocks).blocks)
