"""Every kernel's generated Metal source compiles (syntax and template instantiation).

Metal cannot run on Linux, so the full source MLX would hand the Metal compiler (the prelude,
the kernel's helpers, the signature MLX generates, the prologue and body, the explicit
instantiation) is rendered by `launch.render_metal` and compiled with
`g++ -fsyntax-only -x c++ -std=c++17` against tests/metal_shim, a header that declares the
Metal types and functions the kernels use. The same is done for the CUDA rendering with nvcc
when it is on PATH (with MLX's CUDA device headers from `MLX_CUDA_INCLUDE`).
"""

import importlib
import os
import pkgutil
import shutil
import subprocess

import pytest

import mlx.core as mx

import marlin_mlx.kernels
from marlin_mlx.kernels import dequantize, gated_mlp, launch, qmm, qmv

SHIM = os.path.join(os.path.dirname(__file__), "metal_shim")
GXX = shutil.which("g++")

F16, BF16, F32, U32 = mx.float16, mx.bfloat16, mx.float32, mx.uint32


def cases():
    """(id, spec, input dtypes, input sizes, output dtypes, template) for every kernel family."""
    out = []
    for bits in qmv.BITS:
        for dt in (F16, BF16, F32):
            for M in (1, 8):
                t = qmv.template_for(dt, dt, bits, 64, M, M, 4096, 12288)
                out.append((f"qmv-b{bits}-{dt}-M{M}".replace("mlx.core.", ""), qmv.SPEC,
                            [dt, U32, dt, dt], [1 << 20] * 4, [dt], t))
        for dt in (F16, BF16, F32):
            t = dequantize.template_for(dt, bits, 64, 4096, 4096)
            out.append((f"dequant-b{bits}-{dt}".replace("mlx.core.", ""), dequantize.SPEC,
                        [U32, dt, dt], [1 << 20] * 3, [dt], t))
    for bits in (4, 3):  # the software-pipelined variant
        t = qmv.template_for(F16, F16, bits, 64, 4, 4, 4096, 12288, PF=1)
        out.append((f"qmv-b{bits}-float16-M4-PF1", qmv.SPEC, [F16, U32, F16, F16],
                    [1 << 20] * 4, [F16], t))
    for dt in (F16, BF16):
        for bits in (4, 8, 3):
            t = gated_mlp.template_for(dt, dt, bits, 64, 1, 1, 4096, 12288)
            out.append((f"gated-b{bits}-{dt}".replace("mlx.core.", ""), gated_mlp.SPEC,
                        [dt, U32, dt, dt, U32, dt, dt], [1 << 20] * 7, [dt], t))
    return out + module_cases()


def module_cases():
    """Cases declared by the op modules themselves: a module with a `compile_cases()` function
    returns (id, spec, input dtypes, input sizes, output dtypes, template) tuples, so a new op
    family joins the compile check without editing this file."""
    out = []
    for info in pkgutil.iter_modules(marlin_mlx.kernels.__path__):
        mod = importlib.import_module(f"marlin_mlx.kernels.{info.name}")
        if callable(getattr(mod, "compile_cases", None)):
            out.extend(mod.compile_cases())
    return out


CASES = cases()


def _compile_metal(src: str, tmp_path):
    path = tmp_path / "kernel.metal"
    path.write_text('#include "mlx_utils.h"\n' + src)
    return subprocess.run([GXX, "-fsyntax-only", "-x", "c++", "-std=c++17", "-I", SHIM,
                           "-Wno-attributes", "-Wno-unknown-pragmas", str(path)],
                          capture_output=True, text=True)


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_metal_source_compiles(case, tmp_path):
    _, spec, in_dt, in_sizes, out_dt, template = case
    src = launch.render_metal(spec, in_dt, in_sizes, out_dt, template)
    # what Metal needs literally in the body: the attribute names the prologue binds
    assert "thread_index_in_simdgroup" in src and "[[kernel]]" in src
    r = _compile_metal(src, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH")
def test_shim_catches_errors(tmp_path):
    # The check is not vacuous: a body calling an undeclared Metal function fails.
    _, spec, in_dt, in_sizes, out_dt, template = CASES[0]
    src = launch.render_metal(spec, in_dt, in_sizes, out_dt, template)
    r = _compile_metal(src.replace("k_simd_sum(acc", "simd_sum_typo(acc"), tmp_path)
    assert r.returncode != 0 and "simd_sum_typo" in r.stderr


NVCC = shutil.which("nvcc")
MLX_CUDA_INCLUDE = os.environ.get("MLX_CUDA_INCLUDE")


@pytest.mark.skipif(NVCC is None or not MLX_CUDA_INCLUDE,
                    reason="needs nvcc and MLX_CUDA_INCLUDE (MLX source root with mlx/backend/cuda/device)")
@pytest.mark.parametrize("case", CASES[::5], ids=[c[0] for c in CASES[::5]])
def test_cuda_source_compiles(case, tmp_path):
    _, spec, in_dt, _, out_dt, template = case
    path = tmp_path / "kernel.cu"
    path.write_text(launch.render_cuda(spec, in_dt, out_dt, template))
    # sm_90a: what MLX compiles for on an H100/H200 (the warpgroup products need it)
    r = subprocess.run([NVCC, "-arch=sm_90a", "-std=c++17", "-c", "-I", MLX_CUDA_INCLUDE,
                        str(path), "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_compaction_keeps_string_literals():
    # launch._compact drops // comments and collapses runs of spaces (MLX hashes the source on
    # every launch): right only while no string literal holds // or two spaces in a row
    import re
    for name in sorted(os.listdir(launch.SRC_DIR)):
        for lit in re.findall(r'"([^"\n]*)"', launch.read_src(name)):
            assert "//" not in lit and not re.search(r"\s\s", lit), (name, lit)
    header, body = launch.parts(qmm.SPEC, "cuda")
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}" in header
    assert "//" not in header + body and "  " not in header + body
