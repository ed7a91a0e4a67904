"""Kernels: the torch reference (the spec), the Triton fused kernel, and op dispatch."""
