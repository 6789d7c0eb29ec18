"""qmv: fused dequantize + matrix-vector product for small M (decode), affine format.

y = x @ dequant(w).T with w in MLX's affine layout (uint32 words packed along K, `scales` and
`biases` per group). The kernel body is `src/qmv.h`; the reference is MLX's own
`quantized_matmul`, which is also the CPU path.
"""

from __future__ import annotations

import os

import mlx.core as mx

from .formats import validate_quantized
from .launch import (KernelSpec, _gpu_backend, backend, cdiv, cuda_plan_kernel, launch_planned,
                     prod, rows_input)

SPEC = KernelSpec("marlin_qmv", "qmv.h", ("x", "w", "scales", "biases"), ("y",))
# The tensor-core GEMV (src/qmv_tc.h): 16-bit x, up to TC_MAX_M rows, 2/4 bits (8 with float16)
TC_SPEC = KernelSpec("marlin_qmv_tc", "qmv_tc.h", ("x", "w", "scales", "biases"), ("y",))
TC_MAX_M = 8
# MARLIN_MLX_QMV_TC=1 sends the launches it covers to the tensor-core body. Off by default: on
# the H200 it measured level with the float body at one row and with qmm at 2-8 rows
# (KERNEL_NOTES "Session 12"); it is the base for the pipelined decode GEMV.
USE_TC = os.environ.get("MARLIN_MLX_QMV_TC", "0") == "1"
# stages of qmv_tc's asynchronous copies (0: the next step's loads in registers)
TC_PIPE = int(os.environ.get("MARLIN_MLX_QMV_TC_PIPE", "0"))
# The folded tensor-core GEMV (src/qmv_fold.h): up to FOLD_MAX_M rows of 16-bit x, 4-bit codes,
# K % 256 == 0; `rows` is the run-time row count (launch.rows_input).
FOLD_SPEC = KernelSpec("marlin_qmv_fold", "qmv_fold.h", ("x", "w", "scales", "biases", "rows"),
                       ("y",))
# rows: one 8-column tile of the products (16 rows on two tiles measured 1.5-2x qmm's time)
FOLD_MAX_M = 8
# The launches it covers (and the fused decode variants, kernels/fused_linear.py) take
# it on CUDA: on the H200 it cut the GPU time of a compiled Qwen3-8B decode step from 3.02 to
# 2.40 ms (KERNEL_NOTES "Session 13"). On Metal its products are lane shuffles until
# k_mma16816 maps onto simdgroup_matrix, so there it is opt-in. MARLIN_MLX_QMV_FOLD=0 / 1
# forces it off / on; None: CUDA only.
_FOLD_ENV = os.environ.get("MARLIN_MLX_QMV_FOLD", "").strip()
USE_FOLD = None if _FOLD_ENV == "" else _FOLD_ENV != "0"
FOLD_PF = int(os.environ.get("MARLIN_MLX_QMV_FOLD_PF", "1"))  # its register sets in turn - 1
# One row, one row tile: each lane reads 16-byte pieces of a row's codes (groups spread over
# the products' columns) instead of its GS / 32 words of every group (fold_core.h, PIECES). On
# the H200 it was 2-16% faster on 7 of 8 launch shapes, but the gated gate/up launch (two row
# tiles) ran 8% slower with it (KERNEL_NOTES "Session 14"), so two tiles keep the group reads.
# =0 turns it off.
FOLD_P16 = int(os.environ.get("MARLIN_MLX_QMV_FOLD_P16", "1"))


def fold_enabled() -> bool:
    """Whether launches the folded body covers take it (USE_FOLD, else CUDA only)."""
    return USE_FOLD if USE_FOLD is not None else _gpu_backend() == "cuda"


BITS = (2, 3, 4, 5, 6, 8)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
XKIND = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
M_TILE = 8          # rows of x one threadgroup handles; larger M tiles the grid's y axis
# Enough simdgroups in flight to cover memory latency on a big GPU (H200: 132 SMs).
TARGET_WARPS = int(132 * 32 * float(os.environ.get("MARLIN_MLX_QMV_TW", "1")))
R_DECODE = 4        # output rows per simdgroup for M <= 4


