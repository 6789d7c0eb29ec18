"""Run custom kernels on the CPU, for CI machines without a GPU: the kernel's Metal rendering
(launch.render_metal, the source a Mac would compile, prelude_metal.h included) compiled by g++
against tests/metal_emu/emu.h, with one std::thread per GPU thread.

Two entry points:
- `emulate(launches, tmp_path=None)`: a chain of launches, each a dict with `spec`, `inputs` (mx
  arrays, or ("out", i, j) for output j of launch i), `template`, `grid`, `threadgroup` (x
  threads, 1, 1), `output_shapes`, `output_dtypes` and optionally `init_value`; returns the last
  launch's outputs as mx arrays, then (its optional `written`: input indices) the contents of
  the inputs that launch writes in place.
- `run(spec, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None)`:
  one launch with `launch.launch`'s signature and result, so a test can monkeypatch a kernel
  module's `launch` with it and run the module's own planning code.

Outputs without an init_value start poisoned (floats NaN, integers all ones) so an element the
kernel fails to write shows. Compiled programs are cached per source hash under the temp dir
(inputs and outputs travel as files named on the command line). Keep the grids small: every
threadgroup starts its threads afresh.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

import mlx.core as mx

from marlin_mlx.kernels import launch

EMU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metal_emu")
GXX = shutil.which("g++")
BUILD = os.path.join(tempfile.gettempdir(), "marlin-mlx-metal-emu")

_NP = {mx.float32: np.float32, mx.float16: np.uint16, mx.bfloat16: np.uint16,
       mx.int32: np.int32, mx.uint32: np.uint32, mx.uint8: np.uint8}
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_DRIVER = r"""
#undef thread
#undef threadgroup
#include <cstdio>
#include <cstdlib>
#include <algorithm>
std::barrier<>* metal::g_bar; std::barrier<>* metal::g_sbar[32]; float metal::g_simd[32][32];
thread_local int metal::t_lane, metal::t_sid;
template <typename F> void run_grid(F f, int gx, int gy, int nt) {
  metal::g_bar = new std::barrier<>(nt);
  for (int s = 0; s * 32 < nt; ++s)  // a last partial simdgroup waits for its own threads
    metal::g_sbar[s] = new std::barrier<>(std::min(32, nt - s * 32));
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
  T* a = new T[n ? n : 1]; FILE* f = fopen(p, "rb");
  if (!f || fread(a, sizeof(T), n, f) != n) { fprintf(stderr, "cannot read %s\n", p); exit(2); }
  fclose(f); return a; }
template <typename T> void save(const char* p, const T* a, size_t n) {
  FILE* f = fopen(p, "wb"); fwrite(a, sizeof(T), n, f); fclose(f); }
"""


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """g++ with C++20's <barrier> and _Float16 (what emu.h needs)."""
    if GXX is None:
        return False
    os.makedirs(BUILD, exist_ok=True)
    probe = os.path.join(BUILD, "probe.cpp")
    if os.path.exists(probe + ".out"):  # built before: the probe costs a g++ run per session
        return True
    with open(probe, "w") as f:
        f.write("#include <barrier>\nint main(){ std::barrier<> b(1); _Float16 h = 1; "
                "b.arrive_and_wait(); return int(float(h)) - 1; }\n")
    r = subprocess.run([GXX, "-std=c++20", "-pthread", probe, "-o", probe + ".out"],
                       capture_output=True)
    return r.returncode == 0


def _to_np(a: mx.array) -> np.ndarray:
    a = mx.contiguous(a)
    if a.dtype in (mx.float16, mx.bfloat16):
        return np.array(a.view(mx.uint16))
    return np.array(a)


def _from_np(raw: np.ndarray, dtype, shape) -> mx.array:
    a = mx.array(raw)
    if dtype in (mx.float16, mx.bfloat16):
        a = a.view(dtype)
    return a.reshape(shape)


def _fill(dt, init_value) -> str:
    if init_value is not None:
        return repr(float(init_value)) + "f" if dt in _FLOATS else str(int(init_value))
    return "NAN" if dt in _FLOATS else "-1"


