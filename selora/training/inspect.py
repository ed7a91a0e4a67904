"""``selora inspect <adapter>``: what an adapter holds, and a heatmap of its active blocks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from selora.adapters.format import AdapterError, SparseAdapter, load_adapter
from selora.models.blocks import KINDS


def summary(adapter: SparseAdapter) -> dict:
    towers = sorted({b.split(".")[0] for b in adapter.blocks} | {b.split(".")[0] for b in adapter.gate.get("scores", {})})
    scored = len(adapter.gate.get("scores", {}))
    return {
        "base_model": adapter.base_model,
        "base_fingerprint": adapter.base_fingerprint,
        "variant": adapter.variant,
        "r": adapter.r,
        "lora_alpha": adapter.lora_alpha,
        "active_blocks": list(adapter.blocks),
        "num_active": len(adapter.blocks),
        "num_scored": scored,
        "active_fraction": len(adapter.blocks) / scored if scored else None,
        "parameters": adapter.num_parameters,
        "bytes": adapter.nbytes,
        "towers": towers,
        "head_classes": adapter.head_classes,
    }


def activation_grid(block_ids, tower: str, num_layers: int) -> np.ndarray:
    """``[layers, kinds]`` counts of the given blocks (one adapter: 0/1; several: sums)."""
    grid = np.zeros((num_layers, len(KINDS)))
    for b in block_ids:
        t, layer, kind = b.split(".")
        if t == tower and int(layer) < num_layers:
            grid[int(layer), KINDS.index(kind)] += 1
    return grid


def plot_heatmap(adapters_blocks: list[list[str]], all_blocks: list[str], path: Path, title: str = "") -> Path:
    """Normalised count of active blocks over runs, one panel per tower (paper Figs. 10-11)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = sorted({b.split(".")[0] for b in all_blocks}, key=lambda t: t != "vision")
    fig, axes = plt.subplots(len(towers), 1, figsize=(8, 2.2 * len(towers) + 0.8), squeeze=False)
    for ax, tower in zip(axes[:, 0], towers):
        layers = 1 + max(int(b.split(".")[1]) for b in all_blocks if b.startswith(tower + "."))
        grid = sum(activation_grid(bs, tower, layers) for bs in adapters_blocks) / max(len(adapters_blocks), 1)
        im = ax.imshow(grid.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(KINDS)), KINDS)
        ax.set_xticks(range(layers))
        ax.set_xlabel("layer")
        runs = len(adapters_blocks)
        ax.set_title(f"{tower} tower: {int(grid.sum())} active blocks" if runs == 1 else f"{tower} tower: share of {runs} runs activating each block")
        fig.colorbar(im, ax=ax, fraction=0.03)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser) -> None:
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--heatmap", default=None, help="PNG path (default: <adapter>/active_blocks.png)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    try:
        adapter = load_adapter(args.adapter)
    except AdapterError as e:
        print(f"selora inspect: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    info = summary(adapter)
    all_blocks = list(adapter.gate.get("scores", {})) or list(adapter.blocks)
    png = Path(args.heatmap) if args.heatmap else Path(args.adapter) / "active_blocks.png"
    if adapter.blocks or all_blocks:
        plot_heatmap([list(adapter.blocks)], all_blocks, png, f"{adapter.variant} r={adapter.r}: {len(adapter.blocks)} active")
        info["heatmap"] = str(png)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    frac = f" of {info['num_scored']} ({100 * info['active_fraction']:.2f} %)" if info["num_scored"] else ""
    print(f"base model      {info['base_model']} (fingerprint {info['base_fingerprint']})")
    print(f"variant / rank  {info['variant']} r={info['r']} alpha={info['lora_alpha']}")
    print(f"active blocks   {info['num_active']}{frac}: {', '.join(info['active_blocks'])}")
    print(f"parameters      {info['parameters']:,}")
    print(f"bytes           {info['bytes']:,}")
    if info["head_classes"]:
        print(f"head            {len(info['head_classes'])} classes")
    if "heatmap" in info:
        print(f"heatmap         {info['heatmap']}")
    return 0
