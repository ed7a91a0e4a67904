"""Fused Triton kernel: base GEMM + LoRA/DoRA of the active blocks of a mixed batch.

Semantics: exactly ``selora.kernels.reference`` (the loop in ``ops``'s docstring).

Weights come from the site's slot buffers (``selora.kernels.batch``): ``A`` and ``Bᵀ`` rows
``rank_start .. rank_start + rank`` of the flattened page buffers, the scale and the DoRA factor
from row ``page``; the metadata rows are the only per-batch input besides x.

Design. One program per output tile ``y[m0:m0+BM, n0:n0+BN]``:

1. the base K-loop ``acc = x[m-tile] · W0[n-tile]ᵀ`` (fp32 accumulator, grouped tile order);
2. epilogue: for every entry whose rectangle (its item rows × its block's columns) meets the
   tile, the expand accumulates into the base tile itself: ``acc = s · Bᵀ_e[:, n-tile] + acc``
   with ``s = scale_e · x[m-tile] · A_eᵀ`` (rank in chunks of ``BLOCK_R``). ``s`` is zero outside
   the entry's rows and ``Bᵀ`` outside its columns (masked loads), so this adds exactly the
   rectangle and nothing needs masking afterwards; for DoRA the rectangle is then multiplied by
   ``f_e`` (entries are disjoint: each element meets at most one factor), and the bias comes
   last. Entries are disjoint rectangles, so one pass suffices; base-only rows and inactive
   blocks meet no entry and cost only the scalar test of the entry loop (E ≤ adapters × blocks
   of the site, a few hundred).

   Registers decide this design: one ``BLOCK_M × BLOCK_N`` fp32 tile lives through the
   epilogue, not three. The first version kept the LoRA term and the DoRA factors in tiles of
   their own; compiled for sm_90 (``benchmarks/kernel_compile.py``, no GPU needed) it spilled in
   12 of the 14 bf16 tile × {LoRA, DoRA} pairs at r = 16 (up to 3.7 KB per thread); this one
   spills in none of the tiles the config file lists (``results/kernel_compile_sm_90.md``).
3. where does ``s`` come from? Two modes, chosen per call by the largest rank of the layer
   (threshold ``KernelConfig.split_shrink_rank``, default ``fused_shrink_max_rank`` of the tuning data):

   - *fused shrink* (small ranks, **one launch per layer**): ``s`` is recomputed in the epilogue
     from the x tile the K-loop just streamed (L2-hot). It repeats the shrink once per column
     tile of the entry, i.e. extra FLOPs per touched tile ≈ ``BLOCK_R/BN + BLOCK_R/K`` of the
     tile's base FLOPs: for r ≤ 16, BN = 128, K = 768 that is ≈ 14 % on touched tiles, so
     ≈ 0.7 % of the layer at 5 % active blocks, and no second launch, no ``s`` round trip;
   - *split shrink* (large ranks, **two launches**): a grouped shrink kernel writes
     ``s_e = scale_e · x[rows_e]·A_eᵀ`` once per entry (compact buffer, ``item_rank_offset`` in the
     metadata), and the fused kernel reads it in the epilogue. At r = 256 the recomputation
     above would cost ``256/128 = 2×`` the base GEMM, more than unfused torch LoRA (≈ 0.67×
     for a q/k/v layer), while the split shrink is its true 2·rows·d_in·r once (+ one
     rows×r write/read, small next to the x and W0 streams).

   Arithmetic intensity argues the crossover sits between r = 16 and r = 64; the default
   threshold is 32. **No GPU was available in the sessions that wrote this kernel**, so the
   crossover, the tile speeds and the targets of issue 3 are unmeasured; what could be known
   without one is: the kernel compiles for sm_90 and sm_80 in fp32, fp16 and bf16, and which
   tiles fit the register file per dtype (the config file lists only those). To confirm on a GPU:
   ``benchmarks/kernel.py`` — the ratio to ``F.linear`` at r = 16 with 5 % and 100 % active
   blocks for both modes (force with ``KernelConfig.split_shrink_rank``, ``--split-shrink-rank``), the rank at which the two
   modes cross, and achieved TFLOP/s of the base K-loop against cuBLAS (the fused kernel must
   not lose on the base GEMM what it saves on LoRA). ``--save-tuning`` writes the autotuner's
   choice per key into ``configs/<gpu>.json`` (its ``tuned`` table: that GPU then launches those
   keys without autotuning); set the measured threshold there by hand.

4. where does the base GEMM run? (``KernelConfig.base_gemm``: ``--base-gemm``, else the tuning data)

   - ``fused`` (default): in the K-loop above, one launch;
   - ``library``: torch's GEMM (cuBLAS) writes ``x·W0ᵀ + b`` into y first, then the kernel runs
     with ``BASE_FROM_Y``: each program tests whether any entry meets its tile (the scalar
     loop) and only those tiles load y, take b out, add their entries' terms (and factors) as
     above, put b back and store. One more launch and a read + write of the touched tiles,
     but the base GEMM is the vendor's: if Triton's K-loop loses more than a few per cent to
     cuBLAS, the issue's 1.05× target is out of reach in ``fused`` mode whatever the LoRA
     costs, and ``library`` mode is the way to it. Which wins is a GPU measurement
     (``benchmarks/kernel.py``: columns *base in tile* and *base by torch*); unmeasured so far.

The interpreter (``TRITON_INTERPRET=1``) runs the very same kernel function on CPU tensors
(built with ``InterpretedFunction``, independent of import order; so the kernels call no
``@triton.jit`` helper of ``triton.language.standard`` such as ``tl.cdiv`` or ``tl.zeros``, which stays compiled
when triton was imported without the variable); every ``tl.dot`` is at least
16 × 16 × 16 (ranks padded by masking to ``BLOCK_R`` ≥ 16). The interpreter accepts code the GPU
compiler rejects, so ``selora.kernels.aot`` also compiles the same launches for sm_90/sm_80 on
any machine (``tests/kernels/test_aot.py``).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from selora.kernels import tuning as tuning_data
from selora.kernels.batch import META_STRIDE, LayerBatch
from selora.kernels.config import BASE_GEMMS, KernelConfig, KernelConfigError
LAUNCHES: Counter = Counter()  # kernel name -> launches in this process (tests read it)
TILE_SOURCES: Counter = Counter()  # where fused launches took their tile: tuned | fixed | autotuned
TUNED: dict[str, dict] = {}  # tune_key -> the autotuner's choice, in this process
TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_SIZE_M")  # the tuned constexprs of the fused kernel


def launch_count() -> int:
    """Total Triton kernel launches by this module in this process."""
    return sum(LAUNCHES.values())


def _lora_linear_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, y_ptr, a_ptr, bt_ptr, scales_ptr, meta_ptr, factor_ptr, s_ptr,
    # sizes
    M, N, K, OUT_SIZE, NUM_ENTRIES, TOKENS, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    stride_ar, stride_ak, stride_br, stride_bs, stride_fe,
    # features
    HAS_BIAS: tl.constexpr, HAS_DORA: tl.constexpr, SPLIT_SHRINK: tl.constexpr, BASE_FROM_Y: tl.constexpr,
    META_STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # tuning
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m, num_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N  # no tl.cdiv: see docstring
    group = GROUP_SIZE_M * num_n
    first_m = (pid // group) * GROUP_SIZE_M
    size_m = min(num_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m
    m_lo, n_lo = pid_m * BLOCK_M, pid_n * BLOCK_N
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    y_tile = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    in_y = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if BASE_FROM_Y:  # y already holds x·W0ᵀ + b (the library's GEMM): touch only tiles an entry meets
        touched = 0
        for e in range(0, NUM_ENTRIES):
            row = meta_ptr + e * META_STRIDE
            col_start = tl.load(row + 2)
            touched += ((tl.load(row + 0) * TOKENS < m_lo + BLOCK_M) & (tl.load(row + 1) * TOKENS > m_lo)
                        & (col_start < n_lo + BLOCK_N) & (col_start + OUT_SIZE > n_lo)).to(tl.int32)
        run = touched > 0
    else:
        run = True
    if run:
        if BASE_FROM_Y:
            acc = tl.load(y_tile, mask=in_y, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc -= tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        else:
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                             mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
                wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                             mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0.0)
                acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        for e in range(0, NUM_ENTRIES):
            row = meta_ptr + e * META_STRIDE
            row_start = tl.load(row + 0) * TOKENS
            row_end = tl.load(row + 1) * TOKENS
            col_start = tl.load(row + 2)
            if (row_start < m_lo + BLOCK_M) & (row_end > m_lo) & (col_start < n_lo + BLOCK_N) & (col_start + OUT_SIZE > n_lo):
                rank_start = tl.load(row + 3)
                rank = tl.load(row + 4)
                page = tl.load(row + 6)
                scale = tl.load(scales_ptr + page)
                row_in = (offs_m >= row_start) & (offs_m < row_end)
                col_in = (offs_n >= col_start) & (offs_n < col_start + OUT_SIZE)
                cols = offs_n - col_start
                # s is zero outside the entry's rows and Bᵀ outside its columns, so the expand
                # accumulates into the base tile directly: no second tile, nothing to mask afterwards.
                for r0 in range(0, rank, BLOCK_R):
                    r_in = (r0 + offs_r) < rank
                    ranks = rank_start + r0 + offs_r
                    if SPLIT_SHRINK:  # the shrink kernel stored scale · x·Aᵀ
                        s_base = s_ptr + tl.load(row + 5) * TOKENS
                        s = tl.load(s_base + (offs_m - row_start)[:, None] * rank + (r0 + offs_r)[None, :],
                                    mask=row_in[:, None] & r_in[None, :], other=0.0)
                    else:
                        s_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
                        for k0 in range(0, K, BLOCK_K):
                            k = k0 + offs_k
                            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                                         mask=row_in[:, None] & (k[None, :] < K), other=0.0)
                            at = tl.load(a_ptr + ranks[None, :] * stride_ar + k[:, None] * stride_ak,
                                         mask=r_in[None, :] & (k[:, None] < K), other=0.0)
                            s_acc = tl.dot(xt, at, s_acc, input_precision=DOT_PRECISION)
                        s = (s_acc * scale).to(y_ptr.dtype.element_ty)
                    bt = tl.load(bt_ptr + ranks[:, None] * stride_br + cols[None, :] * stride_bs,
                                 mask=r_in[:, None] & col_in[None, :], other=0.0)
                    acc = tl.dot(s, bt, acc, input_precision=DOT_PRECISION)
                if HAS_DORA:  # entries are disjoint: each element meets at most one factor
                    f = tl.load(factor_ptr + page * stride_fe + cols, mask=col_in, other=1.0).to(tl.float32)
                    acc *= tl.where(row_in[:, None], f[None, :], 1.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=in_y)


def _lora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, scales_ptr, meta_ptr, s_ptr,
    # sizes
    K, TOKENS,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak,
    # features
    META_STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # tuning
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``s_e[rows_e, r_e] = scale_e · x[rows_e] · A_eᵀ`` for entry ``program_id(0)``, one (rows, rank) tile."""
    e = tl.program_id(0)
    row = meta_ptr + e * META_STRIDE
    row_start = tl.load(row + 0) * TOKENS
    row_end = tl.load(row + 1) * TOKENS
    rank_start = tl.load(row + 3)
    rank = tl.load(row + 4)
    m_lo = row_start + tl.program_id(1) * BLOCK_M
    r_lo = tl.program_id(2) * BLOCK_R
    if (m_lo < row_end) & (r_lo < rank):
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_r = r_lo + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_in, r_in = offs_m < row_end, offs_r < rank
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=m_in[:, None] & (k[None, :] < K), other=0.0)
            at = tl.load(a_ptr + (rank_start + offs_r)[None, :] * stride_ar + k[:, None] * stride_ak,
                         mask=r_in[None, :] & (k[:, None] < K), other=0.0)
            acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        s_base = s_ptr + tl.load(row + 5) * TOKENS
        tl.store(s_base + (offs_m - row_start)[:, None] * rank + offs_r[None, :],
                 (acc * tl.load(scales_ptr + tl.load(row + 6))).to(s_ptr.dtype.element_ty), mask=m_in[:, None] & r_in[None, :])


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.cache
def _kernels(device_name: str):
    """(fused kernel, its autotuner, shrink kernel) for a device: JIT on CUDA, interpreted on CPU."""
    if device_name == "interpreter":
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_lora_linear_kernel), None, InterpretedFunction(_lora_shrink_kernel)
    from triton.runtime.jit import JITFunction

    candidates = tuning_data.tuning(device_name)["configs"]
    configs = [triton.Config({k: c[k] for k in TILE}, num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in candidates]
    fits = {id(cfg): (set(c.get("dtypes", DTYPE_NAMES.values())), set(c.get("base_gemms", BASE_GEMMS)))
            for cfg, c in zip(configs, candidates)}

    def listed_for_call(configs, named_args, **kwargs):
        """Autotune only the configs listed for this call's dtype and base GEMM (they compile
        without register spills there)."""
        dtype = DTYPE_NAMES[named_args["x_ptr"].dtype]
        base = "library" if kwargs.get("BASE_FROM_Y", named_args.get("BASE_FROM_Y")) else "fused"
        return [c for c in configs if dtype in fits[id(c)][0] and base in fits[id(c)][1]] or configs[:1]

    fused = JITFunction(_lora_linear_kernel)
    autotuned = triton.autotune(configs, key=["M_BUCKET", "N", "K", "OUT_SIZE", "SPLIT_SHRINK", "HAS_DORA", "BASE_FROM_Y"],
                                prune_configs_by={"early_config_prune": listed_for_call}, cache_results=True)(fused)
    return fused, autotuned, JITFunction(_lora_shrink_kernel)


def row_bucket(rows: int) -> int:
    """The autotuning key's row bucket: the next power of two (``triton.next_power_of_2``, in plain
    Python: this runs once per layer call)."""
    return 1 << max(rows - 1, 0).bit_length()


def tune_key(launch: "Launch") -> str:
    """The autotuning key of a fused launch, as the ``tuned`` table of a tuning file spells it."""
    x2, M, N, K, out_size = launch.args[0], *launch.args[10:14]
    f = launch.flags
    return (f"{DTYPE_NAMES[x2.dtype]} M<={row_bucket(M)} N={N} K={K} out={out_size} "
            f"split={int(f['SPLIT_SHRINK'])} dora={int(f['HAS_DORA'])} base={'library' if f['BASE_FROM_Y'] else 'fused'}")


@dataclass
class Launch:
    """One kernel launch of a layer call: everything but the grid and the tuned tile."""

    name: str  # "lora_shrink" | "lora_linear"
    args: tuple  # positional runtime arguments
    flags: dict  # feature constexprs (the tile comes from the tuning data)


def plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch,
         config: KernelConfig) -> tuple[torch.Tensor, list[Launch]]:
    """Validate one layer call and build its output and launches (shrink first when split).

    ``config.base_gemm == "library"`` leaves x·W0ᵀ + b to torch, written into y before the fused
    launch, which then reads y and touches only the tiles some entry meets. Checks use the
    layer's host-side summaries: nothing here walks the entries.

    Shared by the launch below and by ``selora.kernels.aot``, which compiles the same launches
    for a GPU architecture without one."""
    d_out, d_in = weight.shape
    buffers = layer.buffers
    if x.shape[-1] != d_in or buffers.lora_a.shape[1] != d_in:
        raise ValueError(f"lora_linear: x [..., {x.shape[-1]}], W0 [{d_out}, {d_in}], A [R, {buffers.lora_a.shape[1]}] disagree")
    tensors = [x, weight, buffers.lora_a, buffers.lora_bt, buffers.dora_factor] + ([bias] if bias is not None else [])
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError("lora_linear: x, weight, bias and the slot buffers must share one dtype and device")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"lora_linear: unsupported dtype {x.dtype}")
    if config.tuning.get("source") == "interpreter.json" and x.dtype == torch.bfloat16:
        raise KernelConfigError("bf16 is not supported by the Triton interpreter (its tl.dot is wrong for bf16)")
    if layer.items_end > x.shape[0] or layer.cols_end > d_out:
        raise ValueError("lora_linear: layer metadata addresses rows or columns outside x·W0ᵀ")
    if tuple(layer.meta.shape) != (layer.num_entries, META_STRIDE) or layer.meta.device != x.device:
        raise ValueError(f"lora_linear: meta must be int32 [{layer.num_entries}, {META_STRIDE}] on {x.device}")

    x2 = x.reshape(-1, d_in)
    M, tokens = x2.shape[0], x2.shape[0] // max(x.shape[0], 1)
    y = torch.empty((M, d_out), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, []
    split = layer.max_block_rank > config.split_shrink_rank
    precision = "ieee" if x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    a, bt, factor, scales = buffers.lora_a, buffers.lora_bt, buffers.dora_factor, buffers.scales
    launches, s = [], y  # s: placeholder pointer when the shrink is fused (never read)
    if split:  # scale·x·Aᵀ of every entry, side by side (item_rank_offset)
        s = torch.empty(tokens * layer.shrink_size, dtype=x.dtype, device=x.device)
        launches.append(Launch("lora_shrink", (x2, a, scales, layer.meta, s, d_in, tokens, x2.stride(0),
                                               x2.stride(1), a.stride(0), a.stride(1)),
                               dict(META_STRIDE=META_STRIDE, DOT_PRECISION=precision)))
    args = (x2, weight, bias if bias is not None else y, y, a, bt, scales, layer.meta, factor, s,
            M, d_out, d_in, layer.out_size, layer.num_entries, tokens, row_bucket(M),
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            a.stride(0), a.stride(1), bt.stride(0), bt.stride(1), factor.stride(0))
    launches.append(Launch("lora_linear", args, dict(
        HAS_BIAS=bias is not None, HAS_DORA=layer.has_dora, SPLIT_SHRINK=split,
        BASE_FROM_Y=config.base_gemm == "library", META_STRIDE=META_STRIDE, DOT_PRECISION=precision)))
    return y, launches


def shrink_grid(layer: LayerBatch, tokens: int, tile: dict) -> tuple[int, int, int]:
    """(entries, row tiles of the largest entry, rank tiles of the largest rank)."""
    return (layer.num_entries, triton.cdiv(layer.max_entry_items * tokens, tile["BLOCK_M"]),
            triton.cdiv(layer.max_block_rank, tile["BLOCK_R"]))


def triton_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerBatch,
                       config: KernelConfig) -> torch.Tensor:
    """Launch the fused kernel(s) for one layer; validates shapes, dtypes and metadata.

    The fused kernel's tile: the tuning data's ``tuned`` entry for this call's key if there is
    one (measured on that GPU), else the autotuner's choice among the candidates, which is
    recorded in ``TUNED`` (``benchmarks/kernel.py --save-tuning`` writes it to the file)."""
    device_name = tuning_data.device_name(x.device)
    cfg = config.tuning
    y, launches = plan(x, weight, bias, layer, config)
    fused, autotuned, shrink = _kernels(device_name)
    M, d_out = y.shape
    for launch in launches:
        if launch.name == "lora_shrink":
            sh = cfg["shrink"]
            tokens = launch.args[6]
            shrink[shrink_grid(layer, tokens, sh)](*launch.args, **launch.flags, BLOCK_M=sh["BLOCK_M"], BLOCK_K=sh["BLOCK_K"],
                                                   BLOCK_R=sh["BLOCK_R"], num_warps=sh.get("num_warps", 4),
                                                   num_stages=sh.get("num_stages", 3))
            LAUNCHES[launch.name] += 1
            continue
        if launch.flags["BASE_FROM_Y"]:  # the library's GEMM writes x·W0ᵀ + b into y first
            x2 = launch.args[0]
            if bias is None:
                torch.mm(x2, weight.t(), out=y)
            else:
                torch.addmm(bias, x2, weight.t(), out=y)
        tuned = cfg.get("tuned")
        tile = tuned.get(tune_key(launch)) if tuned else None
        source = "tuned" if tile is not None else "fixed"
        if tile is None and autotuned is None:
            tile = cfg["configs"][0]  # the interpreter's one tile
        if tile is not None:
            grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(d_out, tile["BLOCK_N"]),)
            options = {} if autotuned is None else dict(num_warps=tile["num_warps"], num_stages=tile["num_stages"])
            fused[grid](*launch.args, **launch.flags, **{k: tile[k] for k in TILE}, **options)
            TILE_SOURCES[source] += 1
        else:
            known = len(autotuned.cache)
            autotuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)](*launch.args, **launch.flags)
            if len(autotuned.cache) > known:  # this key was tuned just now: keep its choice for the tuning file
                best = autotuned.best_config
                TUNED[tune_key(launch)] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
            TILE_SOURCES["autotuned"] += 1
        LAUNCHES[launch.name] += 1
    return y.view(*x.shape[:-1], d_out)
