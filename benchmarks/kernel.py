"""GPU benchmark of the fused LoRA/DoRA kernel (issue 3) against its peers, in one run.

For each ViT layer shape (d = 384, 768, 1024: the sites qkv d→3d with 3 blocks, out d→d, fc1
d→4d, fc2 4d→d), batch of 197 × {1, 8, 64, 256} tokens, rank, fraction of active blocks and
number of distinct adapters in the batch (items split evenly between adapters; each adapter's
block active with that probability), ``triton.testing.do_bench`` times:

- ``base``: ``F.linear`` (the base GEMM alone);
- ``fused``: ``selora.kernels.ops.lora_linear`` (the Triton kernel, in the configured mode:
  the base GEMM where the GPU's tuning data puts it, ``base_gemm``);
- ``fused_tile`` / ``fused_library``: the kernel called directly with the base GEMM in its tiles,
  or done by torch (cuBLAS) with the kernel adding the LoRA terms to the tiles entries meet;
  which of the two is faster decides the tuning file's ``base_gemm``;
- ``unfused``: per adapter, ``x_j·W0ᵀ + b`` then ``(x_j·Aᵀ)·Bᵀ`` per active block (torch ops);
- ``peft_loop``: PEFT's mixed-batch style: base once, then a Python loop over adapters with
  index masks (``y[idx] += lora(x[idx])``);
- ``merged``: per adapter, ``F.linear`` with its pre-merged weight (merge cost excluded).

Adapters are LoRA (DoRA adds one per-channel multiply in the same epilogue). The model-level
ratio for a configuration is the sum over the 4 sites. Writes ``results/kernel.{json,md,png}``
with the GPU's name and the command; the issue's targets are printed beside the measured ratios.

    .venv/bin/python benchmarks/kernel.py                       # GPU: full grid
    .venv/bin/python benchmarks/kernel.py --preset targets      # GPU: the three target points
    .venv/bin/python benchmarks/kernel.py --smoke               # CPU: interpreter smoke run only

``--smoke`` checks that the script works end to end on CPU (Triton interpreter, tiny shapes,
outputs checked against the reference) and writes ``results/kernel_smoke.*``; its timings are
interpreter timings, not speed results. Without a GPU and without ``--smoke`` it exits with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGETS = [  # (name, description, metric, bound)
    ("sparse-r16", "r=16, 5% active, 32 adapters: model linears / base GEMMs", "fused/base", "<= 1.05"),
    ("dense-r16", "r=16, 100% active: model linears / base GEMMs", "fused/base", "<= 1.20"),
    ("dense-r256", "r=256: unfused torch LoRA / fused", "unfused/fused", ">= 3"),
]
MODES = {"measured": "fused", "base_in_tile": "fused_tile", "base_by_torch": "fused_library"}  # report key -> peer
PRESETS = {
    "full": dict(dims=[384, 768, 1024], batches=[1, 8, 64, 256], ranks=[4, 16, 64, 256],
                 fractions=[0.0, 0.05, 0.25, 1.0], adapters=[1, 8, 32, 64]),
    "targets": dict(dims=[384, 768, 1024], batches=[64], ranks=[16, 256], fractions=[0.05, 1.0], adapters=[32]),
    "smoke": dict(dims=[32], batches=[2, 4], ranks=[4, 40], fractions=[0.0, 0.5, 1.0], adapters=[1, 2]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--smoke", action="store_true", help="CPU/interpreter smoke run (not a speed result)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--tokens", type=int, default=197, help="tokens per item (ViT-*/16 at 224 px: 197)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dims", type=int, nargs="+", default=None, help="only these model widths (split a long grid over calls)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement (ms)")
    p.add_argument("--out", type=Path, default=None, help="output stem (default results/kernel or kernel_smoke)")
    p.add_argument("--split-shrink-rank", type=int, default=None,
                   help="block ranks above this take the split shrink (default: the tuning file's fused_shrink_max_rank)")
    p.add_argument("--save-tuning", action="store_true",
                   help="GPU: add the autotuner's choices of this run to selora/kernels/configs/<GPU>.json (the 'tuned' table)")
    return p.parse_args(argv)


def sites(d: int) -> dict[str, tuple[int, int, int]]:
    """site -> (d_in, d_out, blocks) of one ViT layer."""
    return {"qkv": (d, 3 * d, 3), "out": (d, d, 1), "fc1": (d, 4 * d, 1), "fc2": (4 * d, d, 1)}


def make_layer(torch, rng, gen, d_in, d_out, n_blocks, groups, rank, fraction, device, dtype):
    """Random adapters on one site, made on ``device`` (``gen``: a generator there): ``groups``
    = item ranges of the adapters present; each block active with probability ``fraction``
    (drawn from ``rng``, a ``random.Random``)."""
    from selora.kernels.batch import DeviceBlock, pack_layer

    out_size, work, merged = d_out // n_blocks, [], []
    for start, end in groups:
        delta = torch.zeros(d_out, d_in, device=device)
        for b in range(n_blocks):
            if rng.random() >= fraction:
                continue
            a = torch.randn(rank, d_in, generator=gen, device=device) / math.sqrt(d_in)
            bt = torch.randn(rank, out_size, generator=gen, device=device) / math.sqrt(rank)
            delta[b * out_size : (b + 1) * out_size] = 2.0 / rank * bt.t() @ a
            work.append((start, end, DeviceBlock(f"b{b}", b * out_size, a.to(device, dtype), bt.to(device, dtype), 2.0 / rank)))
        merged.append(delta)
    return (pack_layer(work) if work else None), merged


def peers(torch, F, x, w, b, layer, groups, merged_w, config):
    """The compared implementations, as zero-argument callables."""
    from selora.kernels.ops import lora_linear
    from selora.kernels.triton_lora import triton_lora_linear

    def direct(base_gemm):
        mode = dataclasses.replace(config, base_gemm=base_gemm)
        return lambda: F.linear(x, w, b) if layer is None else triton_lora_linear(x, w, b, layer, mode)

    def weights(e):
        ranks = slice(e.rank_start, e.rank_start + e.rank)
        return layer.buffers.lora_a[ranks], layer.buffers.lora_bt[ranks]

    def unfused():
        ys = [F.linear(x[:groups[0][0]], w, b)]
        for start, end in groups:
            xs = x[start:end]
            y = F.linear(xs, w, b)
            for e in (layer.entries if layer else []):
                if e.item_start == start:
                    a, bt = weights(e)
                    y[..., e.out_start : e.out_start + layer.out_size] += (xs @ a.t()) @ bt * e.scale
            ys.append(y)
        return torch.cat(ys)

    def peft_loop():
        y = F.linear(x, w, b)
        for start, end in groups:
            idx = torch.arange(start, end, device=x.device)
            sub, delta = x[idx], None
            for e in (layer.entries if layer else []):
                if e.item_start == start:
                    if delta is None:
                        delta = torch.zeros(*sub.shape[:-1], w.shape[0], device=x.device, dtype=x.dtype)
                    a, bt = weights(e)
                    delta[..., e.out_start : e.out_start + layer.out_size] = (sub @ a.t()) @ bt * e.scale
            if delta is not None:
                y[idx] += delta
        return y

    def merged():
        return torch.cat([F.linear(x[:groups[0][0]], w, b)] + [F.linear(x[s:e], mw, b) for (s, e), mw in zip(groups, merged_w)])

    return {"base": lambda: F.linear(x, w, b), "fused": lambda: lora_linear(x, w, b, layer, config),
            "fused_tile": direct("fused"), "fused_library": direct("library"),
            "unfused": unfused, "peft_loop": peft_loop, "merged": merged}


def cpu_bench(fn, reps=3):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from selora.kernels.config import KernelConfig
    from selora.kernels.ops import lora_linear_flops
    from selora.kernels.reference import lora_linear_reference

    device = "cuda" if not args.smoke else "cpu"
    config = KernelConfig.resolve(device, "triton", None, args.split_shrink_rank)  # on CPU: Triton's interpreter
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.smoke:
        dtype = torch.float32
        bench = cpu_bench
    else:
        from triton.testing import do_bench

        bench = lambda fn: do_bench(fn, rep=args.rep_ms)  # noqa: E731
    grid = dict(PRESETS["smoke" if args.smoke else args.preset])
    if args.dims:
        grid["dims"] = args.dims
    tokens = 3 if args.smoke else args.tokens
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rng = random.Random(args.seed)
    rows = []
    for d, batch, rank, fraction, n_adapters in itertools.product(*grid.values()):
        present = min(n_adapters, batch)
        base_items = 0 if present == batch else batch % present
        per = (batch - base_items) // present
        groups = [(base_items + j * per, base_items + (j + 1) * per) for j in range(present)]
        for site, (d_in, d_out, n_blocks) in sites(d).items():
            w = (torch.randn(d_out, d_in, generator=gen, device=device) / math.sqrt(d_in)).to(dtype)
            b = (0.1 * torch.randn(d_out, generator=gen, device=device)).to(dtype)
            x = torch.randn(batch, tokens, d_in, generator=gen, device=device).to(dtype)
            layer, deltas = make_layer(torch, rng, gen, d_in, d_out, n_blocks, groups, rank, fraction, device, dtype)
            merged_w = [w + dl.to(device, dtype) for dl in deltas]
            fns = peers(torch, F, x, w, b, layer, groups, merged_w, config)
            if layer is not None:  # every peer computes the op: check before timing
                want = lora_linear_reference(x.float(), w.float(), b.float(), layer_float(torch, layer))
                for name in ("fused", "fused_tile", "fused_library", "unfused", "peft_loop", "merged"):
                    torch.testing.assert_close(fns[name]().float(), want, atol=0.1, rtol=0.05)
            ms = {name: bench(fn) for name, fn in fns.items()}
            flops = lora_linear_flops(x.shape, w.shape, layer)
            rows.append(dict(d=d, site=site, items=batch, tokens=tokens, rank=rank, fraction=fraction, adapters=n_adapters,
                             entries=0 if layer is None else layer.num_entries, flops=flops, ms=ms,
                             fused_tflops=flops / ms["fused"] / 1e9))
        print(f"{'[smoke: interpreter, not a speed result] ' if args.smoke else ''}d={d} items={batch} r={rank} active={fraction:.0%} adapters={n_adapters}: "
              f"fused/base={model_ratio(rows[-4:], 'fused', 'base'):.3f} "
              f"unfused/fused={model_ratio(rows[-4:], 'unfused', 'fused'):.2f}", flush=True)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    return dict(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=machine, dtype=str(dtype)[6:],
                backend=config.backend, smoke=args.smoke, torch=torch.__version__, rows=rows,
                targets=evaluate_targets(rows))


def layer_float(torch, layer):
    from selora.kernels.batch import SiteBuffers

    b = layer.buffers
    return dataclasses.replace(layer, buffers=SiteBuffers(b.lora_a.float(), b.lora_bt.float(), b.dora_factor.float(), b.scales,
                                                          b.host_scales))


def model_ratio(site_rows, num, den):
    return sum(r["ms"][num] for r in site_rows) / sum(r["ms"][den] for r in site_rows)


def configs(rows):
    keys = ("d", "items", "rank", "fraction", "adapters")
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def evaluate_targets(rows):
    """The issue's three targets, measured on every matching configuration (model = 4 sites)."""
    found = []
    for (d, items, rank, fraction, adapters), site_rows in configs(rows).items():
        if rank == 16 and fraction == 0.05 and adapters == 32:
            found.append(("sparse-r16", d, items, lambda k: model_ratio(site_rows, k, "base")))
        if rank == 16 and fraction == 1.0:
            found.append(("dense-r16", d, items, lambda k: model_ratio(site_rows, k, "base")))
        if rank == 256 and fraction == 1.0:
            found.append(("dense-r256", d, items, lambda k: model_ratio(site_rows, "unfused", k)))
    return [dict(target=t, d=d, items=items, **{k: round(ratio(name), 3) for k, name in MODES.items()})
            for t, d, items, ratio in found]


