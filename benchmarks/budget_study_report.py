"""Markdown tables and plots from ``budget_study.json``: mean ± std over seeds, paired differences
with a t-test over seeds, accuracy against % of blocks, retention against in-distribution
accuracy, the penalty's λ -> blocks curve and the blocks chosen across seeds. At another image
size (``budget_study_{N}px.json``) also the paired comparison with the same configs at 28 px and
the serve check (``budget_study_{N}px_serve.json``)."""

from __future__ import annotations

import json
import math
import re
import statistics
from itertools import combinations
from pathlib import Path

from budget_study import BASE_SIZE, EXTRA_SEEDS, GATE, JSON_PATH, PENALTY_LAMBDAS, SEEDS, json_path, specs
from paper_repro_report import ALL_BLOCKS, NUM_BLOCKS

from selora.training.inspect import plot_heatmap

T_CRIT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 5 % Student t, by degrees of freedom
METRICS = (("id_top1", "Fashion-MNIST top-1"), ("retention_after", "MNIST k-NN (retention)"))


def grouped(runs: dict) -> dict[str, dict[int, dict]]:
    """``{config name: {seed: result}}`` (run names end in ``_s<seed>``)."""
    out: dict[str, dict[int, dict]] = {}
    for name, r in runs.items():
        config, seed = re.fullmatch(r"(.+)_s(\d+)", name).groups()
        out.setdefault(config, {})[int(seed)] = r
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def fmt(values: list[float], scale: float = 100) -> str:
    m, s = mean_std([scale * v for v in values])
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {s:.2f}"


def label(config: str) -> tuple[str, str, str]:
    """Method, rank, budget k (or λ) of a config name."""
    if config == "linear":
        return "Linear probe", "-", "-"
    m = re.fullmatch(r"(lora|dora)_r(\d+)", config)
    if m:
        return m[1].replace("lora", "LoRA").replace("dora", "DoRA"), m[2], "72 (all)"
    m = re.fullmatch(r"(learned|random|paper)_r(\d+)_k(\d+)", config)
    if m:
        names = {"learned": "Learned gates, budget k", "random": "Random k blocks", "paper": "Paper's first k blocks"}
        return names[m[1]], m[2], m[3]
    m = re.fullmatch(r"penalty_r(\d+)_lam([\d.]+)", config)
    return f"Paper's penalty λ={m[2]}", m[1], "-"


def summary_table(groups: dict) -> str:
    lines = ["| Method | R | k | seeds | active blocks (%) | Fashion-MNIST top-1 | MNIST k-NN (retention) | config |",
             "|---|---|---|---|---|---|---|---|"]
    for config, by_seed in groups.items():
        rs = list(by_seed.values())
        method, r, k = label(config)
        blocks = [100 * (x["active_blocks"] or 0) / NUM_BLOCKS for x in rs]
        lines.append(f"| {method} | {r} | {k} | {len(rs)} | {fmt(blocks, 1)} | {fmt([x['id_top1'] for x in rs])} | "
                     f"{fmt([x['retention_after'] for x in rs])} | `{config}` |")
    return "\n".join(lines)


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> tuple[float, float, int, bool]:
    """Mean and std of ``a - b`` over the seeds both have (same seed: same data, batches, A init);
    significant when the paired t statistic exceeds the 5 % two-sided critical value."""
    diffs = [100 * (a[s][key] - b[s][key]) for s in sorted(set(a) & set(b))]
    if len(diffs) < 2:
        return (diffs[0] if diffs else float("nan")), float("nan"), len(diffs), False
    m, s = mean_std(diffs)
    t = abs(m) / (s / len(diffs) ** 0.5) if s > 0 else float("inf")
    return m, s, len(diffs), t > T_CRIT[len(diffs) - 1]