def _program(launches):
    """(C++ source, [(path index, launch i, input j, array)], [(shape, dtype)] of the outputs).
    File paths are argv entries, so the source (and the cached binary) depends only on the
    kernels, dtypes and launch geometry."""
    src = ['#include "emu.h"\n']
    main = ["int main(int argc, char** argv) {\n"]
    bufs, sizes, files = {}, {}, []  # ("out", i, j) -> C variable / element count
    for i, ln in enumerate(launches):
        spec, template = ln["spec"], ln["template"]
        nt = ln["threadgroup"][0]
        grid = tuple(ln["grid"]) + (1,) * (3 - len(ln["grid"]))
        if tuple(ln["threadgroup"][1:]) not in ((), (1,), (1, 1)) or grid[2] != 1 or grid[0] % nt:
            raise ValueError(f"{spec.name}: the emulator takes 1-D threadgroups "
                             "dividing a 2-D grid")
        if nt > 1024:
            raise ValueError(f"{spec.name}: threadgroup of {nt} > 1024 threads")
        names, in_dtypes, in_sizes, loaded = [], [], [], {}
        for j, a in enumerate(ln["inputs"]):
            if isinstance(a, tuple):
                names.append(bufs[a])
                in_dtypes.append(launches[a[1]]["output_dtypes"][a[2]])
                in_sizes.append(sizes[a])
                continue
            var = f"a{i}_{j}"
            main.append(f"  auto* {var} = load<{launch.METAL_TYPES[a.dtype]}>"
                        f"(argv[{len(files) + 1}], {a.size});\n")
            files.append(a)
            loaded[j] = (var, a)
            names.append(var)
            in_dtypes.append(a.dtype)
            in_sizes.append(a.size)
        # launch.launch pads tiny inputs so that every input arrives as a `device` pointer
        ksrc = launch.render_metal(spec, in_dtypes,
                                   [max(n, launch.METAL_CONSTANT_LIMIT) for n in in_sizes],
                                   ln["output_dtypes"], template)
        kname = re.search(r"void (custom_kernel_\w+)\(", ksrc).group(1)
        src.append(f"namespace k{i} {{\n{ksrc}\n}}\n")
        for j, (shape, dt) in enumerate(zip(ln["output_shapes"], ln["output_dtypes"])):
            n = int(np.prod(shape))
            var, ct = f"o{i}_{j}", launch.METAL_TYPES[dt]
            main.append(f"  auto* {var} = new {ct}[{max(n, 1)}]; for (size_t i = 0; i < {n}; ++i) "
                        f"{var}[i] = {ct}({_fill(dt, ln.get('init_value'))});\n")
            bufs[("out", i, j)], sizes[("out", i, j)] = var, n
            names.append(var)
        targs = ", ".join(launch._template_value(v, launch.METAL_TYPES) for _, v in template)
        call = f"k{i}::{kname}<{targs}>" if template else f"k{i}::{kname}"
        main.append(f"  run_grid([&](uint a, uint b, uint3 c, uint3 d, uint3 e) {{ "
                    f"{call}({', '.join(names)}, a, b, c, d, e); }}, "
                    f"{grid[0] // nt}, {grid[1]}, {nt});\n")
    last = launches[-1]
    outs = list(zip(last["output_shapes"], last["output_dtypes"]))
    saved = [f"o{len(launches) - 1}_{j}" for j in range(len(outs))]
    for j in last.get("written", ()):  # inputs a kernel writes in place, returned after outputs
        var, a = loaded[j]
        outs.append((a.shape, a.dtype))
        saved.append(var)
    for j, (var, (shape, _)) in enumerate(zip(saved, outs)):
        main.append(f"  save(argv[{len(files) + 1 + j}], {var}, {int(np.prod(shape))});\n")
    main.append("  return 0;\n}\n")
    return "".join(src) + _DRIVER + "".join(main), files, outs


def _binary(code: str, what: str) -> str:
    """The compiled program for this source, built once per source hash."""
    os.makedirs(BUILD, exist_ok=True)
    exe = os.path.join(BUILD, "k_" + hashlib.sha1(code.encode()).hexdigest()[:20])
    if not os.path.exists(exe):
        cpp = f"{exe}.{os.getpid()}.cpp"
        with open(cpp, "w") as f:
            f.write(code)
        r = subprocess.run([GXX, "-std=c++20", "-O1", "-w", "-I", EMU_DIR, cpp, "-o",
                            f"{exe}.{os.getpid()}.tmp", "-pthread"], capture_output=True,
                           text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"{what}: g++ failed ({cpp}):\n{r.stderr[-3000:]}")
        os.replace(f"{exe}.{os.getpid()}.tmp", exe)  # atomic: parallel runs may share the cache
        os.remove(cpp)
    return exe


def emulate(launches, tmp_path=None):
    if GXX is None:
        raise RuntimeError("the kernel emulator needs g++ on PATH")
    code, files, outs = _program(launches)
    exe = _binary(code, "+".join(ln["spec"].name for ln in launches))
    os.makedirs(BUILD, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(tmp_path) if tmp_path else BUILD) as d:
        ins = [os.path.join(d, f"in{k}.bin") for k in range(len(files))]
        paths = [os.path.join(d, f"out{j}.bin") for j in range(len(outs))]
        for p, a in zip(ins, files):
            _to_np(a).tofile(p)
        subprocess.run([exe, *ins, *paths], check=True, timeout=300)
        return [_from_np(np.fromfile(p, dtype=_NP[dt]), dt, shape)
                for p, (shape, dt) in zip(paths, outs)]


def run(spec, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
    """One launch, with launch.launch's signature and result."""
    return emulate([dict(spec=spec, inputs=list(inputs), template=template, grid=grid,
                         threadgroup=threadgroup, output_shapes=output_shapes,
                         output_dtypes=output_dtypes, init_value=init_value)])
