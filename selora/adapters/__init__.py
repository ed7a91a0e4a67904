"""The method: gated LoRA/DoRA blocks, their injection, and the sparse adapter file format."""

from selora.adapters.config import AdapterConfig, ConfigError
from selora.adapters.format import (
    AdapterError,
    SparseAdapter,
    load_adapter,
    parse_adapter,
    save_adapter,
)
from selora.adapters.inject import attach, attached, detach, inject
from selora.adapters.layer import AdaptedLinear, use_batch
from selora.adapters.lora import GatedAdapter, export_adapter

__all__ = [
    "AdapterConfig", "ConfigError", "AdapterError", "SparseAdapter", "load_adapter", "parse_adapter",
    "save_adapter", "attach", "attached", "detach", "inject", "AdaptedLinear", "use_batch",
    "GatedAdapter", "export_adapter",
]
