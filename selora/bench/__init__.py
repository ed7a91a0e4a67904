"""``selora bench``: FLOPs, latency, multi-tenant throughput and memory of selora against its
peers (base model, merged weights, HF PEFT LoRA/DoRA), in the layout of the paper's Figure 9.

FLOPs everywhere are 2 per multiply-add, matrix products only (GEMMs, convolutions, attention
matmuls), as ``torch.utils.flop_counter.FlopCounterMode`` counts them; elementwise work (bias,
norms, softmax, GELU, DoRA's per-channel scale) is not counted.
"""
