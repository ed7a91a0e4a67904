"""selora: serving runtime for sparse, selectively gated LoRA adapters."""