def comparisons(groups: dict) -> str:
    lines = ["| A − B | R | k | seeds | Δ Fashion-MNIST (points) | Δ retention (points) |", "|---|---|---|---|---|---|"]
    pairs = []
    for config in groups:
        m = re.fullmatch(r"learned_r(\d+)_k(\d+)", config)
        if m:
            r, k = m.groups()
            pairs += [(f"learned_r{r}_k{k}", f"random_r{r}_k{k}"), (f"learned_r{r}_k{k}", f"paper_r{r}_k{k}"),
                      (f"paper_r{r}_k{k}", f"random_r{r}_k{k}"), (f"learned_r{r}_k{k}", f"lora_r{r}"),
                      (f"paper_r{r}_k{k}", f"lora_r{r}"), (f"learned_r{r}_k{k}", "linear")]
    pairs += [(c, f"lora_r{m[1]}") for c in groups if (m := re.fullmatch(r"penalty_r(\d+)_lam[\d.]+", c))]
    for a, b in pairs:
        if a not in groups or b not in groups:
            continue
        cells = []
        for key, _ in METRICS:
            d, s, n, sig = paired(groups[a], groups[b], key)
            cells.append(f"{d:+.2f}" + ("" if n < 2 else f" ± {s:.2f}") + (" **(exceeds noise)**" if sig else ""))
        _, r, k = label(a)
        lines.append(f"| `{a}` − `{b}` | {r} | {k} | {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def by_size(groups: dict, base: dict, size: int) -> str:
    """Every config run at both sizes: mean ± std at each over the seeds both have, and the paired
    difference (same seed: same training subset, batch order, A init and random blocks; the same
    test images)."""
    lines = [f"| Method | R | k | seeds | top-1 {BASE_SIZE} px | top-1 {size} px | Δ top-1 ({size} − {BASE_SIZE}) | "
             f"retention {BASE_SIZE} px | retention {size} px | Δ retention | config |", "|" + "---|" * 11]
    for config in (c for c in groups if c in base):
        seeds = sorted(set(groups[config]) & set(base[config]))
        at_size, at_base = ({s: g[config][s] for s in seeds} for g in (groups, base))
        cells = []
        for key, _ in METRICS:
            d, s, n, sig = paired(at_size, at_base, key)
            cells += [fmt([x[key] for x in at_base.values()]), fmt([x[key] for x in at_size.values()]),
                      f"{d:+.2f}" + ("" if n < 2 else f" ± {s:.2f}") + (" **(exceeds noise)**" if sig else "")]
        method, r, k = label(config)
        lines.append(f"| {method} | {r} | {k} | {n} | {' | '.join(cells)} | `{config}` |")
    return "\n".join(lines)


def serve_section(check: dict, size: int) -> list[str]:
    n = check["images"]
    return [f"## Served at {size} px: `{check['run']}` through `/v1/classify`", "",
            f"`budget_study.py --image-size {size} --serve-check`: the adapter file records input_size "
            f"{check['adapter_input_size']}; the upload answered input_size {check['uploaded_input_size']}, and "
            f"`GET /v1/models/fmnist` serves it with `{json.dumps(check['served_preprocessing'])}` (the base runs "
            f"at {check['base_input_size'][0]} px). The {n} test images of the evaluation, sent as 28 px PNGs:", "",
            "| served top-1 | evaluated top-1 (this check) | id_top1 recorded by the sweep | predictions agreeing "
            "(served vs evaluation) | agreeing (served vs the evaluation's forward on the server's pixels) |",
            "|---|---|---|---|---|",
            f"| {100 * check['served_top1']:.2f} | {100 * check['evaluated_top1']:.2f} | "
            + (f"{100 * check['recorded_id_top1']:.2f}" if check["recorded_id_top1"] is not None else "-")
            + f" | {check['agree_served_evaluated']} of {n} ({100 * check['agree_served_evaluated'] / n:.1f} %) | "
            f"{check['agree_served_evaluated_on_server_pixels']} of {n} |", "",
            f"Training, evaluation and the server all upsample 28 -> {size} px through the server's eval transform "
            "(timm's, on the uint8 image: `selora.training.data.to_pixels`), so their inputs differ by "
            f"{check['pixel_diff_mean']:.4f} on average and {check['pixel_diff_max']:.3f} at most (normalised pixels); "
            "the last column separates a difference in the served forward from one in the pixels.", ""]


def jaccard(a: list[str], b: list[str]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b)) if a or b else 1.0


def chance_jaccard(k: int, n: int = NUM_BLOCKS) -> float:
    """Expected Jaccard overlap of two independent uniformly random k-subsets of n blocks."""
    if k == 0:
        return 1.0
    total = math.comb(n, k)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


