"""``selora bench``: presets, the command line, and one run of every grid into one result.

``quick`` (CPU, a few minutes): the full FLOP grid (counted on meta tensors, so it is cheap),
latency and multi-tenant timing on DINO ViT-S/16 at small batches and a few ranks.
``full`` (GPU): every rank, batch sizes 1-256, ViT-S/16 and ViT-B/16 timed, up to 64 tenants.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from selora.bench import grid, peers
from selora.bench.report import write_report
from selora.bench.synthetic import PAPER_FRACTIONS
from selora.models.factory import DTYPES

ALL_RANKS = (4, 8, 16, 32, 64, 128, 256)
FLOP_MODELS = ("open_clip:ViT-B-16", "timm:vit_small_patch16_224", "timm:vit_base_patch16_224", "dinov2-small")


@dataclass
class Preset:
    flop_models: tuple[str, ...] = FLOP_MODELS
    flop_ranks: tuple[int, ...] = ALL_RANKS
    timing_models: tuple[str, ...] = ("timm:vit_small_patch16_224",)
    latency_ranks: tuple[int, ...] = (16, 64, 256)
    batches: tuple[int, ...] = (4,)
    tenant_ranks: tuple[int, ...] = (16,)
    tenants: tuple[int, ...] = (8, 32)
    tenant_batch: int = 32
    gated_fraction: float = 0.05  # "about 5 %" active blocks for timing (ViT-S: 4/72)
    warmup: int = 1
    reps: int = 5
    tenant_reps: int = 3
    device: str = "cpu"
    dtype: str = "float32"  # of the timed models (FLOPs do not depend on it)
    threads: int = 2
    budget_gib: float = 1.0
    stages: tuple[str, ...] = ("flops", "latency", "multitenant")


PRESETS = {
    "quick": Preset(),
    "full": Preset(
        timing_models=("timm:vit_small_patch16_224", "timm:vit_base_patch16_224"), latency_ranks=ALL_RANKS,
        batches=(1, 8, 64, 256), tenant_ranks=(16, 128), tenants=(1, 8, 32, 64), tenant_batch=64,
        warmup=3, reps=20, tenant_reps=10, device="cuda", dtype="bfloat16", budget_gib=8.0,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    strs = lambda s: tuple(v for v in s.split(",") if v)  # noqa: E731
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="quick: CPU, minutes; full: GPU")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--stem", default=None, help="file name stem (default bench_<preset>)")
    parser.add_argument("--models", type=strs, help="models of the FLOP grid (comma-separated)")
    parser.add_argument("--ranks", type=ints, help="ranks of the FLOP grid")
    parser.add_argument("--timing-models", type=strs, help="models to time (PEFT peers need timm models)")
    parser.add_argument("--latency-ranks", type=ints, help="ranks of the latency grid")
    parser.add_argument("--batches", type=ints, help="batch sizes of the latency grid")
    parser.add_argument("--tenants", type=ints, help="distinct adapters per batch (multi-tenant)")
    parser.add_argument("--tenant-ranks", type=ints, help="ranks of the multi-tenant grid")
    parser.add_argument("--tenant-batch", type=int, help="rows per multi-tenant batch")
    parser.add_argument("--warmup", type=int, help="untimed rounds before timing")
    parser.add_argument("--reps", type=int, help="timed rounds (each runs every variant once)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (also sets OMP_NUM_THREADS)")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the timed models (every peer runs in it)")
    parser.add_argument("--budget-gib", type=float, help="memory budget for the adapters-that-fit column")
    parser.add_argument("--blocks", type=strs, default=None, help="the chosen block set of the FLOP grid")
    parser.add_argument("--stages", type=strs, help="subset of flops,latency,multitenant")
    parser.add_argument("--note", default="", help="free text recorded in the report (e.g. 'shared machine')")
    parser.add_argument("--report-only", metavar="JSON", help="rebuild Markdown and plots from a recorded result")


def _preset(args) -> Preset:
    p = PRESETS[args.preset]
    overrides = {
        "flop_models": args.models, "flop_ranks": args.ranks, "timing_models": args.timing_models,
        "latency_ranks": args.latency_ranks, "batches": args.batches, "tenants": args.tenants,
        "tenant_ranks": args.tenant_ranks, "tenant_batch": args.tenant_batch, "warmup": args.warmup,
        "reps": args.reps, "threads": args.threads, "device": args.device, "dtype": args.dtype, "budget_gib": args.budget_gib,
        "stages": args.stages,
    }
    return replace(p, **{k: v for k, v in overrides.items() if v is not None})


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "open_clip_torch", "peft", "selora"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _machine(device: str) -> str:
    desc = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    if device.startswith("cuda") and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc + f", load average at start {os.getloadavg()[0]:.2f}"


def run_suite(p: Preset, preset_name: str, command: str, blocks=None, note: str = "") -> dict:
    """Run the selected stages; returns the result dict (``meta``, ``flops``, ``latency``,
    ``multitenant``, ``memory``)."""
    from selora.models import load_backbone
    from selora.models.factory import ModelError

    torch.set_num_threads(p.threads)
    if p.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("preset needs CUDA but no GPU is visible: use --preset quick or --device cpu")
    start = time.time()
    result = {"meta": {"preset": preset_name, "command": command, "machine": _machine(p.device), "versions": _versions(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preset_settings": p.__dict__, "note": note,
                       "skipped": []},
              "flops": [], "latency": [], "multitenant": [], "memory": []}
    torch.manual_seed(0)
    if "flops" in p.stages:
        spec = grid.GridSpec(ranks=p.flop_ranks, fractions=PAPER_FRACTIONS, chosen_blocks=blocks, peft_batch=min(p.batches))
        for model_id in p.flop_models:
            try:
                bb = load_backbone(model_id)
            except ModelError as e:
                result["meta"]["skipped"].append(f"FLOPs of {model_id}: {e}")
                continue
            steps = 1 + len(spec.ranks) * 2 * (len(spec.fractions) + 2 + (bb.library == "timm"))
            with tqdm(total=steps, desc=f"FLOPs {model_id}", leave=False) as bar:
                result["flops"] += grid.flop_grid(bb, spec, bar.update)
            del bb
        result["memory"] = grid.memory_rows(result["flops"], int(p.budget_gib * 2**30))
    for model_id in p.timing_models if {"latency", "multitenant"} & set(p.stages) else ():
        pristine = load_backbone(model_id, device=p.device, dtype=DTYPES[p.dtype])
        served = peers.pristine_copy(pristine)
        n_var = 9 if pristine.library == "timm" else 7
        if "latency" in p.stages:
            total = len(p.batches) * len(p.latency_ranks) * (p.warmup + p.reps) * n_var
            with tqdm(total=total, desc=f"latency {model_id}", leave=False) as bar:
                result["latency"] += grid.latency_grid(pristine, served, p.latency_ranks, p.batches, p.gated_fraction,
                                                       p.warmup, p.reps, bar.update)
        if "multitenant" in p.stages:
            n_m = 5 if pristine.library == "timm" else 3
            total = len(p.tenant_ranks) * len(p.tenants) * (p.warmup + p.tenant_reps) * n_m
            with tqdm(total=total, desc=f"multi-tenant {model_id}", leave=False) as bar:
                result["multitenant"] += grid.multitenant_grid(pristine, served, p.tenant_ranks, p.tenants, p.tenant_batch,
                                                               p.gated_fraction, p.warmup, p.tenant_reps, bar.update)
        del pristine, served
    result["meta"]["elapsed_s"] = time.time() - start
    result["meta"]["load_average_end"] = os.getloadavg()[0]
    return result


def run(args) -> int:
    import json

    if args.report_only:
        result = json.loads(Path(args.report_only).read_text())
        stem = args.stem or Path(args.report_only).stem
    else:
        p = _preset(args)
        os.environ["OMP_NUM_THREADS"] = str(p.threads)
        command = "selora " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else f"selora bench --preset {args.preset}"
        try:
            result = run_suite(p, args.preset, command, args.blocks, args.note)
        except grid.BenchError as e:
            print(f"selora bench: {e}", file=sys.stderr)
            return 2
        stem = args.stem or f"bench_{args.preset}"
    for path in write_report(result, args.out, stem):
        print(path)
    return 0
