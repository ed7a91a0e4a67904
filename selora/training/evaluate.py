"""``selora eval``: in-distribution top-1, retention k-NN before/after, CLIP zero-shot and retrieval.

- top-1: the adapter's linear head on the adapted backbone's embeddings.
- retention (paper §3.1, DINO protocol): weighted k-NN, K = 20, T = 0.07, on L2-normalised
  embeddings of a set the adapter never saw; a query's vote for class c is
  ``sum over its K nearest train items of class c of exp(cos / T)``. Reported for the base model
  ("before") and with the adapter ("after").
- CLIP: zero-shot top-1 (prompt-ensemble classifier of ``selora.models.prompts``) before/after,
  and image<->text retrieval R@1/R@5: for paired items, the share of queries whose own partner is
  among the K most similar of the other modality. With a labelled set (no captions offline) the
  partner of image i is the caption ``"a photo of a {class}."``, and any item of the same class
  counts as a hit (class-level retrieval; said so in the output).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from selora.adapters.config import AdapterConfig, ConfigError
from selora.training.data import DataError, ImageSet, load_split, to_pixels
from selora.adapters.format import AdapterError, SparseAdapter, head_logits, load_adapter
from selora.adapters.inject import attached
from selora.adapters.lora import GatedAdapter, _key
from selora.models import ModelError, load_backbone
from selora.models.prompts import zero_shot_weights

KNN_K, KNN_T = 20, 0.07


# -- model input -----------------------------------------------------------------------------
def set_resolution(backbone, size: int | None) -> int:
    """Input side length; a timm ViT is rebuilt for ``size`` (position grid resampled, timm API)."""
    if backbone.library == "open_clip":
        native = backbone.model.visual.image_size
        native = native[0] if isinstance(native, (tuple, list)) else native
        if size not in (None, native):
            raise ConfigError(f"image_size {size}: open_clip models run at their own size ({native})")
        return native
    native = backbone.model.patch_embed.img_size[0]
    if size is None or size == native:
        return native
    patch = backbone.model.patch_embed.patch_size[0]
    if size % patch:
        raise ConfigError(f"image_size {size} must be a multiple of the patch size {patch}")
    backbone.model.set_input_size(img_size=size)
    return size


@torch.no_grad()
def batched_embed(backbone, data: ImageSet, size: int, batch_size: int = 128) -> torch.Tensor:
    """Image embeddings ``[N, D]`` of a set (with whatever adapter is attached), float32."""
    transform = backbone.sizes.transform((size, size))  # the server's eval transform at this size
    out = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x = to_pixels(data.uint8_batch(idx, size), transform).to(backbone.dtype)
        out.append(backbone.encode_image(x).float())
    return torch.cat(out)


# -- metrics ---------------------------------------------------------------------------------
def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


@torch.no_grad()
def classify_top1(adapter: GatedAdapter, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of the adapter's head, applied as the server applies it."""
    return top1(head_logits(adapter.head.weight, adapter.head.bias, feats, adapter.head_input), labels)


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes: int, k: int = KNN_K, t: float = KNN_T,
                chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN of the DINO protocol: top-k cosine neighbours, votes ``exp(cos / T)`` per class."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sim, nn_idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_labels[nn_idx], (sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes: int) -> float:
    return float((knn_predict(train_feats, train_labels, test_feats, num_classes) == test_labels).float().mean())


def retrieval_recall(img: torch.Tensor, txt: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                     ks=(1, 5)) -> dict[str, float]:
    """Image->text and text->image R@K: a query hits when an item with its id is among the top K."""
    img, txt = F.normalize(img.float(), dim=1), F.normalize(txt.float(), dim=1)
    sim, out = img @ txt.T, {}
    for k in ks:
        i2t = txt_ids[sim.topk(min(k, sim.shape[1]), dim=1).indices] == img_ids[:, None]
        t2i = img_ids[sim.T.topk(min(k, sim.shape[0]), dim=1).indices] == txt_ids[:, None]
        out[f"image_to_text_R@{k}"] = float(i2t.any(dim=1).float().mean())
        out[f"text_to_image_R@{k}"] = float(t2i.any(dim=1).float().mean())
    return out


@torch.no_grad()
def zero_shot_top1(backbone, data: ImageSet, size: int, classes: list[str]) -> float:
    weights = zero_shot_weights(backbone, classes)
    feats = F.normalize(batched_embed(backbone, data, size), dim=1)
    return top1(feats @ weights.T.float(), data.labels)


@torch.no_grad()
def class_retrieval(backbone, data: ImageSet, size: int) -> dict[str, float]:
    captions = [f"a photo of a {c}." for c in data.classes]
    txt = backbone.encode_text(backbone.tokenize(captions).to(backbone.device))
    return retrieval_recall(batched_embed(backbone, data, size), txt, data.labels, torch.arange(len(captions)))


