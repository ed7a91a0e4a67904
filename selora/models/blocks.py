"""The block table: every adaptable weight matrix of a backbone, named `<tower>.<layer>.<kind>`.

A block is one slice of output rows of one ``nn.Linear`` (the *site*). q, k and v are row slices
of the fused input projection; out, fc1 and fc2 are whole layers. The table is what adapters are
validated against: its fingerprint is stored in every adapter file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import nn

KINDS = ("q", "k", "v", "out", "fc1", "fc2")

# Per library: the transformer blocks of each tower, and the Linear holding each kind.
_TOWERS = {
    "open_clip": {"vision": "visual.transformer.resblocks", "text": "transformer.resblocks"},
    "timm": {"vision": "blocks"},
}
_SITES = {
    "open_clip": {"qkv": "attn.in_proj", "out": "attn.out_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
    "timm": {"qkv": "attn.qkv", "out": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
}


@dataclass(frozen=True)
class BlockSpec:
    block_id: str
    tower: str
    layer: int
    kind: str
    site: str  # dotted path of the nn.Linear inside the model
    out_start: int  # first output row of the block in that Linear
    d_out: int
    d_in: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)


class BlockTable(dict[str, BlockSpec]):
    """Ordered ``block id -> BlockSpec`` (tower, layer, kind order)."""

    @property
    def fingerprint(self) -> str:
        return fingerprint({b: s.shape for b, s in self.items()})

    def sites(self) -> dict[str, list[BlockSpec]]:
        out: dict[str, list[BlockSpec]] = {}
        for spec in self.values():
            out.setdefault(spec.site, []).append(spec)
        return out

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.tower for s in self.values()))

    def num_layers(self, tower: str) -> int:
        return 1 + max(s.layer for s in self.values() if s.tower == tower)


def fingerprint(shapes: dict[str, tuple[int, int]]) -> str:
    """First 16 hex digits of SHA-256 over sorted lines ``<block id> <d_out>x<d_in>``."""
    lines = sorted(f"{b} {o}x{i}" for b, (o, i) in shapes.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def build_block_table(model: nn.Module, library: str) -> BlockTable:
    table = BlockTable()
    for tower, prefix in _TOWERS[library].items():
        for layer, _ in enumerate(model.get_submodule(prefix)):
            for key, rel in _SITES[library].items():
                site = f"{prefix}.{layer}.{rel}"
                linear = model.get_submodule(site)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{site} is {type(linear).__name__}, expected nn.Linear")
                d_out, d_in = linear.weight.shape
                kinds = ("q", "k", "v") if key == "qkv" else (key,)
                width = d_out // len(kinds)
                for i, kind in enumerate(kinds):
                    block_id = f"{tower}.{layer}.{kind}"
                    table[block_id] = BlockSpec(block_id, tower, layer, kind, site, i * width, width, d_in)
    return table
