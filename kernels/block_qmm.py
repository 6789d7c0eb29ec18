"""block_qmm: quantized expert products over 64-row blocks of one expert each (MoE prefill).

The MoE prefill (kernels/moe_experts.py `_blocks`) sorts the (token, expert) pairs by expert
into blocks of BLOCK rows, each expert's rows from a block of their own (zero rows pad it), so
every block is one dense product with one expert's weights. Before this op those weights were
dequantized to the activation dtype (all experts, every layer: 19 ms of a GLM-4.7-Flash prefill
of 2048 tokens on an H200) and multiplied by MLX's gather GEMM (52 ms). Here one launch reads
the experts quantized, in MLX's affine layout, dequantizes them in registers and multiplies on
tensor cores (body `src/block_qmm.h`); the gated form (`src/block_qmm_glu.h`) runs the gate and
up stacks in one pass and writes silu(gate) * up. Spare blocks past the used count (a tensor,
known only on the GPU) return at once. The reference (CPU path and tests' twin) is a dequantize
and MLX's `gather_mm` over the same blocks.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .launch import KernelSpec, backend, cdiv, launch

SPEC = KernelSpec("marlin_block_qmm", "block_qmm.h",
                  ("x", "owner", "meta", "w", "scales", "biases"), ("y",))
SPEC_GLU = KernelSpec("marlin_block_qmm_glu", "block_qmm_glu.h",
                      SPEC.inputs + ("w2", "scales2", "biases2"), ("y",))
BLOCK = 64  # rows per block (four 16-row tensor-core tiles)
BITS = (2, 3, 4, 5, 6, 8)
X_DTYPES = (mx.float16, mx.bfloat16)
S_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
XKIND = {mx.float16: 1, mx.bfloat16: 2}


def reference(x, owner, used, stacks, group_size, bits):
    """The same product with MLX's ops: every block's rows times its expert's dequantized
    weights (all blocks, spare ones included), in float32 (MLX's CPU gather_mm takes no
    other type)."""
    K = x.shape[-1]
    xb = x.reshape(-1, BLOCK, K).astype(mx.float32)
    outs = []
    for w, s, b in stacks:
        dense = mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(mx.float32)
        outs.append(mx.gather_mm(xb, dense.swapaxes(-1, -2), rhs_indices=owner))
    y = nn.silu(outs[0]) * outs[1] if len(outs) == 2 else outs[0]
    return y.reshape(x.shape[0], -1).astype(x.dtype)


def supported(dtype, K, stacks, group_size, bits) -> bool:
    """Inputs the kernel covers: 16-bit activations of K values, affine stacks (E, N, K) with
    biases, K and the group size multiples of 32, both stacks of one shape and dtype."""
    if dtype not in X_DTYPES or bits not in BITS or group_size % 32:
        return False
    w, s, b = stacks[0]
    return (w.ndim == 3 and K % 32 == 0 and K * bits // 32 == w.shape[-1]
            and s.dtype in S_DTYPES and b is not None and b.dtype == s.dtype
            and K % group_size == 0
            and all(t[0].shape == w.shape and t[1].dtype == s.dtype and t[2] is not None
                    and t[2].dtype == s.dtype for t in stacks))


def config(N: int, gated: bool) -> tuple[int, int]:
    """(8-column tiles per simdgroup per stack, simdgroups): 32 columns a simdgroup, or 16 of
    each stack when gated (the same 64 accumulators), 4 simdgroups."""
    return (2 if gated else 4), 4


def plan(x, stacks, group_size, bits, NT=None, NW=None):
    """(spec, template, grid, threadgroup, output shape) of a launch."""
    gated = len(stacks) == 2
    w, s, _ = stacks[0]
    N, K = w.shape[1], x.shape[-1]
    dNT, dNW = config(N, gated)
    NT, NW = NT or dNT, NW or dNW
    if (BLOCK * 8) % (32 * NW):
        raise ValueError(f"block_qmm: {NW} simdgroups do not split a block's {BLOCK * 8} loads")
    template = [("T", x.dtype), ("S", s.dtype), ("XK", XKIND[x.dtype]), ("BITS", bits),
                ("GS", group_size), ("K", K), ("N", N), ("NT", NT), ("NW", NW)]
    grid = (32 * NW * cdiv(N, 8 * NT * NW), x.shape[0] // BLOCK, 1)
    return (SPEC_GLU if gated else SPEC), template, grid, (32 * NW, 1, 1), (x.shape[0], N)


def block_qmm_kernel(x, owner, used, stacks, group_size, bits, NT=None, NW=None):
    """The custom kernel alone (no checks, no fallback)."""
    spec, template, grid, tg, oshape = plan(x, stacks, group_size, bits, NT, NW)
    inputs = [x, owner, used] + [a for t in stacks for a in t]
    return launch(spec, inputs, template, grid, tg, [oshape], [x.dtype])[0]


def block_qmm(x, owner, used, stacks, group_size: int = 64, bits: int = 4):
    """x (B * 64, K) in blocks of 64 rows, owner (B,) uint32 the expert of each block, used
    (1,) int32 the number of blocks in use (the rest are spare and not computed on a GPU);
    stacks: one (w, scales, biases) of shape (E, N, .), or two (gate, up) for the SwiGLU.
    Returns (B * 64, N): x W_e^T per block, or silu(x W_gate^T) * (x W_up^T)."""
    if len(stacks) not in (1, 2):
        raise ValueError(f"block_qmm takes one or two weight stacks, got {len(stacks)}")
    if x.ndim != 2 or x.shape[0] % BLOCK or owner.shape != (x.shape[0] // BLOCK,):
        raise ValueError(f"block_qmm: x {x.shape} must be ({BLOCK} * B, K) with owner (B,), "
                         f"got owner {owner.shape}")
    if backend() is None or not supported(x.dtype, x.shape[-1], stacks, group_size, bits):
        return reference(x, owner, used, stacks, group_size, bits)
    return block_qmm_kernel(x, owner.astype(mx.uint32), used.astype(mx.int32), stacks,
                            group_size, bits)


def compile_cases():
    """Metal/CUDA compile checks: GLM-4.7-Flash's expert shapes (gated gate/up, plain down) at
    4 bits in both 16-bit kinds, 8 bits (float16: the magic decode; bfloat16: the float one) and
    3 bits (codes straddling words, K not a multiple of 128)."""
    out = []
    for name, dt, bits, E, N, K, gated in (("glm-glu-bf16", mx.bfloat16, 4, 64, 1536, 2048, True),
                                           ("glm-down-f16", mx.float16, 4, 64, 2048, 1536, False),
                                           ("b8-f16", mx.float16, 8, 8, 256, 512, True),
                                           ("b8-bf16", mx.bfloat16, 8, 8, 256, 512, False),
                                           ("b3", mx.bfloat16, 3, 4, 200, 160, True)):
        x = mx.zeros((128, K), dt)
        st = (mx.zeros((E, N, K * bits // 32), mx.uint32), mx.zeros((E, N, K // 64), dt),
              mx.zeros((E, N, K // 64), dt))
        stacks = (st, st) if gated else (st,)
        spec, t = plan(x, stacks, 64 if K % 64 == 0 else 32, bits)[:2]
        in_dtypes = [dt, mx.uint32, mx.int32] + [mx.uint32, dt, dt] * len(stacks)
        out.append((f"block-qmm-{name}", spec, in_dtypes,
                    [1 << 20, 8, 8] + [1 << 20] * (len(in_dtypes) - 3), [dt], t))
    return out