def block_choices(groups: dict, paper_first: list[str]) -> str:
    lines = ["| config | seed | blocks chosen | overlap with the paper's first k |", "|---|---|---|---|"]
    stability = []
    for config, by_seed in groups.items():
        if not config.startswith(("learned_", "penalty_")):
            continue
        chosen = [by_seed[s]["blocks"] for s in sorted(by_seed)]
        for s in sorted(by_seed):
            bs = by_seed[s]["blocks"]
            shown = ", ".join(bs) if len(bs) <= 12 else f"{len(bs)} blocks"
            overlap = len(set(bs) & set(paper_first[: len(bs)]))
            lines.append(f"| `{config}` | {s} | {shown} | {overlap} of {len(bs)} |")
        if len(chosen) > 1:
            js = [jaccard(a, b) for a, b in combinations(chosen, 2)]
            k = round(statistics.mean(len(c) for c in chosen))
            fc1 = sum(b.endswith(".fc1") for c in chosen for b in c) / max(1, sum(map(len, chosen)))
            stability.append(f"- `{config}`: mean pairwise Jaccard overlap between seeds {statistics.mean(js):.2f} "
                             f"({len(chosen)} seeds; two random sets of {k} blocks: {chance_jaccard(k):.2f}); "
                             f"fc1 blocks {100 * fc1:.0f} % of those chosen (1 in 6 of all blocks)")
    return "\n".join(lines + [""] + stability)


