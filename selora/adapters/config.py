"""Configuration of a (gated) LoRA/DoRA adapter: what is adapted and how it is gated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from selora.models.blocks import KINDS, BlockTable

VARIANTS = ("lora", "dora")
REGULARIZERS = ("l1", "l2", "hinge")


class ConfigError(ValueError):
    """An adapter or training setting that cannot work; raised before anything runs."""


@dataclass
class AdapterConfig:
    variant: str = "lora"  # "lora" or "dora" (weight-decomposed, paper §3.2 applies to both)
    r: int = 16  # rank of every block's A [r, d_in] and B [d_out, r]
    lora_alpha: float = 16.0  # delta W = (lora_alpha / r) * B @ A
    gated: bool = True  # learn a score per block, forward uses I(score >= tau) (STE)
    tau: float = 0.1  # gate threshold (TAPS)
    init_score: float = 0.15  # scores start above tau: every block on
    regularizer: str = "l1"  # penalty on scores: l1 lam*sum|s|, l2 lam*sum s^2, hinge lam*sum max(0, s - tau)
    lam: float = 1.0  # penalty weight lambda
    max_active_blocks: int | None = None  # budget: at most this many blocks on (top-k scores)
    kinds: tuple[str, ...] = KINDS  # block kinds to adapt
    towers: tuple[str, ...] | None = None  # towers to adapt (None: all of the base)
    blocks: tuple[str, ...] | None = None  # explicit block ids (random-blocks baseline); overrides kinds/towers
    init_seed: int = 0  # seed of A's random init
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.regularizer not in REGULARIZERS:
            raise ConfigError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.lam < 0:
            raise ConfigError(f"lam must be >= 0, got {self.lam}")
        if self.gated and self.init_score < self.tau:
            raise ConfigError(f"init_score {self.init_score} must be >= tau {self.tau}: gates start open")
        if self.max_active_blocks is not None and self.max_active_blocks < 0:
            raise ConfigError(f"max_active_blocks must be >= 0, got {self.max_active_blocks}")
        bad = set(self.kinds) - set(KINDS)
        if bad:
            raise ConfigError(f"unknown block kinds {sorted(bad)}; kinds are {KINDS}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def select_blocks(self, table: BlockTable) -> list[str]:
        """Block ids this adapter adapts, in table order."""
        if self.blocks is not None:
            unknown = [b for b in self.blocks if b not in table]
            if unknown:
                raise ConfigError(f"unknown block ids {unknown[:5]} for this base model")
            wanted = set(self.blocks)
            return [b for b in table if b in wanted]
        towers = set(self.towers or table.towers)
        return [b for b, s in table.items() if s.kind in self.kinds and s.tower in towers]

    def to_dict(self) -> dict:
        return asdict(self)
