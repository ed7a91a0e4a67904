"""The serving core (models -> adapters -> kernels -> runtime -> server) stands apart from the
research wing: with ``selora.training``, ``selora.bench`` and the packages only their extras
install (plotting, ONNX, PEFT) made unimportable, the server still builds an
engine on a tiny model and serves an embedding."""

import subprocess
import sys

# (tqdm is not among them: open_clip itself requires it.)
BLOCKED = ("selora.training", "selora.bench", "matplotlib", "onnx", "peft")

SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # what `import name` then meets: ModuleNotFoundError, as if not installed
import asyncio, tempfile
from selora.server.app import build_engine
from selora.server.settings import Settings
engine = build_engine(Settings(model="tiny-vit", import_root=tempfile.mkdtemp(), store=tempfile.mkdtemp()))
async def main():
    await engine.start()
    try:
        import base64, io
        from PIL import Image
        buf = io.BytesIO(); Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG")
        return await engine.embed("base", "image", ["data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()], True)
    finally:
        await engine.stop()
out = asyncio.run(main())
print(len(out.vectors[0]))
"""


def test_serving_core_runs_without_training_bench_or_their_extras():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 0