def plots(data: dict, groups: dict, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ranks = sorted({int(m[1]) for c in groups if (m := re.fullmatch(r"learned_r(\d+)_k\d+", c))})
    fig, axes = plt.subplots(len(ranks) or 1, 2, figsize=(10, 3.6 * max(1, len(ranks))), squeeze=False)
    for row, r in zip(axes, ranks):
        for ax, (key, title) in zip(row, METRICS):
            for method, style in (("learned", "o-"), ("random", "s--"), ("paper", "^:")):
                pts = sorted((int(m[1]), g) for c, g in groups.items() if (m := re.fullmatch(rf"{method}_r{r}_k(\d+)", c)))
                if pts:
                    stats = [mean_std([100 * x[key] for x in g.values()]) for _, g in pts]
                    ax.errorbar([100 * k / NUM_BLOCKS for k, _ in pts], [s[0] for s in stats],
                                yerr=[0 if s[1] != s[1] else s[1] for s in stats], fmt=style, capsize=3, label=method)
            for config, color, name in ((f"lora_r{r}", "C3", "LoRA (100 %)"), ("linear", "gray", "linear probe (0 %)")):
                if config in groups:
                    m, s = mean_std([100 * x[key] for x in groups[config].values()])
                    ax.axhline(m, color=color, ls="-.", lw=1, label=name)
                    if s == s:
                        ax.axhspan(m - s, m + s, color=color, alpha=0.12)
            if key == "retention_after":
                ax.axhline(100 * data["retention_before"], color="k", ls=":", lw=1, label="base model")
            ax.set_xlabel("active blocks (% of 72)")
            ax.set_ylabel("accuracy (%), mean ± std over seeds")
            ax.set_title(f"{title}, r={r}", fontsize=10)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    made.append(out / f"{stem}_accuracy_vs_blocks.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for config, g in groups.items():
        (mx, sx), (my, sy) = (mean_std([100 * x[key] for x in g.values()]) for key, _ in METRICS)
        ax.errorbar(mx, my, xerr=0 if sx != sx else sx, yerr=0 if sy != sy else sy, fmt="o", capsize=2)
        ax.annotate(config, (mx, my), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * data["retention_before"], color="k", ls=":", lw=1)
    ax.set_xlabel("Fashion-MNIST top-1 (%)")
    ax.set_ylabel("MNIST k-NN retention (%)")
    ax.set_title("Retention vs in-distribution accuracy (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    made.append(out / f"{stem}_retention_vs_accuracy.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    curves = {r: [(lam, groups[f"penalty_r{r}_lam{lam}"]) for lam in PENALTY_LAMBDAS if f"penalty_r{r}_lam{lam}" in groups]
              for r in (4, 16, 64)}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for r, pts in curves.items():
            if not pts:
                continue
            stats = [mean_std([100 * x["active_blocks"] / NUM_BLOCKS for x in g.values()]) for _, g in pts]
            ax.errorbar([p[0] for p in pts], [s[0] for s in stats], yerr=[0 if s[1] != s[1] else s[1] for s in stats],
                        fmt="o-", capsize=3, label=f"r = {r}")
        ax.axhspan(5, 10, color="C2", alpha=0.15, label="5-10 % (paper)")
        ax.set_xlabel("λ (paper eq. 4: λ·Σ|s|), score lr 0.05")
        ax.set_ylabel("active blocks (%), mean ± std")
        ax.set_title("The paper's penalty: λ -> blocks kept, per rank (cf. Fig. 8)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / f"{stem}_penalty_curve.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

    learned = [r["blocks"] for c, g in groups.items() if c.startswith("learned_") for r in g.values()]
    if learned:
        made.append(plot_heatmap(learned, ALL_BLOCKS, out / f"{stem}_heatmap.png",
                                 f"blocks chosen under a budget, {len(learned)} runs (cf. paper Fig. 11)"))
    return made


def write_report(path: Path, out: Path, grid: str = "full") -> None:
    data = json.loads(path.read_text())
    groups = grouped(data["runs"])
    paper_first = data["paper_order"]
    size = data["schedule"]["image_size"]
    made = plots(data, groups, out, path.stem)
    full = {s["name"] for s in specs(grid, paper_first)}
    missing = full - set(data["runs"])
    configs = {re.sub(r"_s\d+$", "", m) for m in missing}
    not_run = ", ".join(sorted(configs - set(groups))) or "none"
    planned = {}
    for name in full:
        config = re.sub(r"_s\d+$", "", name)
        planned[config] = planned.get(config, 0) + 1
    incomplete = ", ".join(f"{c} ({len(groups[c])} of {planned[c]} seeds)" for c in sorted(configs & set(groups))) or "none"
    extra = sorted({re.sub(r"_s\d+$", "", n) for n in full if int(re.search(r"_s(\d+)$", n)[1]) in EXTRA_SEEDS})
    md = ["# The 5 % claim under a block budget, over seeds (issue 16): DINOv2-S, Fashion-MNIST -> MNIST"
          + ("" if size == BASE_SIZE else f", at {size} px"), "",
          f"Command: `{data['command']}` (resumable: finished runs are skipped)  ",
          f"Machine: {data['machine']}  ",
          f"Schedule (every run; each run sets its seed, the gated ones λ and score lr): `{json.dumps(data['schedule'])}`  ",
          f"Evaluation: `{json.dumps(data['eval'])}`  ",
          f"Learned gates: `{json.dumps(GATE)}`; base model MNIST k-NN before training: {100 * data['retention_before']:.2f}", "",
          f"Runs finished: {len(data['runs'])} of the {grid} grid's {len(full)} ({len(SEEDS)} seeds each"
          + (f"; {len(SEEDS) + len(EXTRA_SEEDS)} for {', '.join(extra)}" if extra else "") + "). "
          f"Not run at all: {not_run}. Not every seed yet: {incomplete}.", "",
          "## Mean ± std over seeds", "", summary_table(groups), "",
          "## Paired differences (same seed), mean ± std over seeds", "",
          "A difference *exceeds noise* when the paired t statistic over seeds is above the two-sided 5 % "
          "critical value (2.57 with 6 seeds, 4.30 with 3, 12.7 with 2). Each accuracy is measured on the same 1,000 test "
          "images, so test-set sampling (about 1.3 points of standard error) is shared by both sides.", "",
          comparisons(groups), "", *[f"![{p.stem}]({p.name})" for p in made], "",
          "## Blocks chosen across seeds (cf. paper Fig. 10-11)", "",
          f"The paper's first blocks: {', '.join(paper_first[:8])}", "", block_choices(groups, paper_first), ""]
    if size != BASE_SIZE:
        base = json.loads(JSON_PATH.read_text())
        md += [f"## {size} px against {BASE_SIZE} px (`{JSON_PATH.name}`), paired by seed", "",
               f"Base model MNIST k-NN before training: {100 * base['retention_before']:.2f} at {BASE_SIZE} px, "
               f"{100 * data['retention_before']:.2f} at {size} px. Same noise rule as above (paired t over seeds).", "",
               by_size(groups, grouped(base["runs"]), size), ""]
        serve = json_path(size, "_serve")
        if serve.exists():
            md += serve_section(json.loads(serve.read_text()), size)
    notes = out / f"{path.stem}_notes.md"
    if notes.exists():
        md += [notes.read_text()]
    (out / f"{path.stem}.md").write_text("\n".join(md))

