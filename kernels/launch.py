"""Backend machinery: one kernel body, launched through Metal or CUDA.

Each body lives in `kernels/src/<op>.h`: helper code above a `//// BODY` line, the kernel's
function body below it. A launch prepends the backend's prelude (`prelude_metal.h` or
`prelude_cuda.h`) to the helpers as the kernel header, and the backend's prologue, which binds
the portable names `tid`, `lane`, `simd_id`, `tg_x`, `tg_y` and `gid`, to the body. Metal needs
its attribute names (`thread_index_in_simdgroup`, ...) literally in the source it is given; the
prologue is where they appear.

`render_metal` / `render_cuda` rebuild the full source MLX would compile (its generated
signature included), so the Metal rendering can be syntax-checked on Linux and the CUDA one
compiled by nvcc without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import mlx.core as mx

SRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
BODY_MARK = "//// BODY"
INCLUDE_MARK = "//// INCLUDE"  # `//// INCLUDE file.h` pastes a shared helper file

PROLOGUE = {
    "metal": (
        "  const uint32_t tid = thread_position_in_threadgroup.x;\n"
        "  const uint32_t lane = thread_index_in_simdgroup;\n"
        "  const uint32_t simd_id = simdgroup_index_in_threadgroup;\n"
        "  const uint32_t tg_x = threadgroup_position_in_grid.x;\n"
        "  const uint32_t tg_y = threadgroup_position_in_grid.y;\n"
        "  const uint32_t gid = thread_position_in_grid.x;\n"
        "  (void)tid; (void)lane; (void)simd_id; (void)tg_x; (void)tg_y; (void)gid;\n"
    ),
    "cuda": (
        "  const uint32_t tid = threadIdx.x;\n"
        "  const uint32_t lane = threadIdx.x & 31u;\n"
        "  const uint32_t simd_id = threadIdx.x >> 5;\n"
        "  const uint32_t tg_x = blockIdx.x;\n"
        "  const uint32_t tg_y = blockIdx.y;\n"
        "  const uint32_t gid = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  (void)tid; (void)lane; (void)simd_id; (void)tg_x; (void)tg_y; (void)gid;\n"
    ),
}

# MLX's type names in generated signatures (get_type_string / dtype_to_cuda_type).
METAL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
               mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint8: "uint8_t"}
CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
              mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint8: "uint8_t"}
# Metal passes inputs of fewer elements than this in the `constant` address space.
METAL_CONSTANT_LIMIT = 8
# Tests set this to True: outputs are filled with NaN before every launch, so an element the
# kernel fails to write shows up.
POISON_OUTPUTS = False


@dataclass(frozen=True)
class KernelSpec:
    name: str              # kernel name (MLX prefixes `custom_kernel_`)
    src: str               # file under kernels/src, e.g. "qmv.h"
    inputs: tuple
    outputs: tuple
    shared_memory: int = 0  # CUDA: dynamic shared memory bytes of every launch (0: none)


def backend() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU with that backend, else None."""
    if mx.default_device() != mx.gpu:
        return None
    return _gpu_backend()


@functools.lru_cache(maxsize=None)
def _gpu_backend() -> str | None:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