def reference(x, w, scales, biases, group_size=64, bits=4):
    """MLX's built-in quantized matmul: the CPU path and the oracle's fast twin."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size,
                               bits=bits, mode="affine")


def supported(x, w, scales, biases, group_size, bits) -> bool:
    """Whether the custom kernel covers these inputs (else callers use `reference`)."""
    return (bits in BITS and x.dtype in DTYPES and scales.dtype in DTYPES and biases is not None
            and biases.dtype in DTYPES and w.ndim == 2 and group_size % 32 == 0)


def config(M: int, N: int, K: int, bits: int, R: int | None = None, SK: int | None = None):
    """(rows per simdgroup, simdgroups splitting K) for a launch (measured on an H200 with
    Nsight Compute: R=4 with split-K to ~4k simdgroups was best at M=1)."""
    if R is None:
        R = R_DECODE if M <= 4 else 2
    steps = cdiv(K // 32, 32)  # 32-lane steps along K
    if SK is None:
        SK = max(1, min(8, steps, cdiv(TARGET_WARPS, cdiv(N, R))))
    return R, max(1, min(SK, 32))


def qmv(x, w, scales, biases, group_size: int = 64, bits: int = 4, *, R: int | None = None,
        SK: int | None = None, validate: bool = True):
    """y[..., N] = x[..., K] @ dequant(w, scales, biases).T, custom kernel on a GPU."""
    if validate:
        validate_quantized(x, w, scales, biases, "affine", bits, group_size)
    if backend() is None or not supported(x, w, scales, biases, group_size, bits):
        return reference(x, w, scales, biases, group_size, bits)
    return qmv_kernel(x, w, scales, biases, group_size, bits, R=R, SK=SK)


# PF=1: software pipelining (next step's loads before this step's arithmetic)
PREFETCH = int(os.environ.get("MARLIN_MLX_QMV_PF", "0"))
_PLANS: dict = {}


def _plan(xdt, sdt, bits, group_size, xshape, N, R, SK, PF=None):
    """(template, grid, threadgroup, output shapes, output dtypes, kernel object, its template)
    for x of shape `xshape`; cached, since the host cost of a launch counts at decode. x goes
    to the kernel with its leading dims as they are (it reads x as rows of K) and y comes back
    in its final shape: no reshape nodes around the launch. On CUDA the launch calls the kernel
    object directly (launch.cuda_plan_kernel); Metal goes through `launch.launch`, which pads
    tiny inputs."""
    PF = PREFETCH if PF is None else PF
    key = (xdt, sdt, bits, group_size, xshape, N, R, SK, PF)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = build_plan(SPEC, xdt, sdt, bits, group_size, xshape, N, R, SK, PF)
    return plan


def build_plan(spec, xdt, sdt, bits, group_size, xshape, N, R, SK, PF, gated: bool = False,
               extra: tuple = ()):
    """The launch plan of a GEMV-shaped kernel (this one, or the fused gated MLP with
    `gated`, whose simdgroups each read R gate rows and R up rows); `extra` template constants
    go after the shared ones (the fused norm variants' EPS)."""
    K, lead = xshape[-1], tuple(xshape[:-1])
    MT = prod(lead)
    M = min(MT, M_TILE)
    R, SK = config(M, 2 * N if gated else N, K, bits, R, SK)
    if gated:
        R = max(1, R // 2)
    template = [("T", xdt), ("S", sdt), ("XK", XKIND[xdt]), ("BITS", bits),
                ("GS", group_size), ("R", R), ("SK", SK), ("PF", PF), ("M", M), ("MT", MT),
                ("K", K), ("N", N), *extra]
    kern, ktemplate = cuda_plan_kernel(spec, template) if backend() == "cuda" else (None, None)
    return (template, (32 * SK * cdiv(N, R), cdiv(MT, M), 1), (32 * SK, 1, 1),
            [(*lead, N)], [xdt], kern, ktemplate)


def tc_supported(xdt, bits: int, MT: int) -> bool:
    """Whether the tensor-core body covers a launch: 16-bit x (the products' inputs), at most
    TC_MAX_M rows, and codes whose pairs decode exactly into a 16-bit exponent."""
    return (xdt in (mx.float16, mx.bfloat16) and MT <= TC_MAX_M
            and (bits in (2, 4) or (bits == 8 and xdt == mx.float16)))


TC_TARGET_WARPS = 132 * 16  # simdgroups in flight for the tensor-core body (H200: 132 SMs)


TC_SHARED = {"cuda": 48 * 1024, "metal": 32 * 1024}  # static threadgroup memory per group


def tc_pipe_fits(K: int, bits: int, gs: int, ssize: int, U: int) -> bool:
    """Whether the asynchronous-copy loop covers a shape: 16-byte weight rows, and a step's
    scales in whole aligned 4-byte words (its 128 U values span whole groups)."""
    NG = K // gs
    return ((K * bits // 32) % 4 == 0 and (128 * U) % gs == 0
            and ((128 * U // gs) * ssize) % 4 == 0 and (NG * ssize) % 4 == 0)


def tc_shared_bytes(RT, SK, U, PIPE, bits, gs, ssize, MT) -> int:
    """Threadgroup memory of a launch: the split-K buffer, plus PIPE stages per simdgroup."""
    red = SK * 16 * RT * 8 * 4
    if not PIPE:
        return red
    stage = (16 * RT * (U * bits + 1) * 16 + MT * (16 * U + 1) * 16
             + 2 * 16 * RT * ((128 * U // gs) * ssize // 4) * 4)
    return red + SK * PIPE * stage


def tc_config(N: int, K: int, RT: int | None = None, SK: int | None = None,
              U: int | None = None, PIPE: int | None = None, bits: int = 4, gs: int = 64,
              ssize: int = 2, MT: int = 1):
    """(16-row weight tiles per simdgroup, simdgroups splitting K, 32-value chunks per lane
    and step, asynchronous-copy stages) of a tensor-core launch. Split-K, then the stages,
    shrink until the threadgroup memory fits the backend's static limit."""
    # the best measured launches on the H200 (KERNEL_NOTES "Session 12"): one row tile and two
    # chunks a lane at one row of x; two row tiles (N >= 8192) and one chunk at 4-8 rows
    if RT is None:
        RT = 2 if MT > 1 and N >= 8192 else 1
    if U is None:
        U = 2 if MT == 1 else 1
    if PIPE is None:
        PIPE = TC_PIPE
    if PIPE and not tc_pipe_fits(K, bits, gs, ssize, U):
        PIPE = 0
    steps = cdiv(K // 32, 4 * U)
    if SK is None:
        SK = cdiv(TC_TARGET_WARPS, cdiv(N, 16 * RT))
    SK = max(1, min(SK, steps, 8))
    limit = TC_SHARED.get(backend() or "cuda", TC_SHARED["metal"])
    while PIPE and tc_shared_bytes(RT, SK, U, PIPE, bits, gs, ssize, MT) > limit:
        if SK > 1:
            SK //= 2
        elif PIPE > 2:
            PIPE -= 1
        else:
            PIPE = 0
    return RT, SK, U, PIPE


def tc_plan(xdt, sdt, bits, group_size, xshape, N, RT=None, SK=None, U=None, PIPE=None):
    """The tensor-core launch plan, cached like `_plan`'s."""
    key = ("tc", xdt, sdt, bits, group_size, xshape, N, RT, SK, U, PIPE)
    plan = _PLANS.get(key)
    if plan is None:
        K, lead = xshape[-1], tuple(xshape[:-1])
        MT = prod(lead)
        RT, SK, U, PIPE = tc_config(N, K, RT, SK, U, PIPE, bits, group_size, sdt.size, MT)
        template = [("T", xdt), ("S", sdt), ("XK", XKIND[xdt]), ("BITS", bits),
                    ("GS", group_size), ("RT", RT), ("SK", SK), ("U", U), ("PIPE", PIPE),
                    ("MT", MT), ("K", K), ("N", N)]
        kern, ktemplate = (cuda_plan_kernel(TC_SPEC, template) if backend() == "cuda"
                           else (None, None))
        plan = _PLANS[key] = (template, (32 * SK * cdiv(N, 16 * RT), 1, 1), (32 * SK, 1, 1),
                              [(*lead, N)], [xdt], kern, ktemplate)
    return plan


def fold_supported(xdt, sdt, bits: int, group_size: int, MT: int, K: int) -> bool:
    """Whether the folded body covers a launch: 1 to FOLD_MAX_M rows of 16-bit x, 16-bit
    scales, 4-bit codes, groups of 32/64/128 and whole 256-value steps."""
    return (1 <= MT <= FOLD_MAX_M and xdt in (mx.float16, mx.bfloat16)
            and sdt in (mx.float16, mx.bfloat16) and bits == 4 and group_size in (32, 64, 128) and K % 256 == 0)


def body_tag(xdt, sdt, bits: int, group_size: int, MT: int, K: int) -> str:
    """'-fold' where the folded body runs this launch, else '': part of the selection's cache
    keys, so a choice timed with one body is not reused for the other."""
    on = fold_enabled() and fold_supported(xdt, sdt, bits, group_size, MT, K)
    return "-fold" if on else ""


FOLD_TARGET_WARPS = 2048  # the H200 sweep's best split-K at N = 4096, 8192, 12288 (Session 13)


def fold_rows_bound(MT: int) -> int:
    """The template's row bound MR: 1 (x in every register set of the weights' prefetch) or 8
    (the products' 8 columns; each lane's slots of the next step in one more register set)."""
    return 1 if MT == 1 else 8


def fold_shared_bytes(RT: int, SK: int, MR: int) -> int:
    """Threadgroup memory of a folded launch: staged x (rows of 33 to 36 slots), then the
    split-K sums."""
    return SK * MR * (33 if MR == 1 else 36) * 16 + SK * (MR * 16 * RT + MR) * 4


def fold_config(N: int, K: int, RT: int | None = None, SK: int | None = None,
                PF: int | None = None, gated: bool = False, MT: int = 1):
    """(16-row tiles per simdgroup, simdgroups splitting K, register prefetch) of a folded
    launch. Split-K is the power of two that brings the simdgroups nearest FOLD_TARGET_WARPS
    from below (uneven splits measured slower), at most one 256-value step each, halved until
    the staged x of MT rows fits the backend's threadgroup memory; a gated launch reads its
    gate and up rows as two tiles."""
    # several rows: two row tiles, level or up to 1.5x faster at 2-8 rows on the five
    # shapes (H200, KERNEL_NOTES "Session 14"), as their loads in flight cover the staging
    MR = fold_rows_bound(MT)
    RT = 2 if gated else (RT or (2 if MT > 1 else 1))
    PF = FOLD_PF if PF is None else PF
    if SK is None:
        want = max(1, FOLD_TARGET_WARPS // cdiv(N, 16 * (1 if gated else RT)))
        SK = 1 << (want.bit_length() - 1)
    SK = max(1, min(SK, K // 256, 8))
    limit = TC_SHARED.get(backend() or "cuda", TC_SHARED["metal"])
    while SK > 1 and fold_shared_bytes(RT, SK, MR) > limit:
        SK //= 2
    return RT, SK, PF


def fold_plan(xdt, sdt, group_size, xshape, N, RT=None, SK=None, PF=None, spec=None,
              extra: tuple = (), P16=None):
    """The folded launch plan, cached like `_plan`'s, with its run-time row count input last
    (`spec`: a fused variant, whose extra template constants follow; P16: 16-byte pieces at
    one row and one row tile, default FOLD_P16)."""
    spec = spec or FOLD_SPEC
    P16 = FOLD_P16 if P16 is None else P16
    key = ("fold", spec, xdt, sdt, group_size, xshape, N, RT, SK, PF, extra, P16)
    plan = _PLANS.get(key)
    if plan is None:
        K, lead = xshape[-1], tuple(xshape[:-1])
        gated = "gated" in spec.src
        MT = prod(lead)
        MR = fold_rows_bound(MT)
        RT, SK, PF = fold_config(N, K, RT, SK, PF, gated, MT)
        template = [("T", xdt), ("S", sdt), ("XK", XKIND[xdt]), ("SXK", XKIND[sdt]),
                    ("GS", group_size), ("RT", RT), ("SK", SK), ("PF", PF), ("MR", MR),
                    ("P16", int(bool(P16) and MR == 1 and RT == 1)), ("K", K), ("N", N),
                    *extra]
        kern, ktemplate = (cuda_plan_kernel(spec, template) if backend() == "cuda"
                           else (None, None))
        tiles = cdiv(N, 16 * (1 if gated else RT))
        plan = _PLANS[key] = (template, (32 * SK * tiles, 1, 1), (32 * SK, 1, 1),
                              [(*lead, N)], [xdt], kern, ktemplate, rows_input(MT))
    return plan


def qmv_kernel(x, w, scales, biases, group_size, bits, *, R=None, SK=None, PF=None, tc=None,
               RT=None, U=None, PIPE=None, fold=None, P16=None):
    """The custom kernel alone (no validation, no fallback): the folded body where it covers
    the launch (`fold`, default fold_enabled() unless a float-body shape R / PF or `tc` is
    asked for; RT, SK, PF its shape), the tensor-core body where asked (`tc`, default USE_TC;
    RT, U, PIPE its row tiles, chunks per lane and copy stages; P16 the folded body's 16-byte
    pieces), else the float-FMA one. Kept lean: at decode the host cost of this call is paid
    for every linear layer of every token."""
    sdt = scales.dtype
    if biases.dtype != sdt:
        biases = biases.astype(sdt)
    if fold is None:
        fold = fold_enabled() and R is None and PF is None and not tc
    if tc is None:
        tc = USE_TC and R is None and PF is None
    inputs = [x, w, scales, biases]
    if fold and fold_supported(x.dtype, sdt, bits, group_size, prod(x.shape[:-1]), x.shape[-1]):
        spec = FOLD_SPEC
        template, grid, tg, oshape, odt, kern, ktemplate, rows = fold_plan(
            x.dtype, sdt, group_size, x.shape, w.shape[0], RT, SK, PF, P16=P16)
        inputs.append(rows)
    elif tc and tc_supported(x.dtype, bits, prod(x.shape[:-1])):
        spec = TC_SPEC
        template, grid, tg, oshape, odt, kern, ktemplate = tc_plan(
            x.dtype, sdt, bits, group_size, x.shape, w.shape[0], RT, SK, U, PIPE)
    else:
        spec = SPEC
        template, grid, tg, oshape, odt, kern, ktemplate = _plan(
            x.dtype, sdt, bits, group_size, x.shape, w.shape[0], R, SK, PF)
    return launch_planned(spec, inputs, template, grid, tg, oshape, odt, kern, ktemplate)[0]


def template_for(x_dtype, s_dtype, bits, group_size, M, MT, K, N, R=None, SK=None, PF=None):
    """The template list a launch would use (for the compile checks)."""
    return _plan(x_dtype, s_dtype, bits, group_size, (MT, K), N, R, SK, PF)[0]


def compile_cases():
    """Compile checks of the tensor-core body (tests/test_metal_compile.py; the float body's
    cases are listed there): each decode kind, one and eight rows, one and two row tiles, one
    to four chunks per lane, register prefetch and asynchronous-copy stages."""
    out = []
    for bits, dt in ((4, mx.float16), (4, mx.bfloat16), (2, mx.bfloat16), (8, mx.float16)):
        for MT, RT, U, PIPE in ((1, 2, 1, 0), (8, 1, 4, 0), (1, 1, 2, 4), (8, 2, 1, 2)):
            t = tc_plan(dt, dt, bits, 64, (MT, 4096), 12288, RT=RT, U=U, PIPE=PIPE)[0]
            name = f"qmv_tc-b{bits}-{dt}-M{MT}-RT{RT}-U{U}-P{PIPE}".replace("mlx.core.", "")
            out.append((name, TC_SPEC, [dt, mx.uint32, dt, dt], [1 << 20] * 4, [dt], t))
    for dt in (mx.float16, mx.bfloat16):
        for gs, RT, PF, MT, P16 in ((64, 1, 1, 1, 0), (32, 2, 0, 1, 0), (128, 1, 2, 1, 0),
                                    (64, 2, 0, 1, 0), (64, 1, 1, 5, 0), (32, 2, 1, 8, 0),
                                    (64, 1, 1, 1, 1), (32, 1, 1, 1, 1), (128, 1, 0, 1, 1)):
            t = fold_plan(dt, dt, gs, (MT, 4096), 12288, RT=RT, PF=PF, P16=P16)[0]
            name = f"qmv_fold-{dt}-g{gs}-RT{RT}-PF{PF}-M{MT}-P{P16}".replace("mlx.core.", "")
            out.append((name, FOLD_SPEC, [dt, mx.uint32, dt, dt, mx.int32], [1 << 20] * 4 + [8],
                        [dt], t))
    return out
