#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, fetched here (it has no network) into .whl/, git-ignored.
#
#   benchmarks/gpu_wheels.sh          # once per session, before the device call
#   device run, carry [".whl"]:  benchmarks/gpu_check.sh "$OUT"   (installs .whl/ when present)
#
# That machine's image (the device library's KINDS.md) is Python 3.12 with torch, triton, timm,
# numpy, pillow, safetensors, httpx, anyio, click, h11, prometheus-client, tqdm and regex, but
# not the serving stack or open_clip. The versions are the ones this checkout's .venv runs, so
# both machines run the same code; the wheels are a few MB (the device call carries 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NEEDED="fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions uvicorn
python-multipart fastapi-offline open-clip-torch ftfy wcwidth"

pins=$("$PY" - $NEEDED <<'PYEOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PYEOF
)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl $pins
ls .whl
du -sh .whl
