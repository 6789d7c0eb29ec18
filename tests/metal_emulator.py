"""Run custom kernels on the CPU: their Metal rendering compiled by g++ against
tests/metal_emu/emu.h (one std::thread per GPU thread), for CI machines without a GPU.

`emulate(launches, tmp_path)` takes a list of launches, each a dict with `spec`, `inputs`
(mx arrays, or ("out", i, j) for output j of launch i), `template`, `grid`, `threadgroup`
(x threads, 1, 1), `output_shapes`, `output_dtypes`, and returns the outputs of the last
launch as mx arrays. Outputs start NaN-filled (floats) so unwritten elements show. Keep the
grids small: every threadgroup starts its threads afresh.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np

import mlx.core as mx

from marlin_mlx.kernels import launch

EMU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metal_emu")
GXX = shutil.which("g++")

_NP = {mx.float32: np.float32, mx.float16: np.uint16, mx.bfloat16: np.uint16,
       mx.int32: np.int32, mx.uint32: np.uint32, mx.uint8: np.uint8}

_DRIVER = r"""
#undef thread
#undef threadgroup
#include <cstdio>
std::barrier<>* metal::g_bar; std::barrier<>* metal::g_sbar[32]; float metal::g_simd[32][32];
thread_local int metal::t_lane, metal::t_sid;
template <typename F> void run_grid(F f, int gx, int gy, int nt) {
  metal::g_bar = new std::barrier<>(nt);
  for (int s = 0; s < nt / 32; ++s) metal::g_sbar[s] = new std::barrier<>(32);
  for (int y = 0; y < gy; ++y) for (int x = 0; x < gx; ++x) {
    std::vector<std::thread> ts;
    for (int t = 0; t < nt; ++t) ts.emplace_back([=] {
      metal::t_lane = t % 32; metal::t_sid = t / 32;
      f(uint(t / 32), uint(t % 32), uint3{uint(x * nt + t), uint(y), 0}, uint3{uint(t), 0, 0},
        uint3{uint(x), uint(y), 0}); });
    for (auto& th : ts) th.join();
  }
}
template <typename T> T* load(const char* p, size_t n) {
  T* a = new T[n ? n : 1]; FILE* f = fopen(p, "rb"); if (fread(a, sizeof(T), n, f) != n) return nullptr;
  fclose(f); return a; }
template <typename T> void save(const char* p, const T* a, size_t n) {
  FILE* f = fopen(p, "wb"); fwrite(a, sizeof(T), n, f); fclose(f); }
"""


def _to_np(a: mx.array) -> np.ndarray:
    if a.dtype in (mx.float16, mx.bfloat16):
        return np.array(a.view(mx.uint16))
    return np.array(a)


def _from_np(raw: np.ndarray, dtype, shape) -> mx.array:
    a = mx.array(raw)
    if dtype in (mx.float16, mx.bfloat16):
        a = a.view(dtype)
    return a.reshape(shape)


def emulate(launches, tmp_path):
    tmp = str(tmp_path)
    src = ['#include "emu.h"\n']
    main = ["int main() {\n"]
    bufs = {}  # python key -> C variable
    for i, ln in enumerate(launches):
        spec, template = ln["spec"], ln["template"]
        names = []
        for j, a in enumerate(ln["inputs"]):
            if isinstance(a, tuple):
                names.append(bufs[a])
                continue
            path = os.path.join(tmp, f"in{i}_{j}.bin")
            _to_np(a).tofile(path)
            var = f"a{i}_{j}"
            main.append(f'  auto* {var} = load<{launch.METAL_TYPES[a.dtype]}>("{path}", {a.size});\n')
            names.append(var)
        in_dtypes = [launches[a[1]]["output_dtypes"][a[2]] if isinstance(a, tuple) else a.dtype
                     for a in ln["inputs"]]
        ksrc = launch.render_metal(spec, in_dtypes, [1 << 20] * len(in_dtypes),
                                   ln["output_dtypes"], template)
        kname = re.search(r"void (custom_kernel_\w+)\(", ksrc).group(1)
        src.append(f"namespace k{i} {{\n{ksrc}\n}}\n")
        for j, (shape, dt) in enumerate(zip(ln["output_shapes"], ln["output_dtypes"])):
            n = int(np.prod(shape))
            var = f"o{i}_{j}"
            ct = launch.METAL_TYPES[dt]
            fill = "NAN" if dt in (mx.float32, mx.float16, mx.bfloat16) else "0"
            main.append(f"  auto* {var} = new {ct}[{n}]; for (size_t i = 0; i < {n}; ++i) "
                        f"{var}[i] = {ct}({fill});\n")
            bufs[("out", i, j)] = var
            names.append(var)
        targs = ", ".join(launch._template_value(v, launch.METAL_TYPES) for _, v in template)
        call = f"k{i}::{kname}<{targs}>" if template else f"k{i}::{kname}"
        nt = ln["threadgroup"][0]
        gx, gy = ln["grid"][0] // nt, ln["grid"][1]
        main.append(f"  run_grid([&](uint a, uint b, uint3 c, uint3 d, uint3 e) {{ "
                    f"{call}({', '.join(names)}, a, b, c, d, e); }}, {gx}, {gy}, {nt});\n")
    last = len(launches) - 1
    outs = []
    for j, (shape, dt) in enumerate(zip(launches[-1]["output_shapes"],
                                        launches[-1]["output_dtypes"])):
        path = os.path.join(tmp, f"out{j}.bin")
        main.append(f'  save("{path}", o{last}_{j}, {int(np.prod(shape))});\n')
        outs.append((path, shape, dt))
    main.append("  return 0;\n}\n")
    cpp = os.path.join(tmp, "kernels.cpp")
    with open(cpp, "w") as f:
        f.write("".join(src) + _DRIVER + "".join(main))
    exe = os.path.join(tmp, "kernels")
    r = subprocess.run([GXX, "-std=c++20", "-O1", "-w", "-I", EMU_DIR, cpp, "-o", exe,
                        "-lpthread"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    subprocess.run([exe], check=True, timeout=300)
    return [_from_np(np.fromfile(p, dtype=_NP[dt]), dt, shape) for p, shape, dt in outs]
