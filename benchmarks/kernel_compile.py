"""Compile the fused kernel for a GPU architecture on any machine and report its register budget.

For every tuning config of ``selora/kernels/configs/default.json`` (or ``--config``), every
dtype, LoRA and DoRA, both shrink modes (fused at rank 16, split at rank 256) and both homes of
the base GEMM (in the tile, or torch's with the kernel adding to it: ``VARIANTS``), the launches
of one ViT-B/16 MLP layer (768 → 3072, 64 images × 197 tokens, 32 adapters, every block active)
are compiled for ``--arch`` exactly as the JIT would compile them there
(``selora.kernels.aot``), and ``ptxas -v`` reports registers per thread, spilled bytes and
shared memory; the PTX tells whether the dots became Hopper ``wgmma`` or Ampere ``mma.sync``.
A config is fit for a dtype and base GEMM when none of its variants spills; the config file
offers the autotuner only fit ones (its ``dtypes`` and ``base_gemms``), which the report checks. No kernel runs: this needs no GPU, and says nothing of speed.

    .venv/bin/python benchmarks/kernel_compile.py                 # sm_90 (H100/H200)
    .venv/bin/python benchmarks/kernel_compile.py --arch sm_80    # A100

Writes ``results/kernel_compile_<arch>.{json,md}`` with the command, Triton's version and the
ptxas that compiled it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DTYPES = ("bf16", "fp16", "fp32")
# (variant, rank, base GEMM): r=16 fused shrink, r=256 split; "library": torch's GEMM, the kernel adds
VARIANTS = [("lora", 16, "fused"), ("dora", 16, "fused"), ("lora", 256, "fused"), ("dora", 256, "fused"),
            ("lora", 16, "library"), ("dora", 256, "library")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["sm_90", "sm_80"], default="sm_90")
    p.add_argument("--config", type=Path, default=None, help="tuning file (default: selora/kernels/configs/default.json)")
    p.add_argument("--out", type=Path, default=None, help="output stem (default results/kernel_compile_<arch>)")
    return p.parse_args(argv)


def mlp_layer(torch, dtype, variant: str, rank: int, items=64, tokens=197, adapters=32, d=768):
    """One fc1 site of ViT-B/16 with ``adapters`` adapters, every block active (CPU tensors)."""
    from selora.kernels.batch import DeviceBlock, pack_layer

    gen = torch.Generator().manual_seed(0)
    per = items // adapters
    work = []
    for j in range(adapters):
        factor = torch.rand(4 * d, generator=gen).to(dtype) if variant == "dora" else None
        blk = DeviceBlock("vision.0.fc1", 0, torch.randn(rank, d, generator=gen).to(dtype),
                          torch.randn(rank, 4 * d, generator=gen).to(dtype), 2.0 / rank, factor)
        work.append((j * per, (j + 1) * per, blk))
    layer = pack_layer(work)
    if layer.has_dora != (variant == "dora"):
        raise AssertionError(f"{variant} layer with has_dora={layer.has_dora}")
    x = torch.randn(items, tokens, d, generator=gen).to(dtype)
    w = torch.randn(4 * d, d, generator=gen).to(dtype)
    return x, w, torch.zeros(4 * d, dtype=dtype), layer


def run(args) -> dict:
    import torch
    import triton
    from tqdm import tqdm

    from selora.kernels import aot, triton_lora, tuning

    path = args.config or tuning.CONFIG_DIR / "default.json"
    tuning = json.loads(path.read_text()) | {"source": path.name}
    torch_dtypes = {v: k for k, v in triton_lora.DTYPE_NAMES.items()}
    rows = []
    jobs = [(dt, *v) for dt in DTYPES for v in VARIANTS]
    for dt, variant, rank, base in tqdm(jobs, desc=f"compiling for {args.arch}", unit="variant"):
        x, w, b, layer = mlp_layer(torch, torch_dtypes[dt], variant, rank)
        for cfg, c in aot.compile_layer(x, w, b, layer, tuning, args.arch, base):
            listed = dt in cfg.get("dtypes", DTYPES) and base in cfg.get("base_gemms", ("fused", "library"))
            rows.append(dict(dtype=dt, variant=variant, rank=rank, base_gemm=base, tile=cfg, listed=listed) | c.as_dict())
    from triton.backends.nvidia.compiler import get_ptxas

    return dict(arch=args.arch, config=str(path), triton=triton.__version__, ptxas=get_ptxas(aot.ARCHS[args.arch]).path,
                torch=torch.__version__, machine=f"{platform.machine()} (no GPU needed)",
                command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows)


def tile_name(t: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R")
    name = "×".join(str(t[k]) for k in keys if k in t)
    return name + (f" w{t['num_warps']} s{t['num_stages']}" if "num_warps" in t else "")


def summarize(report: dict) -> list[dict]:
    """Per (kernel, tile, dtype, base GEMM): worst registers and spills over the variants."""
    out = {}
    for r in report["rows"]:
        key = (r["kernel"], tile_name(r["tile"]), r["dtype"], r["base_gemm"])
        s = out.setdefault(key, dict(kernel=key[0], tile=key[1], dtype=key[2], base_gemm=key[3], listed=r["listed"],
                                     registers=0, spill_bytes=0, shared=0, tensor_cores=set()))
        s["registers"] = max(s["registers"], r["registers"])
        s["spill_bytes"] = max(s["spill_bytes"], r["spill_stores"] + r["spill_loads"])
        s["shared"] = max(s["shared"], r["shared_bytes"])
        s["tensor_cores"].add(r["tensor_cores"])
    return list(out.values())


def write(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    summary = summarize(report)
    offered_spilling = [s for s in summary if s["listed"] and s["spill_bytes"]]
    lines = [f"# Fused kernel compiled for {report['arch']}: registers, spills, shared memory", "",
             f"- command: `{report['command']}` ({report['date']})",
             f"- Triton {report['triton']}, ptxas `{report['ptxas']}`, torch {report['torch']}; machine: {report['machine']}",
             f"- tuning file: `{report['config']}`",
             "- layer: ViT-B/16 fc1 (768 → 3072), 64 images × 197 tokens, 32 adapters, every block active; "
             "r = 16 (fused shrink, one launch) and r = 256 (split shrink, two launches); LoRA and DoRA; "
             "base GEMM in the tile, or by torch (r = 16 LoRA, r = 256 DoRA)",
             "- per thread; the worst over the variants. *listed*: the config file offers this tile to "
             "the autotuner for this dtype and base GEMM. Fit = no spill in any variant.", "",
             f"Every tile the config file offers compiles without spills: **{'yes' if not offered_spilling else 'no: ' + ', '.join(s['tile'] + ' ' + s['dtype'] + ' ' + s['base_gemm'] for s in offered_spilling)}**",
             "", "| kernel | tile (M×N×K×R, warps, stages) | dtype | base GEMM | listed | registers | spilled bytes | shared KiB | dots as |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['kernel']} | {s['tile']} | {s['dtype']} | {s['base_gemm']} | {'yes' if s['listed'] else 'no'} | {s['registers']} | "
                     f"{s['spill_bytes'] or '0'} | {s['shared'] / 1024:.0f} | {', '.join(sorted(s['tensor_cores']))} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    from selora.kernels.aot import toolchain_available

    why = toolchain_available()
    if why:
        print(why, file=sys.stderr)
        return 2
    report = run(args)
    stem = args.out or RESULTS / f"kernel_compile_{args.arch}"
    write(report, stem)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
