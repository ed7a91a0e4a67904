"""The README's Python snippets, `selora inspect` / `selora convert` commands and curl lines run as written (real DINOv2-S)."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.slow
def test_readme_method_snippet_runs(tmp_path):
    text = README.read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    active = ast.literal_eval(run.stdout.strip().splitlines()[-1])  # the printed list of active block ids
    assert 0 < len(active) <= 6
    command = re.search(r"\.venv/bin/(selora inspect my-adapter)", text).group(1).split()
    inspect = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert inspect.returncode == 0, inspect.stderr
    assert "dinov2-small" in inspect.stdout and (tmp_path / "my-adapter" / "active_blocks.png").is_file()
    for line in re.findall(r"\.venv/bin/(selora convert .*)", text):  # PEFT and merged exports of my-adapter
        convert = subprocess.run([str(Path(sys.executable).parent / "selora"), *line.split()[1:]], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert convert.returncode == 0, convert.stderr
    peft_snippet = _block_with("PeftModel.from_pretrained", "python")
    loaded = subprocess.run([sys.executable, "-c", peft_snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert float(loaded.stdout.strip().splitlines()[-1]) < 1e-4  # PEFT model and merged model agree


def _block_with(marker: str, lang: str) -> str:
    return next(b for b in re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S) if marker in b)


@pytest.mark.slow
def test_readme_serving_recipes_against_a_running_server(tmp_path, monkeypatch, capsys):
    """The curl lines (bodies read from files) and the recipe that reproduces a served embedding
    with timm alone, against `selora serve` on the default model."""
    from PIL import Image
    from skimage import data

    from tests.helpers import serving

    Image.fromarray(data.chelsea()).save(tmp_path / "photo.png")
    curl = [line for line in _block_with("--data-binary @body.json", "bash").splitlines() if "body.json" in line][:2]
    recipe = _block_with("dinov2_small_weights", "python")
    with serving("--store", str(tmp_path / "store"), "--import-root", str(tmp_path / "adapters"),
                 env={"OMP_NUM_THREADS": "2"}) as served:
        port = served.url.rsplit(":", 1)[1]
        shell = "\n".join(curl).replace("localhost:8000", f"127.0.0.1:{port}")
        out = subprocess.run(["bash", "-ec", shell], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and len(json.loads(out.stdout)["data"][0]["embedding"]) == 384, out.stderr
        monkeypatch.chdir(tmp_path)
        exec(compile(recipe.replace("localhost:8000", f"127.0.0.1:{port}"), "README.md", "exec"), {})
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) < 1e-4
