"""Which blocks a synthetic benchmark adapter has active (the adapters themselves:
``selora.adapters.synthetic.random_adapter``).

Values do not matter for FLOPs or speed; shapes, rank and which blocks are active do. The
default block order follows the paper's Figures 10-11 (activations concentrate in the first
MLP layer, ``fc1``, of the vision tower's top layers), so "the first k blocks" is a realistic
gated adapter with k active blocks.
"""

from __future__ import annotations

from selora.models.blocks import BlockTable

PAPER_FRACTIONS = (0.0208, 0.0347, 0.0625)  # CLIP ViT-B/16: 3, 5, 9 of 144 blocks (paper §4.2)
_KIND_ORDER = ("fc1", "fc2", "out", "v", "q", "k")
_TOWER_ORDER = ("vision", "text")


def paper_block_order(table: BlockTable) -> list[str]:
    """All block ids, most-often-active first: kind (fc1 first), vision before text, top layer first."""
    return sorted(table, key=lambda b: (_KIND_ORDER.index(table[b].kind), _TOWER_ORDER.index(table[b].tower), -table[b].layer))


def active_count(fraction: float, num_blocks: int) -> int:
    """Blocks active at ``fraction`` of ``num_blocks``, rounded half up, at least one."""
    return max(1, int(fraction * num_blocks + 0.5))
