"""The README's Python snippets and `selora inspect` / `selora convert` commands run as written (real DINOv2-S)."""

import ast
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
    peft_snippet = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    loaded = subprocess.run([sys.executable, "-c", peft_snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert float(loaded.stdout.strip().splitlines()[-1]) < 1e-4  # PEFT model and merged model agree
