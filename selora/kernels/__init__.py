"""Kernels: the torch reference (the spec), the torch backend, the Triton fused kernel, and op dispatch."""
