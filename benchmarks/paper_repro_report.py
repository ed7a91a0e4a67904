"""Markdown table (shaped like the paper's Tables 3-4) and plots from ``paper_repro.json``."""

from __future__ import annotations

import json
from pathlib import Path

from selora.training.inspect import plot_heatmap
from selora.models.blocks import KINDS

NUM_BLOCKS = 72  # DINOv2-S: 12 layers x 6 kinds
ALL_BLOCKS = [f"vision.{i}.{k}" for i in range(12) for k in KINDS]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _row(name: str, r: dict, label: str, rank, lam) -> str:
    blocks = r.get("active_blocks")
    blocks_pct = "-" if blocks is None or r["spec"]["method"] in ("linear_probe", "full_ft") else f"{100 * blocks / NUM_BLOCKS:.2f}"
    mean = (r["id_top1"] + r["retention_after"]) / 2
    return (f"| {label} | {rank} | {lam} | {blocks_pct} | {_pct(r['id_top1'])} | {_pct(r['retention_after'])} | "
            f"{_pct(mean)} | `{name}` |")


def table(data: dict) -> str:
    runs = data["runs"]
    lines = ["| Method | R | λ | Blocks (%) | Fashion-MNIST top-1 | MNIST k-NN (retention) | Mean | run |",
             "|---|---|---|---|---|---|---|---|",
             f"| DINOv2-S (no training) | - | - | - | - | {_pct(data['retention_before'])} | - | base |"]
    order = [("linear", "Linear", "-", "-"), ("full_ft", "FT", "-", "-"), ("full_ft_lr0.001", "FT, lr 0.001", "-", "-")]
    order += [(f"lora_r{r}", "LoRA", r, "-") for r in (4, 16, 64)]
    order += [(f"sel_r{r}_lam{lam}", "+Ours", r, lam) for lam in (1.0, 0.5, 0.1) for r in (4, 16, 64)]
    order += [("random_like_sel_r16_lam1.0", "Random (k of λ=1)", 16, "-"),
              ("random_like_sel_r16_lam0.5", "Random (k of λ=0.5)", 16, "-"),
              ("dora_r16", "DoRA", 16, "-"), ("sel_dora_r16_lam1.0", "DoRA+Ours", 16, 1.0)]
    order += [(f"sel_r{r}_lam{lam}_mean", "+Ours, mean penalty", r, lam)
              for lam in (1.0, 0.5, 0.1) for r in (4, 16, 64)]
    order += [("random_like_sel_r16_lam1.0_mean", "Random (k of λ=1, mean penalty)", 16, "-"),
              ("sel_dora_r16_lam1.0_mean", "DoRA+Ours, mean penalty", 16, 1.0)]
    for name, label, rank, lam in order:
        if name in runs:
            lines.append(_row(name, runs[name], label, rank, lam))
    return "\n".join(lines)


def plots(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, made = data["runs"], []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, fmt in [("LoRA", "lora_r{r}"), ("+Ours λ=1 (sum)", "sel_r{r}_lam1.0"),
                       ("+Ours λ=1 (mean)", "sel_r{r}_lam1.0_mean"), ("+Ours λ=0.5 (mean)", "sel_r{r}_lam0.5_mean"),
                       ("+Ours λ=0.1 (mean)", "sel_r{r}_lam0.1_mean")]:
        pts = [(r, runs[fmt.format(r=r)]) for r in (4, 16, 64) if fmt.format(r=r) in runs]
        if pts:
            a1.plot([p[0] for p in pts], [100 * p[1]["id_top1"] for p in pts], "o-", label=label)
            a2.plot([p[0] for p in pts], [100 * p[1]["retention_after"] for p in pts], "o-", label=label)
    for ax, title in ((a1, "Fashion-MNIST top-1 (in-distribution)"), (a2, "MNIST k-NN (retention)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
    a2.axhline(100 * data["retention_before"], color="gray", ls="--", label="base model")
    a2.legend(fontsize=8)
    fig.tight_layout()
    made.append(out / "paper_repro_accuracy_vs_rank.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for r, suffix in [(4, ""), (16, ""), (64, ""), (4, "_mean"), (16, "_mean"), (64, "_mean")]:
        pts = [(lam, runs[f"sel_r{r}_lam{lam}{suffix}"]) for lam in (0.1, 0.5, 1.0) if f"sel_r{r}_lam{lam}{suffix}" in runs]
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1]["active_blocks"] / NUM_BLOCKS for p in pts], "o-",
                    label=f"r={r}" + (", mean penalty" if suffix else ""))
    ax.set_xlabel("λ")
    ax.set_ylabel("active blocks (%)")
    ax.set_title("Blocks kept vs λ (cf. paper Fig. 8)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    made.append(out / "paper_repro_blocks_vs_lambda.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    gated = [r["blocks"] for n, r in runs.items() if n.startswith("sel_") and n.endswith("_mean")]
    if gated:
        made.append(plot_heatmap(gated, ALL_BLOCKS, out / "paper_repro_heatmap.png",
                                 f"active blocks over {len(gated)} selective runs, mean penalty (cf. paper Fig. 11)"))
    return made


def write_report(json_path: Path, out: Path) -> None:
    data = json.loads(json_path.read_text())
    made = plots(data, out)
    md = ["# Paper reproduction (reduced schedule): DINOv2-S, Fashion-MNIST -> MNIST retention", "",
          f"Command: `{data['command']}`  ", f"Machine: {data['machine']}  ",
          f"Schedule: `{json.dumps(data['schedule'])}`  ", f"Evaluation: `{json.dumps(data['eval'])}`", "",
          table(data), "", *[f"![{p.stem}]({p.name})" for p in made], ""]
    notes = out / "paper_repro_notes.md"
    if notes.exists():
        md += [notes.read_text()]
    (out / "paper_repro.md").write_text("\n".join(md))