@functools.lru_cache(maxsize=None)
def read_src(name: str) -> str:
    with open(os.path.join(SRC_DIR, name), encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def parts(spec: KernelSpec, be: str) -> tuple[str, str]:
    """(header, source) handed to mx.fast.<be>_kernel."""
    text = _expand(spec.src)
    if BODY_MARK not in text:
        raise ValueError(f"{spec.src}: no '{BODY_MARK}' line")
    helpers, body = text.split(BODY_MARK, 1)
    header = read_src(f"prelude_{be}.h") + "\n" + helpers
    return _compact(header), _compact(PROLOGUE[be] + body)


def _expand(name: str) -> str:
    """A source file with its `//// INCLUDE` lines replaced by the files they name (nested)."""
    return "".join(_expand(line.split()[2]) + "\n" if line.startswith(INCLUDE_MARK) else line
                   for line in read_src(name).splitlines(keepends=True))


def _compact(src: str) -> str:
    """Drop comments, blank lines, indentation and runs of spaces: MLX's CUDA backend hashes
    the whole source string on every launch (to find its compiled module), so its length is
    per-call host time (~1.9 µs for 13 KB on an EPYC core). The sources' only string literals
    (inline PTX, _Pragma) hold neither // nor runs of spaces (tests/test_metal_compile.py)."""
    out = []
    for line in src.splitlines():
        code = " ".join(line.split("//", 1)[0].split())
        if code:
            out.append(code)
    return "\n".join(out) + "\n"


_KERNELS: dict = {}


def kernel_object(spec: KernelSpec, be: str):
    """The MLX kernel object, built once per process (compilation happens per template)."""
    kern = _KERNELS.get((spec, be))
    if kern is None:
        header, source = parts(spec, be)
        extra = {"shared_memory": spec.shared_memory} if be == "cuda" and spec.shared_memory else {}
        make = mx.fast.metal_kernel if be == "metal" else mx.fast.cuda_kernel
        kern = _KERNELS[(spec, be)] = make(
            name=spec.name, input_names=list(spec.inputs), output_names=list(spec.outputs),
            source=source, header=header, ensure_row_contiguous=True, **extra)
    return kern


def launch(spec: KernelSpec, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
           init_value=None):
    be = backend()
    if be is None:
        raise RuntimeError(f"{spec.name}: no GPU backend (Metal or CUDA) on this device")
    if be == "metal":
        # Tiny inputs would arrive in the `constant` address space, which the bodies'
        # `device` pointer casts do not accept; the kernels index by template constants, so
        # padding changes nothing they read.
        inputs = [a if a.size >= METAL_CONSTANT_LIMIT else
                  mx.concatenate([a.reshape(-1), mx.zeros((METAL_CONSTANT_LIMIT,), a.dtype)])
                  for a in inputs]
    kern = _KERNELS.get((spec, be)) or kernel_object(spec, be)
    if POISON_OUTPUTS and init_value is None:
        init_value = float("nan")
    return kern(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                output_shapes=output_shapes, output_dtypes=output_dtypes, init_value=init_value)


_ROWS: dict = {}


def rows_input(MT: int) -> mx.array:
    """A kernel's run-time row count (qmm, the folded GEMV): one int32 array per value, built
    once (8 entries, so that Metal passes it in the `device` address space like the other
    inputs). The template then holds a bound on the rows, and batches of different sizes share
    a compiled kernel."""
    a = _ROWS.get(MT)
    if a is None:
        a = _ROWS[MT] = mx.full((8,), MT, mx.int32)
        mx.eval(a)
    return a


def launch_planned(spec: KernelSpec, inputs, template, grid, threadgroup, output_shapes,
                   output_dtypes, kern, ktemplate):
    """A launch from a cached plan: on CUDA the plan's kernel object (`cuda_plan_kernel`) is
    called directly with its baked template; otherwise (Metal, or no kernel object) `launch`."""
    if kern is not None:
        return kern(inputs=inputs, template=ktemplate, grid=grid, threadgroup=threadgroup,
                    output_shapes=output_shapes, output_dtypes=output_dtypes,
                    init_value=float("nan") if POISON_OUTPUTS else None)
    return launch(spec, inputs, template, grid, threadgroup, output_shapes, output_dtypes)


def _template_value(v, types) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return types[v]


def render_metal(spec: KernelSpec, input_dtypes, input_sizes, output_dtypes, template) -> str:
    """The full Metal source MLX 0.32 compiles for this launch (after its own `metal::utils()`
    preamble, which the shim header stands in for): header, templated signature, body and the
    explicit instantiation."""
    header, source = parts(spec, "metal")
    kname = "custom_kernel_" + spec.name
    out = [header]
    if template:
        kinds = ["typename" if not isinstance(v, (bool, int)) else
                 ("bool" if isinstance(v, bool) else "int") for _, v in template]
        out.append("template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n")
        kname += "_" + "_".join(_template_value(v, METAL_TYPES) for _, v in template)
    attrs = []
    metal_attrs = [("simdgroup_index_in_threadgroup", "uint"),
                   ("thread_index_in_simdgroup", "uint"),
                   ("thread_position_in_grid", "uint3"),
                   ("thread_position_in_threadgroup", "uint3"),
                   ("threadgroup_position_in_grid", "uint3")]
    for attr, ty in metal_attrs:
        if attr in source:
            attrs.append(f"  {ty} {attr} [[{attr}]]")
    params = []
    idx = 0
    for name, dt, size in zip(spec.inputs, input_dtypes, input_sizes):
        space = "constant" if size < METAL_CONSTANT_LIMIT else "device"
        params.append(f"  const {space} {METAL_TYPES[dt]}* {name} [[buffer({idx})]]")
        idx += 1
    for name, dt in zip(spec.outputs, output_dtypes):
        params.append(f"  device {METAL_TYPES[dt]}* {name} [[buffer({idx})]]")
        idx += 1
    out.append(f"[[kernel]] void {kname}(\n" + ",\n".join(params + attrs) + ") {\n")
    out.append(source + "\n}\n")
    if template:
        targs = "<" + ", ".join(_template_value(v, METAL_TYPES) for _, v in template) + ">"
        out.append(f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({kname}{targs}) '
                   f"{kname}{targs};\n")
    return "".join(out)


def cuda_constants(template) -> str:
    """The lines MLX's CUDA backend writes at the top of a templated kernel body."""
    out = []
    for n, v in template:
        if isinstance(v, bool):
            out.append(f"  constexpr bool {n} = {_template_value(v, CUDA_TYPES)};\n")
        elif isinstance(v, int):
            out.append(f"  constexpr int {n} = {v};\n")
        else:
            out.append(f"  using {n} = {CUDA_TYPES[v]};\n")
    return "".join(out)


def render_cuda(spec: KernelSpec, input_dtypes, output_dtypes, template) -> str:
    """The full CUDA source MLX 0.32 hands NVRTC for this launch."""
    header, source = parts(spec, "cuda")
    kname = "custom_kernel_" + spec.name + "".join(
        "_" + _template_value(v, CUDA_TYPES) for _, v in template)
    out = ['#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n',
           header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
           f"__global__ void {kname}(\n"]
    params = [f"    const {CUDA_TYPES[dt]}* {n}" for n, dt in zip(spec.inputs, input_dtypes)]
    params += [f"    {CUDA_TYPES[dt]}* {n}" for n, dt in zip(spec.outputs, output_dtypes)]
    out.append(",\n".join(params) + ") {\n")
    out.append(cuda_constants(template))
    out.append("\n" + source + "\n}\n\n} // namespace mlx::core::cu\n")
    return "".join(out)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def prod(shape) -> int:
    return math.prod(shape) if shape else 1


# On CUDA, MLX writes template constants as `constexpr` / `using` lines at the top of the kernel
# body, and it converts and formats the template on every call. A kernel object per template
# with those lines already in its source compiles to the same code and skips that per-call work
# (host time at decode: one launch per linear layer per token). MARLIN_MLX_BAKE=0 turns it off.
BAKE = os.environ.get("MARLIN_MLX_BAKE", "1").strip() != "0"
_BAKED: dict = {}


def baked_cuda_source(spec: KernelSpec, template) -> tuple[str, str, str]:
    """(name, header, source) of the CUDA kernel object with the template's constants written
    into the source: the same lines MLX writes at the top of a templated body."""
    header, source = parts(spec, "cuda")
    name = spec.name + "".join("_" + _template_value(v, CUDA_TYPES) for _, v in template)
    return name, header, cuda_constants(template) + "\n" + source


def cuda_plan_kernel(spec: KernelSpec, template):
    """(kernel object, template argument) for CUDA launches of a cached plan."""
    if not BAKE:
        return kernel_object(spec, "cuda"), template
    key = (spec, tuple(template))
    kern = _BAKED.get(key)
    if kern is None:
        name, header, source = baked_cuda_source(spec, template)
        kern = _BAKED[key] = mx.fast.cuda_kernel(
            name=name, input_names=list(spec.inputs), output_names=list(spec.outputs),
            source=source, header=header, ensure_row_contiguous=True,
            shared_memory=spec.shared_memory)
    return kern, None
