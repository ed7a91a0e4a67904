"""The three measurement grids: FLOPs per item, unmerged latency, multi-tenant throughput.

Each returns a list of flat records (dicts) that ``report`` turns into tables and plots.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from selora.adapters.merge import merge_into
from selora.adapters.synthetic import random_adapter
from selora.bench import peers
from selora.bench.flops import closed_form_flops, counted_flops, peft_added_flops
from selora.bench.synthetic import PAPER_FRACTIONS, active_count, paper_block_order
from selora.bench.timing import summarize, time_interleaved
from selora.models.factory import Backbone
from selora.runtime.batch import forward_mixed
from selora.runtime.slots import DeviceSlots

VARIANTS = ("lora", "dora")
BenchError = peers.BenchError
Step = Callable[[], None]


@dataclass
class GridSpec:
    ranks: Sequence[int]
    fractions: Sequence[float] = PAPER_FRACTIONS
    chosen_blocks: Sequence[str] | None = None  # None: the last vision layer's six blocks
    count_batch: int = 2  # items per FLOP count (per-item figures are totals / count_batch)
    peft_batch: int = 4  # batch at which PEFT DoRA's per-forward weight norm is amortized


def _inputs(backbone: Backbone, batch: int, device) -> dict[str, torch.Tensor]:
    size = backbone.model.patch_embed.img_size if backbone.library == "timm" else backbone.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    dtype = torch.float32 if device == "meta" else backbone.dtype
    out = {"image": torch.zeros(batch, 3, *size, device=device, dtype=dtype)}
    if "text" in backbone.modalities:
        out["text"] = backbone.tokenize(["a photo of a dog"] * batch).to(device)
    return out


def _count_selora(meta_bb: Backbone, dev, inputs, batch: int) -> dict[str, int]:
    """FlopCounterMode per item and per tower for the selora path (``dev=None``: base model)."""
    adapters, rows = ([dev] if dev is not None else [None]), [0] * batch
    return {
        tower: counted_flops(lambda: forward_mixed(meta_bb, inputs[mod], adapters, rows, modality=mod)) // batch
        for tower, mod in (("vision", "image"), ("text", "text")) if mod in inputs
    }


def default_chosen_blocks(backbone: Backbone) -> list[str]:
    last = backbone.blocks.num_layers("vision") - 1
    return [b for b, s in backbone.blocks.items() if s.tower == "vision" and s.layer == last]


def flop_grid(pristine: Backbone, spec: GridSpec, step: Step = lambda: None) -> list[dict]:
    """Per rank and variant: base, merged, every block unmerged, gated at each fraction and at
    the chosen blocks (selora path), PEFT (timm only). Counted on meta tensors, checked against
    the closed form; ``adapter_bytes`` is ``DeviceAdapter.nbytes`` (slot pages held) in the model's dtype."""
    meta_bb = peers.pristine_copy(pristine)
    meta_bb.model.to("meta")
    inputs = _inputs(meta_bb, spec.count_batch, "meta")
    order = paper_block_order(pristine.blocks)
    n = len(order)
    unknown = [b for b in spec.chosen_blocks or () if b not in pristine.blocks]
    if unknown:
        raise BenchError(f"{pristine.model_id} has no block {unknown[0]!r} (ids look like vision.11.fc1)")
    configs = [("lora_all", order, None)] + [
        (f"gated_{active_count(f, n)}", order[: active_count(f, n)], f) for f in spec.fractions
    ] + [("chosen", list(spec.chosen_blocks or default_chosen_blocks(pristine)), None)]
    base = _count_selora(meta_bb, None, inputs, spec.count_batch)
    rows = [_flop_row(pristine, "base", None, 0, [], base, None)]
    small = random_adapter(pristine.blocks, order, min(spec.ranks), "lora")
    merged = peers.pristine_copy(pristine)
    merge_into(merged, small)
    inputs1 = _inputs(pristine, 1, pristine.device)
    counted = {
        tower: counted_flops(lambda: (merged.encode_image if mod == "image" else merged.encode_text)(inputs1[mod]))
        for tower, mod in (("vision", "image"), ("text", "text")) if mod in inputs1
    }
    rows.append(_flop_row(pristine, "merged", "lora", min(spec.ranks), [], counted, None))
    merged = None  # free the merged copy before the rank loop (the lambdas above are done with it)
    step()
    for r in spec.ranks:
        for variant in VARIANTS:
            for method, blocks, fraction in configs:
                sparse = random_adapter(pristine.blocks, blocks, r, variant)
                dev = DeviceSlots.holding(meta_bb, [sparse], pristine.dtype).load(sparse)  # meta tensors: no compute
                counted = _count_selora(meta_bb, dev, inputs, spec.count_batch)
                row = _flop_row(pristine, method, variant, r, blocks, counted, fraction)
                row["adapter_bytes"] = dev.nbytes
                rows.append(row)
                step()
            if pristine.library == "timm":
                rows.append(_peft_flop_row(pristine, r, variant, spec.peft_batch))
                step()
    return rows


def _flop_row(bb: Backbone, method, variant, r, blocks, counted: dict[str, int], fraction) -> dict:
    closed = closed_form_flops(bb, {b: r for b in blocks})
    closed = {t: closed[t] for t in counted}
    return {
        "model": bb.model_id, "method": method, "variant": variant, "rank": r,
        "active_blocks": len(blocks), "num_blocks": len(bb.blocks), "fraction": len(blocks) / len(bb.blocks),
        "paper_fraction": fraction, "counted": counted, "closed_form": closed,
        "flops": sum(counted.values()), "match": counted == closed,
    }


