"""Run a kernel body on the CPU (tests only): `run(spec, inputs, template, grid, threadgroup,
output_shapes, output_dtypes)` has `launch.launch`'s signature and result.

The body (kernels/src/<op>.h, includes expanded) is compiled with g++ -std=c++20 against
prelude_emu.h as one function per GPU thread; every launch writes its inputs to files, runs the
program and reads the outputs back. Slow (a thread per GPU thread), so for small shapes: it
checks a kernel's logic (indexing, reductions, lane exchanges, tie rules) in CI, where no GPU
runs. Outputs start as zeros, not NaN.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

import mlx.core as mx

from marlin_mlx.kernels import launch

HERE = os.path.dirname(os.path.abspath(__file__))
GXX = shutil.which("g++")
CT = {mx.float32: "float", mx.float16: "f16", mx.bfloat16: "bf16", mx.uint32: "uint32_t",
      mx.int32: "int32_t"}
NP = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32, mx.int32: np.int32,
      mx.bfloat16: np.uint16}
BUILD = os.path.join(tempfile.gettempdir(), "marlin-mlx-kernel-emu")


def available() -> bool:
    """g++ with C++20's <barrier> and _Float16."""
    if GXX is None:
        return False
    os.makedirs(BUILD, exist_ok=True)
    probe = os.path.join(BUILD, "probe.cpp")
    with open(probe, "w") as f:
        f.write("#include <barrier>\nint main(){ std::barrier<> b(1); _Float16 h = 1; b.arrive_and_wait(); return int(float(h)) - 1; }\n")
    r = subprocess.run([GXX, "-std=c++20", "-pthread", probe, "-o", probe + ".out"], capture_output=True)
    return r.returncode == 0


def _raw(a) -> bytes:
    a = mx.contiguous(a)
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


def source(spec, input_dtypes, template, nthreads, ngx, ngy, output_shapes, output_dtypes) -> str:
    text = "".join(launch.read_src(line.split()[2]) + "\n" if line.startswith(launch.INCLUDE_MARK)
                   else line for line in launch.read_src(spec.src).splitlines(keepends=True))
    helpers, body = text.split(launch.BODY_MARK, 1)
    out = ['#include "prelude_emu.h"\n#include <cstdio>\n', helpers,
           "\nstd::barrier<>* g_bar; float g_xf[1024]; uint32_t g_xu[1024]; thread_local uint32_t t_tid;\n"]
    for n, v in template:
        if isinstance(v, bool):
            out.append(f"constexpr bool {n} = {'true' if v else 'false'};\n")
        elif isinstance(v, int):
            out.append(f"constexpr int {n} = {v};\n")
        else:
            out.append(f"using {n} = {CT[v]};\n")
    params = [f"const {CT[d]}* {n}" for n, d in zip(spec.inputs, input_dtypes)]
    params += [f"{CT[d]}* {n}" for n, d in zip(spec.outputs, output_dtypes)]
    out.append("void kern(" + ", ".join(params) + ", uint32_t tg_x, uint32_t tg_y, uint32_t tid_) {\n"
               f"  const uint32_t tid = tid_, lane = tid_ & 31u, simd_id = tid_ >> 5, gid = tg_x * {nthreads} + tid_;\n"
               "  (void)tid; (void)gid; t_tid = tid_;\n" + body + "\n}\n")
    out.append("static std::vector<char> rd(const char* p) { FILE* f = fopen(p, \"rb\"); std::vector<char> b; "
               "char c[65536]; size_t n; while ((n = fread(c, 1, sizeof c, f)) > 0) b.insert(b.end(), c, c + n); "
               "fclose(f); return b; }\nint main(int argc, char** argv) {\n")
    ni = len(input_dtypes)
    for i in range(ni):
        out.append(f"  auto in{i} = rd(argv[{i + 1}]);\n")
    for i, (sh, d) in enumerate(zip(output_shapes, output_dtypes)):
        out.append(f"  std::vector<{CT[d]}> out{i}({int(np.prod(sh))});\n")
    args = [f"(const {CT[d]}*)in{i}.data()" for i, d in enumerate(input_dtypes)]
    args += [f"out{i}.data()" for i in range(len(output_shapes))]
    out.append(f"  std::barrier<> bar({nthreads}); g_bar = &bar;\n"
               f"  for (uint32_t gy = 0; gy < {ngy}; ++gy) for (uint32_t gx = 0; gx < {ngx}; ++gx) {{\n"
               f"    std::vector<std::thread> th;\n    for (uint32_t t = 0; t < {nthreads}; ++t)\n"
               f"      th.emplace_back([&, t] {{ kern({', '.join(args)}, gx, gy, t); }});\n"
               "    for (auto& x : th) x.join();\n  }\n")
    for i in range(len(output_shapes)):
        out.append(f"  {{ FILE* f = fopen(argv[{ni + 1 + i}], \"wb\"); "
                   f"fwrite(out{i}.data(), sizeof(out{i}[0]), out{i}.size(), f); fclose(f); }}\n")
    out.append("  return 0;\n}\n")
    return "".join(out)


def run(spec, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
    nthreads = threadgroup[0]
    if threadgroup[1:] != (1, 1) or grid[2] != 1 or grid[0] % nthreads:
        raise ValueError("the emulator takes 1-D threadgroups and 2-D grids")
    code = source(spec, [a.dtype for a in inputs], template, nthreads, grid[0] // nthreads,
                  grid[1], output_shapes, output_dtypes)
    os.makedirs(BUILD, exist_ok=True)
    exe = os.path.join(BUILD, "k_" + hashlib.sha1(code.encode()).hexdigest()[:16])
    if not os.path.exists(exe):
        with open(exe + ".cpp", "w") as f:
            f.write(code)
        r = subprocess.run([GXX, "-O1", "-std=c++20", "-pthread", "-I", HERE, exe + ".cpp",
                            "-o", exe + ".tmp"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{spec.name}: g++ failed:\n{r.stderr[-3000:]}")
        os.replace(exe + ".tmp", exe)
    with tempfile.TemporaryDirectory(dir=BUILD) as d:
        ins = [os.path.join(d, f"in{i}") for i in range(len(inputs))]
        outs = [os.path.join(d, f"out{i}") for i in range(len(output_shapes))]
        for p, a in zip(ins, inputs):
            with open(p, "wb") as f:
                f.write(_raw(a))
        subprocess.run([exe, *ins, *outs], check=True)
        res = []
        for p, sh, dt in zip(outs, output_shapes, output_dtypes):
            a = mx.array(np.fromfile(p, dtype=NP[dt]).reshape(sh))
            res.append(a.view(mx.bfloat16) if dt == mx.bfloat16 else a)
    return res
