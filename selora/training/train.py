"""``selora train``: make a sparse adapter (or a baseline) on a frozen base model.

Recipes: ``classify`` (backbone + adapter + linear head, cross-entropy) and ``clip`` (FLYP: each
image against a prompt of its class name, symmetric CLIP loss). Methods: ``selective`` (gated
LoRA/DoRA), ``lora`` (every block on), ``random_blocks`` (exactly k seeded random blocks, no
gate), ``fixed_blocks`` (exactly the given ``blocks``, no gate), ``linear_probe`` (head only),
``full_ft`` (every backbone weight).

Gate training (DESIGN.md): B starts at zero, so at first only the penalty moves a score. As in
TAPS the scores have their own plain-SGD learning rate (``score_lr``) and the penalty is off
until ``penalty_warmup_steps``, so the task gradient has shaped the scores before any gate closes.
The block budget (``max_active_blocks``) waits for the same warm-up: a closed block's B stays
zero, so its score gets no task gradient; with the budget on from step 0 the top-k of the equal
initial scores would be ``torch.topk``'s tie order, never learned. Validation and export always
apply the budget.

Output directory ``out``: the final adapter (format v1, head and class names included), ``best/``
(the adapter with the best validation top-1), ``checkpoint/`` (resume state: safetensors + JSON,
no pickle), ``train_config.toml`` and ``history.jsonl``. ``full_ft`` cannot be a sparse adapter:
its backbone goes to ``backbone.safetensors`` (usable as ``selora serve --weights``), its head to
the (zero-block) adapter beside it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from selora.training.checkpoint import load_state, save_state
from selora.adapters.config import ConfigError
from selora.training.data import DataError, ImageSet, load_split, to_pixels
from selora.training.evaluate import batched_embed, classify_top1, set_resolution, zero_shot_top1
from selora.adapters.format import save_adapter
from selora.adapters.inject import attach, detach
from selora.adapters.lora import GatedAdapter, export_adapter
from selora.training.config import TrainConfig, dump_toml, load_train_config, parse_override
from selora.models import ModelError, load_backbone
from selora.models.prompts import TEMPLATES, zero_shot_weights

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of batch ``step``: consecutive slices of per-epoch seeded permutations (resumable)."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset : offset + batch_size - len(out)].tolist()
    return torch.tensor(out)


def pick_random_blocks(config: TrainConfig, block_ids: list[str]) -> tuple[str, ...]:
    if config.random_blocks > len(block_ids):
        raise ConfigError(f"random_blocks={config.random_blocks} but the base has {len(block_ids)} blocks")
    return tuple(sorted(random.Random(config.seed).sample(block_ids, config.random_blocks)))


def set_zero_shot_head(adapter: GatedAdapter, backbone, classes: list[str]) -> None:
    """Give a CLIP adapter the zero-shot head of its text tower (attached: the adapted one):
    unit class embeddings times the logit scale, applied to unit image features, so the served
    head scores exactly as ``/v1/classify`` with these labels does."""
    weights = zero_shot_weights(backbone, list(classes))
    adapter.head_classes = list(classes)
    adapter.head = torch.nn.Linear(weights.shape[1], len(weights))
    with torch.no_grad():
        adapter.head.weight.copy_(weights * backbone.model.logit_scale.exp())
        adapter.head.bias.zero_()
    adapter.head_input = "normalized"


class Trainer:
    """Holds the base, the adapter (or head) and the optimisers; ``run`` trains from ``self.step``."""

    def __init__(self, config: TrainConfig):
        self.config = c = config
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        self.train_set = load_split(c.dataset, "train", c.seed).subset(c.train_subset, c.seed)
        self.val_set = load_split(c.dataset, "val", c.seed).subset(c.val_subset, c.seed)
        self.backbone = bb = load_backbone(c.model, c.weights)
        if c.recipe == "clip" and bb.tokenizer is None:
            raise ConfigError(f"recipe 'clip' needs a CLIP model; {c.model} has no text tower")
        self.size = set_resolution(bb, c.image_size)
        self.transform = bb.sizes.transform((self.size, self.size))  # the server's eval transform at this size
        blocks = None
        if c.method == "random_blocks":
            base_cfg = c.adapter_config()
            blocks = pick_random_blocks(c, base_cfg.select_blocks(bb.blocks))
        if c.method == "fixed_blocks":
            blocks = tuple(c.blocks)
        if c.method == "full_ft":
            blocks = ()
        classes = self.train_set.classes if c.recipe == "classify" else None
        self.adapter = GatedAdapter(c.adapter_config(blocks), bb.blocks, bb.model, classes)
        if c.method == "full_ft":
            bb.model.requires_grad_(True)
        attach(bb, self.adapter)
        main = [p for n, p in self.adapter.named_parameters() if not n.startswith(("scores", "head"))]
        main += [p for p in bb.model.parameters() if p.requires_grad]
        groups = [{"params": main, "lr": c.resolved_lr}]
        if self.adapter.head is not None:
            groups.append({"params": list(self.adapter.head.parameters()), "lr": c.head_lr or c.resolved_lr})
        groups = [g for g in groups if g["params"]]
        wd = c.resolved_weight_decay
        if c.resolved_optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, momentum=c.momentum, weight_decay=wd)
        else:
            self.optimizer = torch.optim.AdamW(groups, weight_decay=wd)
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        scores = [self.adapter.scores] if self.adapter.scores is not None else []
        self.score_optimizer = torch.optim.SGD(scores, lr=c.score_lr) if scores else None
        self.step, self.best_val, self.best_step, self.history = 0, -1.0, -1, []
        self.out = Path(c.out)

    # -- one step --------------------------------------------------------------------------
    def pixels(self, data: ImageSet, idx: torch.Tensor) -> torch.Tensor:
        return to_pixels(data.uint8_batch(idx, self.size), self.transform).to(self.backbone.dtype)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        x, y = self.pixels(self.train_set, idx), self.train_set.labels[idx]
        if self.config.recipe == "classify":
            return F.cross_entropy(self.adapter.head(self.backbone.encode_image(x)), y)
        rng = random.Random(self.config.seed * 7919 + self.step)  # FLYP: one prompt per image
        texts = [rng.choice(TEMPLATES).format(self.train_set.classes[int(t)]) for t in y]
        img = F.normalize(self.backbone.encode_image(x), dim=-1)
        txt = F.normalize(self.backbone.encode_text(self.backbone.tokenize(texts)), dim=-1)
        logits = self.backbone.model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(y))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def train_step(self) -> dict:
        c = self.config
        factor = lr_factor(self.step, c.resolved_warmup, c.steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        idx = batch_indices(len(self.train_set), c.batch_size, self.step, c.seed)
        penalty_on = self.adapter.scores is not None and self.step >= c.resolved_penalty_warmup
        self.adapter.config.max_active_blocks = c.max_active_blocks if penalty_on else None
        try:
            task = self.loss(idx)
        finally:
            self.adapter.config.max_active_blocks = c.max_active_blocks
        penalty = self.adapter.penalty() if penalty_on else torch.zeros(())
        if penalty_on and c.penalty_normalization == "mean":
            penalty = penalty / len(self.adapter.block_ids)
        self.optimizer.zero_grad(set_to_none=True)
        if self.score_optimizer is not None:
            self.score_optimizer.zero_grad(set_to_none=True)
        (task + penalty).backward()
        self.optimizer.step()
        if self.score_optimizer is not None:
            self.score_optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": float(task.detach()), "penalty": float(penalty.detach()),
                "active": len(self.adapter.active_blocks()), "lr": self.optimizer.param_groups[0]["lr"]}

    # -- evaluation and outputs ---------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        self.adapter.eval()  # closed gates are skipped, not multiplied by zero
        try:
            if self.config.recipe == "classify":
                feats = batched_embed(self.backbone, self.val_set, self.size)
                return classify_top1(self.adapter, feats, self.val_set.labels)
            return zero_shot_top1(self.backbone, self.val_set, self.size, self.val_set.classes)
        finally:
            self.adapter.train()

    def export(self, directory: Path) -> Path:
        bb, c = self.backbone, self.config
        if c.recipe == "clip":  # so that serve can classify without labels
            set_zero_shot_head(self.adapter, bb, self.train_set.classes)
        sparse = export_adapter(self.adapter, c.model, bb.fingerprint)
        sparse.input_size = (self.size, self.size)  # served at the size it was trained at
        sparse.preprocessing = bb.preprocessing(sparse.input_size)
        save_adapter(sparse, directory)
        if c.recipe == "clip":
            self.adapter.head = self.adapter.head_classes = None
            self.adapter.head_input = "raw"
        if c.method == "full_ft":
            save_file(backbone_state(bb), str(directory / "backbone.safetensors"), metadata={"model": c.model})
        return directory

    def trainable(self) -> dict[str, torch.Tensor]:
        out = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        if self.config.method == "full_ft":
            out.update({f"backbone.{k}": v for k, v in backbone_state(self.backbone).items()})
        return out

    def save_checkpoint(self) -> None:
        meta = {"step": self.step, "best_val": self.best_val, "best_step": self.best_step,
                "config": self.config.to_dict()}
        save_state(self.out / "checkpoint", self.trainable(), self.optimizer, self.score_optimizer, meta)

    def resume(self) -> bool:
        """Load ``out/checkpoint`` if present (same config required); returns whether it did."""
        state = load_state(self.out / "checkpoint", self.optimizer, self.score_optimizer)
        if state is None:
            return False
        tensors, meta = state
        saved = {k: v for k, v in meta["config"].items() if k not in ("steps", "progress", "eval_every")}
        now = {k: v for k, v in self.config.to_dict().items() if k in saved}
        if saved != now:
            diff = sorted(k for k in saved if saved[k] != now[k])
            raise ConfigError(f"cannot resume {self.out}: settings differ from the checkpoint: {diff}")
        self.adapter.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        if self.config.method == "full_ft":
            load_backbone_state(self.backbone, {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
        self.step, self.best_val, self.best_step = meta["step"], meta["best_val"], meta["best_step"]
        return True

    def run(self) -> dict:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.toml").write_text(dump_toml(c))
        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress, desc=f"train {c.method}", file=sys.stderr)
        with open(self.out / "history.jsonl", "a") as hist:
            while self.step < c.steps:
                row = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", active=row["active"])
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    row["val_top1"] = self.validate()
                    if row["val_top1"] > self.best_val:
                        self.best_val, self.best_step = row["val_top1"], self.step
                        self.export(self.out / "best")
                    self.save_checkpoint()
                    hist.write(json.dumps(row) + "\n")
                    hist.flush()
                    log.info("step %d: loss %.4f val top-1 %.4f active %d", self.step, row["loss"], row["val_top1"], row["active"])
        bar.close()
        self.export(self.out)
        return {"out": str(self.out), "steps": self.step, "best_val_top1": self.best_val, "best_step": self.best_step,
                "active_blocks": self.adapter.active_blocks(), "num_blocks": len(self.adapter.block_ids)}

    def close(self) -> None:
        detach(self.backbone)


def backbone_state(backbone) -> dict[str, torch.Tensor]:
    """The backbone's weights under the model library's own key names (loadable as ``--weights``)."""
    out = {}
    for k, v in backbone.model.state_dict().items():
        k = k.replace(".base.", ".")
        k = k.replace(".attn.in_proj.weight", ".attn.in_proj_weight").replace(".attn.in_proj.bias", ".attn.in_proj_bias")
        out[k] = v.detach().contiguous().clone()
    return out


def load_backbone_state(backbone, state: dict[str, torch.Tensor]) -> None:
    params = dict(backbone.model.named_parameters())
    mapped = {k.replace(".base.", "."): k for k in params}
    with torch.no_grad():
        for k, v in state.items():
            for name in (k, k.replace("_weight", ".weight").replace("_bias", ".bias")):
                if name in mapped:
                    params[mapped[name]].copy_(v)
                    break


def train(config: TrainConfig, resume: bool = False) -> dict:
    trainer = Trainer(config)
    try:
        if resume and trainer.resume():
            log.info("resumed %s at step %d", config.out, trainer.step)
        return trainer.run()
    finally:
        trainer.close()


# -- CLI -------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="TOML file of settings (see selora.training.config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, TOML value syntax (repeatable): --set r=4 --set lam=0.5")
    for name in ("model", "dataset", "method", "recipe", "variant", "out"):
        parser.add_argument(f"--{name}", default=None, help=f"shortcut for --set {name}=...")
    for name in ("r", "steps", "batch-size", "max-active-blocks", "image-size", "train-subset"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"shortcut for --set {name.replace('-', '_')}=...")
    parser.add_argument("--lam", type=float, default=None, help="gate penalty weight lambda")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    overrides = dict(map(parse_override, args.overrides))
    for name in ("model", "dataset", "method", "recipe", "variant", "out", "r", "steps", "batch_size",
                 "max_active_blocks", "image_size", "train_subset", "lam"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_progress:
        overrides["progress"] = False
    try:
        config = load_train_config(args.config, overrides)
        result = train(config, resume=args.resume)
    except (ConfigError, DataError, ModelError) as e:
        print(f"selora train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "active_blocks"} | {"num_active": len(result["active_blocks"])}))
    return 0