def write(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Fused LoRA kernel benchmark{' — SMOKE RUN (CPU interpreter, not a speed result)' if report['smoke'] else ''}",
             "", f"- machine: {report['machine']}", f"- command: `{report['command']}`",
             f"- dtype: {report['dtype']}, backend: {report['backend']}, torch {report['torch']}", "",
             "## Targets (issue 3)", "", "measured: the op as configured; then the kernel with the base GEMM in its tiles, "
             "and with torch's GEMM plus the kernel's LoRA pass.", "",
             "| target | bound | d | items | measured | base in tile | base by torch |", "|---|---|---|---|---|---|---|"]
    bounds = {t[0]: (t[1], t[2], t[3]) for t in TARGETS}
    for t in report["targets"]:
        desc, metric, bound = bounds[t["target"]]
        lines.append(f"| {desc} | {metric} {bound} | {t['d']} | {t['items']} | {t['measured']} | {t['base_in_tile']} | {t['base_by_torch']} |")
    if not report["targets"]:
        lines.append("| (no configuration of this run matches a target) | | | | | | |")
    lines += ["", "## Per configuration (sum over the 4 sites of one layer; times in ms)", "",
              "| d | items×tokens | rank | active | adapters | base | fused | base in tile | base by torch | unfused | peft_loop | merged | fused/base | unfused/fused |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (d, items, rank, fraction, adapters), rs in configs(report["rows"]).items():
        t = {k: sum(r["ms"][k] for r in rs) for k in rs[0]["ms"]}
        lines.append(f"| {d} | {items}×{rs[0]['tokens']} | {rank} | {fraction:.0%} | {adapters} | {t['base']:.3f} | {t['fused']:.3f} | "
                     f"{t['fused_tile']:.3f} | {t['fused_library']:.3f} | {t['unfused']:.3f} | {t['peft_loop']:.3f} | {t['merged']:.3f} | {t['fused'] / t['base']:.3f} | {t['unfused'] / t['fused']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, stem.with_suffix(".png"))


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series = {}
    for (d, items, rank, fraction, adapters), rs in configs(report["rows"]).items():
        series.setdefault((rank, adapters), []).append((fraction, model_ratio(rs, "fused", "base")))
    for (rank, adapters), pts in sorted(series.items()):
        by_fraction = {}
        for f, v in pts:
            by_fraction.setdefault(f, []).append(v)
        fs = sorted(by_fraction)
        ax.plot([100 * f for f in fs], [statistics.mean(by_fraction[f]) for f in fs], marker="o", label=f"r={rank}, {adapters} adapters")
    for bound in (1.05, 1.20):
        ax.axhline(bound, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("active blocks (%)")
    ax.set_ylabel("fused / base GEMM time (mean over shapes)")
    ax.set_title(f"{report['machine']}{' — smoke, not a speed result' if report['smoke'] else ''}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_tuning(device_name: str, command: str) -> Path:
    """Merge this process's autotuned tiles into ``configs/<slug of the GPU>.json``: from then on
    that GPU launches those keys with their tile, without autotuning."""
    from selora.kernels import triton_lora, tuning

    path = tuning.device_tuning_path(device_name)
    base = json.loads((path if path.exists() else tuning.CONFIG_DIR / "default.json").read_text())
    base["tuned"] = {**base.get("tuned", {}), **triton_lora.TUNED}
    base["note"] = (f"{device_name}: candidates as in default.json; 'tuned' holds the autotuner's choice per key, "
                    f"measured by `{command}` ({time.strftime('%Y-%m-%d')}).")
    path.write_text(json.dumps(base, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernel.py needs a CUDA GPU (triton.testing.do_bench); none here. "
              "Use --smoke for a CPU check that the script runs (not a speed result).", file=sys.stderr)
        return 2
    report = run(args)
    if args.save_tuning and not args.smoke:
        print(f"wrote {save_tuning(torch.cuda.get_device_name(), report['command'])}")
    stem = args.out or RESULTS / ("kernel_smoke" if args.smoke else "kernel")
    write(report, stem)
    for t in report["targets"]:
        print(f"target {t['target']} (d={t['d']}, items={t['items']}): measured {t['measured']} "
              f"(base in tile {t['base_in_tile']}, base by torch {t['base_by_torch']})")
    print(f"wrote {stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
