"""``selora train`` settings: a flat TOML file plus ``--set key=value`` overrides, validated up front.

Every field below is a TOML key. Values are checked (type, range, choice) and the adapter config
is built before any model or data is loaded, so a bad value fails in a second with a message that
names the key, never after minutes of training.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from selora.adapters.config import AdapterConfig, ConfigError

METHODS = ("selective", "lora", "random_blocks", "fixed_blocks", "linear_probe", "full_ft")
RECIPES = ("classify", "clip")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    # what is trained
    model: str = "dinov2-small"  # base model id (see selora.models.list_models)
    weights: str | None = None  # open_clip tag or local safetensors (default: the model's own)
    recipe: str = "classify"  # classify: frozen backbone + adapter + linear head, CE; clip: FLYP contrastive
    method: str = "selective"  # selective (gated) | lora (all blocks) | random_blocks | fixed_blocks | linear_probe | full_ft
    variant: str = "lora"  # lora | dora
    r: int = 16
    lora_alpha: float = 16.0
    lam: float = 1.0  # gate penalty weight lambda
    regularizer: str = "l1"
    tau: float = 0.1
    init_score: float = 0.15
    max_active_blocks: int | None = None  # block budget of the gated adapter
    random_blocks: int = 5  # random_blocks: how many blocks to train (chosen with `seed`)
    blocks: list[str] | None = None  # fixed_blocks: exactly these block ids, ungated
    kinds: list[str] | None = None  # block kinds to adapt (default: all six)
    # data
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | synthetic | folder:<dir>
    image_size: int | None = None  # input resolution (default: the model's); timm ViTs are resized to it
    train_subset: int | None = None  # use this many training images (seeded), None: all
    val_subset: int | None = 1000
    # optimisation (Appendix B: SGD lr 0.005, cosine, 500 warm-up of 5000 steps; CLIP: AdamW 1e-5, wd 0.1)
    steps: int = 5000
    batch_size: int = 64
    optimizer: str | None = None  # default: sgd for classify, adamw for clip
    lr: float | None = None  # default: 0.005 (sgd) / 1e-5 (adamw)
    head_lr: float | None = None  # default: lr
    momentum: float = 0.9
    weight_decay: float | None = None  # default: 0 (sgd) / 0.1 (adamw)
    warmup_steps: int | None = None  # default: 10 % of steps (500 of 5000 in the paper)
    score_lr: float = 0.002  # gate scores' own SGD learning rate (TAPS-style)
    penalty_warmup_steps: int | None = None  # gate penalty off until this step (default: 20 % of steps)
    penalty_normalization: str = "sum"  # sum: lam * sum|s| (paper eq. 4); mean: divided by the number of gates
    # bookkeeping
    eval_every: int = 100
    seed: int = 0
    out: str = "runs/adapter"
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _choice("recipe", self.recipe, RECIPES)
        _choice("method", self.method, METHODS)
        _choice("penalty_normalization", self.penalty_normalization, ("sum", "mean"))
        if self.optimizer is not None:
            _choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("steps", "batch_size", "eval_every", "random_blocks"):
            _positive_int(name, getattr(self, name))
        for name in ("train_subset", "val_subset", "image_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "penalty_warmup_steps"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= self.steps):
                raise ConfigError(f"{name} must be an integer in [0, steps={self.steps}], got {v!r}")
        for name in ("lr", "head_lr", "score_lr"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        for name in ("momentum", "weight_decay"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if self.recipe == "clip" and self.method in ("linear_probe",):
            raise ConfigError("recipe 'clip' trains the towers contrastively: method linear_probe does not apply")
        if (self.method == "fixed_blocks") != bool(self.blocks):
            raise ConfigError("method fixed_blocks needs a non-empty `blocks` list, and `blocks` needs method fixed_blocks")
        if self.method == "linear_probe" and self.recipe != "classify":
            raise ConfigError("linear_probe needs recipe 'classify'")
        self.adapter_config()  # raises ConfigError on a bad adapter value

    # derived settings ------------------------------------------------------------------------
    def adapter_config(self, blocks: tuple[str, ...] | None = None) -> AdapterConfig:
        kinds = {} if self.kinds is None else {"kinds": tuple(self.kinds)}
        if self.method == "linear_probe":
            blocks = ()
        return AdapterConfig(
            variant=self.variant, r=self.r, lora_alpha=self.lora_alpha, gated=self.method == "selective",
            tau=self.tau, init_score=self.init_score, regularizer=self.regularizer, lam=self.lam,
            max_active_blocks=self.max_active_blocks, blocks=blocks, init_seed=self.seed, **kinds,
        )

    @property
    def resolved_optimizer(self) -> str:
        return self.optimizer or ("adamw" if self.recipe == "clip" else "sgd")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.resolved_optimizer == "adamw" else 0.005)

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.1 if self.resolved_optimizer == "adamw" else 0.0

    @property
    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    @property
    def resolved_penalty_warmup(self) -> int:
        return self.penalty_warmup_steps if self.penalty_warmup_steps is not None else self.steps // 5

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _choice(name, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {options}, got {value!r}")


def _positive_int(name, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


FIELDS = {f.name: f for f in fields(TrainConfig)}


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` with a TOML value (``r=16``, ``lam=0.5``, ``kinds=["q","v"]``); bare words are strings."""
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value")
    if raw.strip() in ("none", "None", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


def load_train_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a TOML file (optional), apply overrides, validate; ``ConfigError`` names any bad key."""
    values: dict = {}
    if path is not None:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    values.update(dict(items))
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid keys: {sorted(FIELDS)}")
    for k, v in values.items():  # TOML ints for float fields are fine; the rest is checked in validate
        if FIELDS[k].type in ("float", "float | None") and isinstance(v, int) and not isinstance(v, bool):
            values[k] = float(v)
        if FIELDS[k].type.startswith("str") and v is not None and not isinstance(v, str):
            raise ConfigError(f"{k} must be a string, got {v!r}")
    return TrainConfig(**values)


def dump_toml(config: TrainConfig) -> str:
    """The resolved config as TOML (``None`` values omitted), written next to the output."""
    lines = []
    for k, v in config.to_dict().items():
        if v is None:
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        elif isinstance(v, list):
            lines.append(f"{k} = [{', '.join(repr(str(x)).replace(chr(39), chr(34)) for x in v)}]")
        else:
            lines.append(f'{k} = "{v}"')
    return "\n".join(lines) + "\n"