def _peft_flop_row(pristine: Backbone, r: int, variant: str, batch: int) -> dict:
    model = peers.peft_model(pristine, r, variant == "dora")
    model.to("meta")
    x = _inputs(pristine, batch, "meta")["image"]
    counted = counted_flops(lambda: model(x))
    closed = batch * closed_form_flops(pristine)["vision"] + peft_added_flops(pristine, r, batch, variant == "dora")
    return {  # per image: the batch total / batch (PEFT DoRA's weight norm is per forward)
        "model": pristine.model_id, "method": "peft", "variant": variant, "rank": r, "active_blocks": len(pristine.blocks),
        "num_blocks": len(pristine.blocks), "fraction": 1.0, "paper_fraction": None, "batch": batch,
        "counted": {"vision": counted / batch}, "closed_form": {"vision": closed / batch}, "flops": counted / batch,
        "match": counted == closed,
    }


def latency_grid(pristine: Backbone, served: Backbone, ranks, batches, gated_fraction: float,
                 warmup: int, reps: int, step: Step = lambda: None) -> list[dict]:
    """Unmerged single-adapter latency, every variant timed interleaved with the base model."""
    order = paper_block_order(pristine.blocks)
    gated = order[: active_count(gated_fraction, len(order))]
    rows = []
    for batch in batches:
        x = _inputs(pristine, batch, pristine.device)["image"].normal_()
        for r in ranks:
            fwd = {("base", None): peers.base_forward(pristine)}
            for variant in VARIANTS:
                dense = random_adapter(pristine.blocks, order, r, variant)
                fwd[("merged", variant)] = peers.merged_forward(pristine, dense)
                fwd[("lora_all", variant)] = peers.selora_forward(served, [dense], batch)
                sparse = random_adapter(pristine.blocks, gated, r, variant)
                fwd[("selora_gated", variant)] = peers.selora_forward(served, [sparse], batch)
                if pristine.library == "timm":
                    fwd[("peft", variant)] = peers.peft_forward(peers.peft_model(pristine, r, variant == "dora"))
            samples = time_interleaved(fwd, x, warmup, reps, step)
            base_med = summarize(samples[("base", None)], batch)["median_s"]
            for (method, variant), secs in samples.items():
                s = summarize(secs, batch)
                rows.append({"model": pristine.model_id, "batch": batch, "rank": r, "method": method, "variant": variant,
                             "active_blocks": len(gated) if method == "selora_gated" else (0 if method in ("base", "merged") else len(order)),
                             "num_blocks": len(order), **s, "rel_base": s["median_s"] / base_med})
            del fwd
    return rows


def tenant_blocks(order: list[str], count: int, tenant: int) -> list[str]:
    """Tenant ``tenant``'s active blocks: ``count`` drawn (seeded) from the ``4·count`` blocks
    most often active in the paper, so tenants overlap as real adapters do."""
    pool = order[: min(len(order), 4 * count)]
    return sorted(random.Random(tenant).sample(pool, count), key=order.index)


def multitenant_grid(pristine: Backbone, served: Backbone, ranks, tenants, batch: int, fraction: float,
                     warmup: int, reps: int, step: Step = lambda: None) -> list[dict]:
    """One batch of ``batch`` rows spread over K distinct gated LoRA adapters."""
    order = paper_block_order(pristine.blocks)
    count = active_count(fraction, len(order))
    x = _inputs(pristine, batch, pristine.device)["image"].normal_()
    rows = []
    for r in ranks:
        for k in tenants:
            blocks = [tenant_blocks(order, count, i) for i in range(k)]
            sparse = [random_adapter(pristine.blocks, b, r, "lora", seed=i) for i, b in enumerate(blocks)]
            fwd = {
                "base": peers.base_forward(pristine),
                "selora": peers.selora_forward(served, sparse, batch),
                "merge_swap": peers.merge_swap_forward(pristine, sparse, batch),
            }
            if pristine.library == "timm":
                fwd["peft_mixed_dense"] = peers.peft_forward(peers.peft_model(pristine, r, False, [None] * k), k, batch)
                fwd["peft_mixed_sparse"] = peers.peft_forward(peers.peft_model(pristine, r, False, blocks), k, batch)
            samples = time_interleaved(fwd, x, warmup, reps, step)
            base_med = summarize(samples["base"], batch)["median_s"]
            for method, secs in samples.items():
                s = summarize(secs, batch)
                rows.append({"model": pristine.model_id, "batch": batch, "rank": r, "num_adapters": k, "method": method,
                             "active_blocks": count, "num_blocks": len(order), **s, "rel_base": s["median_s"] / base_med})
            del fwd
    return rows


def memory_rows(flop_rows: list[dict], budget_bytes: int) -> list[dict]:
    """Bytes per resident adapter, sparse (each gated fraction) against dense at the same rank."""
    out = []
    dense = {(r["model"], r["rank"], r["variant"]): r["adapter_bytes"] for r in flop_rows if r["method"] == "lora_all"}
    for row in flop_rows:
        if row["method"].startswith("gated_"):
            d = dense[(row["model"], row["rank"], row["variant"])]
            s = row["adapter_bytes"]
            out.append({"model": row["model"], "rank": row["rank"], "variant": row["variant"], "active_blocks": row["active_blocks"],
                        "num_blocks": row["num_blocks"], "sparse_bytes": s, "dense_bytes": d, "budget_bytes": budget_bytes,
                        "fit_sparse": budget_bytes // s, "fit_dense": budget_bytes // d})
    return out