# -- adapters --------------------------------------------------------------------------------
def adapter_from_sparse(sparse: SparseAdapter, backbone) -> GatedAdapter:
    """A (non-trainable) ``GatedAdapter`` holding exactly the saved active blocks and head."""
    cfg = AdapterConfig(variant=sparse.variant, r=sparse.r, lora_alpha=sparse.lora_alpha, gated=False,
                        blocks=tuple(sparse.blocks))
    adapter = GatedAdapter(cfg, backbone.blocks, backbone.model, sparse.head_classes)
    with torch.no_grad():
        for b, w in sparse.blocks.items():
            adapter.lora_A[_key(b)].copy_(w.lora_A)
            adapter.lora_B[_key(b)].copy_(w.lora_B)
            if w.magnitude is not None:
                adapter.magnitude[_key(b)].copy_(w.magnitude)
        if adapter.head is not None:
            adapter.head.weight.copy_(sparse.head_weight)
            adapter.head.bias.copy_(sparse.head_bias)
    adapter.head_input = sparse.head_input
    return adapter.eval().requires_grad_(False)


def evaluate(backbone, adapter: GatedAdapter, dataset: str, retention: str | None, size: int,
             test_subset: int | None = 1000, knn_train: int | None = 5000, knn_test: int | None = 1000,
             seed: int = 0, base_cache: dict | None = None) -> dict:
    """All metrics of one adapter; ``base_cache`` (a dict) keeps the base model's results across calls."""
    result: dict = {"dataset": dataset, "retention_dataset": retention, "image_size": size,
                    "active_blocks": len(adapter.block_ids), "num_blocks": len(backbone.blocks)}
    test = load_split(dataset, "test", seed).subset(test_subset, seed)
    result["test_images"] = len(test)
    cache = base_cache if base_cache is not None else {}
    if retention is not None:
        bank = load_split(retention, "train", seed).subset(knn_train, seed)
        query = load_split(retention, "test", seed).subset(knn_test, seed)
        result["knn"] = {"k": KNN_K, "temperature": KNN_T, "train_images": len(bank), "test_images": len(query)}
        n = len(bank.classes)
        if "retention_before" not in cache:
            cache["retention_before"] = knn_top1(batched_embed(backbone, bank, size), bank.labels,
                                                 batched_embed(backbone, query, size), query.labels, n)
        result["retention_before"] = cache["retention_before"]
    clip = backbone.tokenizer is not None
    if clip and "zero_shot_before" not in cache:
        cache["zero_shot_before"] = zero_shot_top1(backbone, test, size, test.classes)
        cache["retrieval_before"] = class_retrieval(backbone, test, size)
    with attached(backbone, adapter):
        if adapter.head is not None:
            result["id_top1"] = classify_top1(adapter, batched_embed(backbone, test, size), test.labels)
        if retention is not None:
            result["retention_after"] = knn_top1(batched_embed(backbone, bank, size), bank.labels,
                                                 batched_embed(backbone, query, size), query.labels, n)
        if clip:
            result["zero_shot_after"] = zero_shot_top1(backbone, test, size, test.classes)
            result["retrieval_after"] = class_retrieval(backbone, test, size)
            result["retrieval_note"] = "class-level: captions 'a photo of a {class}.', same class = hit"
    if clip:
        result.update(zero_shot_before=cache["zero_shot_before"], retrieval_before=cache["retrieval_before"])
    return result


def format_table(result: dict) -> str:
    """The scalar metrics as a two-column text table."""
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            rows.append((key, value))
    width = max(len(k) for k, _ in rows)
    def fmt(key, v):
        metric = any(m in key for m in ("top1", "retention_before", "retention_after", "zero_shot", "R@"))
        return f"{100 * v:.2f} %" if metric and isinstance(v, float) else str(v)

    return "\n".join(f"{k.ljust(width)}  {fmt(k, v)}" for k, v in rows)


# -- CLI -------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("adapter", help="adapter directory (format v1)")
    parser.add_argument("--model", default=None, help="base model id (default: the adapter's base_model)")
    parser.add_argument("--weights", default=None, help="base weights (e.g. a full fine-tune's backbone.safetensors)")
    parser.add_argument("--dataset", default="fashion-mnist", help="in-distribution set (test split)")
    parser.add_argument("--retention", default="mnist", help="set for retention k-NN ('none' to skip)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input resolution (default: the adapter's recorded input_size, else the model's)")
    parser.add_argument("--test-subset", type=int, default=1000)
    parser.add_argument("--knn-train", type=int, default=5000)
    parser.add_argument("--knn-test", type=int, default=1000)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result to this JSON file")


def run(args) -> int:
    try:
        sparse = load_adapter(args.adapter)
        backbone = load_backbone(args.model or sparse.base_model, args.weights)
        sparse = load_adapter(args.adapter, backbone.blocks)  # validated against this base
        trained_at = sparse.input_size[0] if sparse.input_size else None
        size = set_resolution(backbone, args.image_size or trained_at)
        retention = None if args.retention in (None, "none") else args.retention
        result = evaluate(backbone, adapter_from_sparse(sparse, backbone), args.dataset, retention, size,
                          args.test_subset, args.knn_train, args.knn_test)
    except (AdapterError, ConfigError, DataError, ModelError) as e:
        print(f"selora eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    result["adapter"] = str(args.adapter)
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0
