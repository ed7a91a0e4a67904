"""Fuzzing run: the schemathesis test of ``tests/adversarial/test_fuzz.py`` at a larger budget,
and the hostile corpus of ``tests/adversarial/test_corpus.py``, against the real app on tiny-vit.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fuzz.py --examples 3000     # ~5 minutes on CPU

Records every fuzzed case's status per operation, the failures (a 5xx, an undocumented status or
schema, a refusal that changed the state) and whether the kept adapters' embeddings and files are
unchanged at the end: ``benchmarks/results/fuzz.{json,md}``. Targets: 0 × 5xx, 0 state changes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def pytest_run(target: str, env: dict) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:], time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000, help="fuzzed cases per generation mode (positive, negative)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    record_path = RESULTS / "fuzz_cases.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SELORA_FUZZ_EXAMPLES": str(args.examples), "SELORA_FUZZ_RECORD": str(record_path)}
    fuzz_rc, fuzz_summary, fuzz_s = pytest_run("tests/adversarial/test_fuzz.py", env)
    corpus_rc, corpus_summary, corpus_s = pytest_run("tests/adversarial/test_corpus.py", env)
    record = json.loads(record_path.read_text())
    record_path.unlink()
    server_errors = sum(n for s, n in record["statuses"].items() if s.startswith("5"))
    result = {
        "examples_per_mode": args.examples,
        "fuzz": {"passed": fuzz_rc == 0, "pytest": fuzz_summary, "seconds": round(fuzz_s, 1), **record},
        "corpus": {"passed": corpus_rc == 0, "pytest": corpus_summary, "seconds": round(corpus_s, 1)},
        "server_errors": server_errors,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "shared": "2 cores shared with other engineers' test runs"},
    }
    (RESULTS / "fuzz.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Fuzzing and hostile corpus",
        "",
        f"schemathesis (positive and negative cases from the app's own OpenAPI document), {args.examples} examples per mode: "
        f"**{record['cases']} cases, {server_errors} × 5xx, {len(record['failures'])} failures, kept state unchanged: "
        f"{record['kept_state_unchanged']}** ({fuzz_summary}; {fuzz_s:.0f} s). Every refusal was checked to leave the adapter list "
        "and the stored files unchanged.",
        "",
        f"Hostile corpus (`tests/adversarial/test_corpus.py`: bodies, images, configs, safetensors files, paths; each case "
        f"asserts its 4xx and an unchanged adapter list, reference embeddings and stored files): {corpus_summary} ({corpus_s:.0f} s).",
        "",
        "| status | cases |",
        "|---:|---:|",
        *[f"| {s} | {n} |" for s, n in sorted(record["statuses"].items())],
        "",
        "| operation and status | cases |",
        "|---|---:|",
        *[f"| {k} | {n} |" for k, n in sorted(record["by_operation"].items())],
        "",
        *([f"Failures: {json.dumps(record['failures'], indent=1)}", ""] if record["failures"] else []),
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python benchmarks/fuzz.py --examples {args.examples}`",
        "",
        f"Machine: {result['machine']} (timings are not comparable across runs).",
    ]
    (RESULTS / "fuzz.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if fuzz_rc == 0 and corpus_rc == 0 else 1)


if __name__ == "__main__":
    main()
