"""Turn a recorded benchmark result (the JSON dict) into a Markdown report and PNG plots.

The main plot follows the paper's Figure 9: rows LoRA and DoRA; left column FLOPs per item
against rank, right column time relative to the base model against rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from selora.bench.targets import evaluate  # noqa: E402

VARIANTS = ("lora", "dora")
_LABELS = {"lora_all": "every block (unmerged)", "chosen": "chosen blocks", "peft": "PEFT (every site)",
           "merged": "merged", "base": "base", "selora_gated": "selora gated", "merge_swap": "merge-and-swap",
           "selora": "selora", "peft_mixed_dense": "PEFT mixed (plain LoRA)", "peft_mixed_sparse": "PEFT mixed (same sparse blocks)"}


def _label(method: str, row: dict | None = None) -> str:
    if method.startswith("gated_") and row is not None:
        return f"gated {row['active_blocks']}/{row['num_blocks']} ({100 * row['fraction']:.2f} %)"
    return _LABELS.get(method, method)


def _g(flops: float) -> str:
    return f"{flops / 1e9:.4g}"


def _color(method: str):
    """One colour per method across every subplot."""
    order = ["lora_all", "peft", "selora_gated", "merged", "chosen", "selora", "merge_swap", "peft_mixed_dense", "peft_mixed_sparse"]
    if method.startswith("gated_"):  # shades of green, darker with more active blocks
        return plt.cm.Greens(min(0.95, 0.35 + 0.04 * int(method.split("_")[1])))
    return f"C{order.index(method) % 10}" if method in order else "k"


# -- Markdown -----------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _flops_md(flops: list[dict]) -> str:
    parts = []
    for model in dict.fromkeys(r["model"] for r in flops):
        rows = [r for r in flops if r["model"] == model]
        base = next(r for r in rows if r["method"] == "base")
        merged = next((r for r in rows if r["method"] == "merged"), None)
        towers = " + ".join(base["counted"])
        parts.append(f"### {model} — GFLOPs per item ({towers}); base {_g(base['flops'])}"
                     + (f", merged {_g(merged['flops'])}" if merged else ""))
        methods = list(dict.fromkeys(r["method"] for r in rows if r["variant"] and r["method"] != "merged"))
        sample = {m: next(r for r in rows if r["method"] == m) for m in methods}
        header = ["variant", "rank"] + [_label(m, sample[m]) for m in methods] + ["all equal closed form"]
        table = []
        for variant in VARIANTS:
            for rank in sorted({r["rank"] for r in rows if r["variant"] == variant and r["method"] != "merged"}):
                cells = {r["method"]: r for r in rows if r["variant"] == variant and r["rank"] == rank}
                table.append([variant, rank] + [_g(cells[m]["flops"]) if m in cells else "" for m in methods]
                             + ["yes" if all(c["match"] for c in cells.values()) else "NO"])
        parts.append(_table(header, table))
    return "\n\n".join(parts)


def _latency_md(latency: list[dict]) -> str:
    rows = [[r["model"], r["batch"], r["rank"], _label(r["method"]), r["variant"] or "", f"{r['active_blocks']}/{r['num_blocks']}",
             f"{1e3 * r['p50_s']:.1f}", f"{1e3 * r['p99_s']:.1f}", f"{r['images_per_s']:.2f}", f"{r['rel_base']:.3f}"] for r in latency]
    return _table(["model", "batch", "rank", "method", "variant", "active", "p50 ms", "p99 ms", "images/s", "time / base"], rows)


def _multitenant_md(rows: list[dict]) -> str:
    out = [[r["model"], r["batch"], r["rank"], r["num_adapters"], _label(r["method"]), f"{r['active_blocks']}/{r['num_blocks']}",
            f"{1e3 * r['p50_s']:.1f}", f"{r['images_per_s']:.2f}", f"{r['rel_base']:.3f}"] for r in rows]
    return _table(["model", "batch", "rank", "adapters", "method", "active/adapter", "p50 ms", "images/s", "time / base"], out)


def _memory_md(rows: list[dict]) -> str:
    gib = rows[0]["budget_bytes"] / 2**30 if rows else 0
    out = [[r["model"], r["variant"], r["rank"], f"{r['active_blocks']}/{r['num_blocks']}", f"{r['sparse_bytes'] / 2**20:.3f}",
            f"{r['dense_bytes'] / 2**20:.3f}", r["fit_sparse"], r["fit_dense"]] for r in rows]
    return _table(["model", "variant", "rank", "active", "sparse MiB", "dense MiB (every block)",
                   f"sparse in {gib:g} GiB", f"dense in {gib:g} GiB"], out)


def markdown(result: dict, images: list[str]) -> str:
    meta = result["meta"]
    met = lambda m: {True: "met", False: "**not met**", None: "n/a"}[m]  # noqa: E731
    sections = [
        f"# selora bench — preset `{meta['preset']}`",
        f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \nVersions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f"  \nStarted: {meta['started']}, took {meta.get('elapsed_s', 0):.0f} s. {meta.get('note', '')}",
        "FLOPs = 2 per multiply-add, matrix products only (GEMMs, patch convolution, the two attention "
        "matmuls), as `FlopCounterMode` counts them; elementwise work is not counted. Per item: one image "
        "(vision) and, for CLIP, one text (text tower). Random weights: FLOPs and speed do not depend on them.",
        "## Targets\n\n" + _table(["target", "measured", "status"],
                                  [[t["target"], t["measured"], met(t["met"])] for t in evaluate(result)]),
    ]
    sections += [f"![{p}]({p})" for p in images]
    if result.get("flops"):
        sections.append("## FLOPs\n\n" + _flops_md(result["flops"]))
    if result.get("latency"):
        sections.append("## Latency, one adapter, unmerged (interleaved with the base model; medians)\n\n" + _latency_md(result["latency"]))
    if result.get("multitenant"):
        sections.append("## Multi-tenant: one batch, K distinct gated LoRA adapters\n\n" + _multitenant_md(result["multitenant"]))
    if result.get("memory"):
        sections.append("## Memory per resident adapter (`DeviceAdapter.nbytes`)\n\n" + _memory_md(result["memory"]))
    return "\n\n".join(sections) + "\n"


# -- plots --------------------------------------------------------------------------------
def plot_figure9(result: dict, path: Path) -> None:
    """2x2: rows LoRA / DoRA; FLOPs vs rank (left), time relative to base vs rank (right)."""
    flops, latency = result.get("flops", []), result.get("latency", [])
    models = list(dict.fromkeys(r["model"] for r in flops))
    fmodel = next((m for m in models if "ViT-B-16" in m), models[0] if models else None)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for i, variant in enumerate(VARIANTS):
        ax = axes[i][0]
        rows = [r for r in flops if r["model"] == fmodel]
        for method in dict.fromkeys(r["method"] for r in rows if r["variant"] == variant and r["method"] != "merged"):
            pts = sorted((r["rank"], r["flops"] / 1e9) for r in rows if r["method"] == method and r["variant"] == variant)
            sample = next(r for r in rows if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=_label(method, sample), color=_color(method))
        base = [r["flops"] / 1e9 for r in rows if r["method"] == "base"]
        if base:
            ax.axhline(base[0], color="gray", ls="--", label="base = merged")
        ax.set(xscale="log", xlabel="rank", ylabel="GFLOPs per item", title=f"{variant.upper()}: FLOPs ({fmodel})")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
        ax = axes[i][1]
        if latency:
            batch = min(r["batch"] for r in latency)
            lrows = [r for r in latency if r["batch"] == batch and r["variant"] == variant]
            for method in dict.fromkeys(r["method"] for r in lrows if r["method"] != "base"):
                pts = sorted((r["rank"], r["rel_base"]) for r in lrows if r["method"] == method)
                ax.plot(*zip(*pts), marker="o", label=_label(method), color=_color(method))
            ax.axhline(1.0, color="gray", ls="--", label="base")
            ax.set(xlabel="rank", ylabel="time / base time", title=f"{variant.upper()}: speed ({latency[0]['model']}, batch {batch})")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_multitenant(rows: list[dict], path: Path) -> None:
    ranks = sorted({r["rank"] for r in rows})
    fig, axes = plt.subplots(1, len(ranks), figsize=(5.5 * len(ranks), 4), squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["num_adapters"], r["images_per_s"]) for r in rows if r["rank"] == rank and r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=_label(method), color=_color(method))
        ax.set(xlabel="distinct adapters in the batch", ylabel="images/s", title=f"multi-tenant, rank {rank}")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(result: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the PNG plots into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json"]
    paths[0].write_text(json.dumps(result, indent=1))
    images = []
    if result.get("flops") or result.get("latency"):
        images.append(out_dir / f"{stem}_figure9.png")
        plot_figure9(result, images[-1])
    if result.get("multitenant"):
        images.append(out_dir / f"{stem}_multitenant.png")
        plot_multitenant(result["multitenant"], images[-1])
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(result, [p.name for p in images]))
    return paths + [md] + images
