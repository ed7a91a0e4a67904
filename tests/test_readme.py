"""The README's Python snippet and `selora inspect` command run as written (real DINOv2-S)."""

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
