"""Reproduce the shape of the paper's DINO experiment (Tables 1, 3, 4; Figures 3, 8, 11) on CPU.

In-distribution: Fashion-MNIST; retention: weighted k-NN (K=20, T=0.07) on MNIST, a set no run
ever trains on. Base: DINOv2-S (``dinov2-small``). Methods: linear probe, full fine-tuning, LoRA
r in {4, 16, 64}, selective LoRA at the same ranks with lambda in {0.1, 0.5, 1}, random blocks
with the block counts of two selective runs, DoRA with and without gates at r=16.

The schedule is reduced so the whole sweep fits a shared 2-core CPU (see SCHEDULE; every number
is written next to the results). Results are appended run by run to
``benchmarks/results/paper_repro.json``; ``--report`` (re)writes the Markdown table and the plots.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_repro.py            # sweep + report
    .venv/bin/python benchmarks/paper_repro.py --report                     # report only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from selora.training.evaluate import adapter_from_sparse, batched_embed, evaluate, knn_top1, set_resolution
from selora.adapters.format import load_adapter
from selora.training.data import load_split
from selora.training.train import Trainer
from selora.training.config import load_train_config
from selora.models import load_backbone

RESULTS = Path(__file__).parent / "results"
SCHEDULE = {  # the reduced schedule (paper: 5000 steps, 500 warm-up, lr 0.005, full sets, 224 px)
    "model": "dinov2-small", "dataset": "fashion-mnist", "image_size": 28, "steps": 100, "batch_size": 16,
    "train_subset": 4000, "val_subset": 300, "eval_every": 50, "lr": 0.01, "warmup_steps": 10,
    "penalty_warmup_steps": 20, "score_lr": 0.003, "seed": 0, "progress": False,
}
EVAL = {"test_subset": 1000, "knn_train": 2000, "knn_test": 1000, "retention": "mnist"}
RANKS = (4, 16, 64)
LAMBDAS = (0.1, 0.5, 1.0)


def runs() -> list[dict]:
    """Most informative first, so a cut-short sweep still answers the main questions."""
    out = [{"name": "linear", "method": "linear_probe"}]
    out += [{"name": f"lora_r{r}", "method": "lora", "r": r} for r in RANKS]
    out += [{"name": f"sel_r{r}_lam1.0", "method": "selective", "r": r, "lam": 1.0} for r in RANKS]
    out += [{"name": "random_like_sel_r16_lam1.0", "method": "random_blocks", "r": 16, "like": "sel_r16_lam1.0"},
            {"name": "full_ft", "method": "full_ft"}]
    out += [{"name": f"sel_r{r}_lam{lam}", "method": "selective", "r": r, "lam": lam} for lam in (0.5, 0.1) for r in RANKS]
    out += [{"name": "random_like_sel_r16_lam0.5", "method": "random_blocks", "r": 16, "like": "sel_r16_lam0.5"}]
    out += [{"name": "dora_r16", "method": "lora", "variant": "dora", "r": 16},
            {"name": "sel_dora_r16_lam1.0", "method": "selective", "variant": "dora", "r": 16, "lam": 1.0}]
    # sensitivity: penalty = lam * mean|s| (not sum over the 72 gates) and score_lr 0.05, so that the
    # penalty's pull on one score is of the order of the task gradient's (see the notes)
    sens = {"penalty_normalization": "mean", "score_lr": 0.05}
    out += [{"name": f"sel_r{r}_lam{lam}_mean", "method": "selective", "r": r, "lam": lam, **sens}
            for lam in LAMBDAS for r in (16,)]
    out += [{"name": "random_like_sel_r16_lam1.0_mean", "method": "random_blocks", "r": 16,
             "like": "sel_r16_lam1.0_mean"}]
    out += [{"name": f"sel_r{r}_lam0.5_mean", "method": "selective", "r": r, "lam": 0.5, **sens} for r in (4, 64)]
    out += [{"name": "full_ft_lr0.001", "method": "full_ft", "lr": 0.001}]  # lr 0.01 diverges for full FT
    out += [{"name": f"sel_r{r}_lam{lam}_mean", "method": "selective", "r": r, "lam": lam, **sens}
            for lam in (1.0, 0.1) for r in (4, 64)]
    out += [{"name": "sel_dora_r16_lam1.0_mean", "method": "selective", "variant": "dora", "r": 16, "lam": 1.0, **sens}]
    return out


def base_retention(cache: dict, schedule: dict = SCHEDULE) -> None:
    bb = load_backbone(schedule["model"])
    size = set_resolution(bb, schedule["image_size"])
    bank = load_split("mnist", "train").subset(EVAL["knn_train"], 0)
    query = load_split("mnist", "test").subset(EVAL["knn_test"], 0)
    cache["retention_before"] = knn_top1(batched_embed(bb, bank, size), bank.labels, batched_embed(bb, query, size),
                                         query.labels, 10)


def run_one(spec: dict, done: dict, work: Path, cache: dict, schedule: dict = SCHEDULE) -> dict:
    overrides = {**schedule, **{k: v for k, v in spec.items() if k not in ("name", "like")}}
    overrides["lora_alpha"] = float(overrides.get("r", 16))  # scale alpha/r = 1 at every rank (see notes)
    if spec.get("like"):
        overrides["random_blocks"] = max(1, done[spec["like"]]["active_blocks"])
    overrides["out"] = str(work / spec["name"])
    config = load_train_config(overrides=overrides)
    t0 = time.perf_counter()
    trainer = Trainer(config)
    trained = trainer.run()
    trainer.close()
    t_train = time.perf_counter() - t0
    sparse = load_adapter(config.out, trainer.backbone.blocks)  # the saved adapter, as a user loads it
    adapter = adapter_from_sparse(sparse, trainer.backbone)  # full_ft: the backbone is already fine-tuned
    result = evaluate(trainer.backbone, adapter, schedule["dataset"], EVAL["retention"], trainer.size,
                      EVAL["test_subset"], EVAL["knn_train"], EVAL["knn_test"], base_cache=cache)
    result.update(name=spec["name"], spec=spec, blocks=list(sparse.blocks), best_val_top1=trained["best_val_top1"],
                  train_seconds=round(t_train, 1), eval_seconds=round(time.perf_counter() - t0 - t_train, 1))
    if spec["method"] in ("linear_probe", "full_ft"):
        result["active_blocks"] = 0 if spec["method"] == "linear_probe" else None
    return result


def sweep(only: list[str] | None) -> None:
    path = RESULTS / "paper_repro.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["schedule"], data["eval"] = SCHEDULE, EVAL
    data["machine"] = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    data["command"] = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_repro.py"
    done = data.setdefault("runs", {})
    cache: dict = {}
    base_retention(cache)
    data["retention_before"] = cache["retention_before"]
    work = Path(os.environ.get("SELORA_REPRO_DIR", "/tmp/selora_repro"))
    for spec in runs():
        if only and spec["name"] not in only or spec["name"] in done:
            continue
        print(f"== {spec['name']}", flush=True)
        done[spec["name"]] = run_one(spec, done, work, cache)
        r = done[spec["name"]]
        print(f"   id {r.get('id_top1', float('nan')):.4f} retention {r['retention_after']:.4f} "
              f"blocks {r['active_blocks']} train {r['train_seconds']} s eval {r['eval_seconds']} s", flush=True)
        path.write_text(json.dumps(data, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only (re)write the table and plots")
    parser.add_argument("--only", nargs="*", default=None, help="run only these names")
    args = parser.parse_args(argv)
    if not args.report:
        sweep(args.only)
    from paper_repro_report import write_report  # noqa: E402  (sibling script)

    write_report(RESULTS / "paper_repro.json", RESULTS)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
