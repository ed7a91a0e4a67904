"""Start-up as an operator meets it: a base that cannot load ends the process naming the cause;
`selora serve --help` imports no torch and lists the named models; the API docs work offline."""

import os
import re
import subprocess
import sys

from tests.helpers import make_app, run_with_client


def test_a_base_that_cannot_load_exits_non_zero_naming_the_cause(tmp_path):
    args, cause = ["--model", "tiny-vit", "--weights", "/nonexistent/w.safetensors"], "FileNotFoundError: No such file"
    cmd = [sys.executable, "-m", "selora.cli", "serve", *args, "--store", str(tmp_path / "store"), "--port", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("selora serve: loading ") and cause in last


def test_serve_help_imports_no_torch_and_marks_random_weights():
    script = ("import sys\nfrom selora.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
              "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "1000"})  # no wrapping inside a name
    assert run.returncode == 0 and run.stdout.strip().endswith("NO-TORCH"), run.stderr
    text = " ".join(run.stdout.split())
    assert "dinov2-small, dinov2-small-random (random weights), tiny-clip (random weights), tiny-vit (random weights)" in text


def test_docs_and_redoc_are_served_from_local_assets(tmp_path, tiny_vit):
    async def pages(client):
        docs, redoc = (await client.get("/docs")).text, (await client.get("/redoc")).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs + redoc)
        return docs, redoc, assets, [(a, (await client.get(a)).status_code) for a in assets]

    docs, redoc, assets, fetched = run_with_client(make_app(tiny_vit, tmp_path), pages)
    assert "SwaggerUIBundle" in docs and "redoc" in redoc.lower()
    assert not re.search(r"https?://", " ".join(assets))  # nothing from a CDN
    assert {a.rsplit("/", 1)[-1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"}
    assert all(status == 200 for _, status in fetched), fetched
