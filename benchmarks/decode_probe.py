"""Where one batch-1 decode step of a quantized model spends its time, path by path.

Builds a model of a preset's shapes with random weights in memory (no checkpoint), prefills a
random prompt, then for each variant (kernel path and fusion switches) measures:
- decode tok/s with the generation loop's pipelining (step n+1 built while n runs);
- host time per step: building the lazy graph (Python + MLX) and, separately, a synchronous
  evaluation of the built graph (MLX's encoding + the GPU);
- with --profile, GPU time per kernel category from CUPTI (PyTorch's profiler traces every CUDA
  kernel of the process, MLX's included), in a subprocess so a tracing failure costs nothing.
Also the host cost of building one quantized-matmul node (ours vs MLX's).

    python benchmarks/decode_probe.py --preset qwen3-8b --json out.json --profile
Variants: builtin (MLX's quantized_matmul everywhere), custom (our kernels forced), auto (the
measured selection), with suffixes -nofuse (separate gate/up), -nofd (no norm / residual /
q-k-norm-RoPE fusions of kernels.fused_linear and kernels.qk_rope), -pf1 (software-pipelined qmv),
-qkv (q/k/v as one launch, patched in here for measurement only), -hN (at most N query heads
per paged-attention threadgroup), -nobake (CUDA launches
through MLX's template path instead of per-template kernel objects), -rN (N rows per simdgroup
at M <= 4), -twN (N times the split-K warp target), -fold / -nofold (the folded tensor-core
decode GEMVs on / off), -p16 / -nop16 (its 16-byte pieces at one row on / off), -layers (with --compiled: one compiled
function per layer boundary even where the caches allow a whole compiled step), -noinplace
(the whole step writes cache rows by slice update, not from the query / rope kernel), -sdpa /
-buffers (a Llama/Qwen3 KVCache attends at decode through MLX's SDPA, compiled per layer
boundary, or through the buffer kernel, whole step),
-collapsed (GLM's sigmoid routers zeroed: every token on the same experts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx

from marlin_mlx.kernels import QuantizedLinear, fused_linear, quantized_linear, qmv


def build(preset: str, bits: int, group_size: int, dtype=mx.bfloat16, layers: int | None = None,
          vocab: int | None = None):
    from marlin_mlx.random_weights import build_lazy_model, quantization_settings, resolve_config

    config = resolve_config(preset)
    if layers:
        config["num_hidden_layers"] = layers
    if vocab:
        config["vocab_size"] = vocab
    quant = quantization_settings(bits, group_size, "affine")
    model = build_lazy_model(config, quant, dtype)
    for layer in model.layers:  # a layer at a time: the float weights never all exist at once
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    model.eval()
    return model, config


# --------------------------------------------------------------------------- fused q/k/v

def _fuse_qkv(model):
    """Give every attention block a `_qkv` QuantizedLinear holding q, k and v stacked."""
    for layer in model.layers:
        a = layer.self_attn
        if hasattr(a, "_qkv") or type(a.q_proj) is not QuantizedLinear:
            continue
        parts = [a.q_proj, a.k_proj, a.v_proj]
        ql = QuantizedLinear(a.q_proj.group_size, 1, False, a.q_proj.group_size, a.q_proj.bits)
        ql.weight = mx.concatenate([p.weight for p in parts])
        ql.scales = mx.concatenate([p.scales for p in parts])
        ql.biases = mx.concatenate([p.biases for p in parts])
        mx.eval(ql.weight, ql.scales, ql.biases)
        object.__setattr__(a, "_qkv", ql)


def _qkv_call(self, x, cache=None):
    from marlin_mlx.models.base import attention

    B, L, _ = x.shape
    nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
    qkv = self._qkv(x)
    q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    q = self.q_norm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
    k = self.k_norm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
    v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    offset = cache.offset if cache is not None else 0
    q, k = self.rope(q, offset), self.rope(k, offset)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    out = attention(q, k, v, self.scale, window=self.window)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


_ORIG_CALL = {}
_P16_DEFAULT = qmv.FOLD_P16
_KV_DECODE_DEFAULT = None  # set on first use: the module's value before any variant


def apply_variant(model, variant: str):
    parts = variant.split("-")
    os.environ["MARLIN_MLX_KERNELS"] = parts[0]
    quantized_linear.FUSE_GATE_UP = "nofuse" not in parts
    fused_linear.ENABLED = "nofd" not in parts  # norm/residual/q-k-rope decode fusions
    from marlin_mlx.kernels import paged_attention
    # hN: at most N query heads per paged-attention threadgroup (GLM's batch-1 MLA decode)
    cap = next((int(x[1:]) for x in parts if x[:1] == "h" and x[1:].isdigit()),
               paged_attention._heads_cap_env())
    if cap != paged_attention.HEADS_CAP:
        paged_attention.HEADS_CAP = cap
        paged_attention._PLANS.clear()
    qmv.PREFETCH = 1 if "pf1" in parts else 0
    # fold / nofold: the folded tensor-core decode GEMVs on or off (else MARLIN_MLX_QMV_FOLD)
    fold = True if "fold" in parts else False if "nofold" in parts else qmv.USE_FOLD
    if fold != qmv.USE_FOLD:
        qmv.USE_FOLD = fold  # None: the default (CUDA only)
        quantized_linear._PATHS.clear()
    # p16 / nop16: the folded body's 16-byte pieces at one row on / off (else the default)
    qmv.FOLD_P16 = 1 if "p16" in parts else 0 if "nop16" in parts else _P16_DEFAULT
    from marlin_mlx.models import base as model_base
    model_base.WHOLE_STEP = "layers" not in parts  # the compiled step's per-layer split
    from marlin_mlx.models import cache as kv_cache
    global _KV_DECODE_DEFAULT
    if _KV_DECODE_DEFAULT is None:
        _KV_DECODE_DEFAULT = kv_cache.KV_DECODE
    kv_cache.IN_PLACE_ROWS = "noinplace" not in parts  # cache rows by slice update
    # sdpa / buffers: how a KVCache attends at decode (else MARLIN_MLX_KV_DECODE's default)
    kv_cache.KV_DECODE = ("sdpa" if "sdpa" in parts else "buffers" if "buffers" in parts
                          else _KV_DECODE_DEFAULT)
    from marlin_mlx.kernels import gated_mlp, launch
    # rN: N rows per simdgroup at M <= 4; twN: N times the default split-K warp target
    r = next((int(x[1:]) for x in parts if x[:1] == "r" and x[1:].isdigit()), 4)
    tw = next((float(x[2:]) for x in parts if x[:2] == "tw"), 1.0)
    knobs = ("nobake" not in parts, r, int(132 * 32 * tw))
    if knobs != (launch.BAKE, qmv.R_DECODE, qmv.TARGET_WARPS):
        launch.BAKE, qmv.R_DECODE, qmv.TARGET_WARPS = knobs
        qmv._PLANS.clear()
        gated_mlp._PLANS.clear()
    _collapse_routing(model, "collapsed" in parts)
    cls = type(model.layers[0].self_attn)
    _ORIG_CALL.setdefault(cls, cls.__call__)
    if "qkv" in parts:
        _fuse_qkv(model)
        cls.__call__ = _qkv_call
    else:
        cls.__call__ = _ORIG_CALL[cls]


_ROUTERS: dict = {}


def _collapse_routing(model, on: bool):
    """-collapsed: the sigmoid routers zeroed, as random-weight models had them before session
    10 (every token on experts 0..k-1, every layer), to see what the routing costs a step."""
    for i, layer in enumerate(model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is None or "e_score_correction_bias" not in gate:
            continue
        orig = _ROUTERS.setdefault(i, gate["weight"])
        gate["weight"] = mx.zeros_like(orig) if on else orig


# --------------------------------------------------------------------------- timing

_LAST_LOGITS = []


def prefill(model, prompt):
    cache = model.make_cache()
    logits = model(prompt[:, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    logits = model(prompt[:, -1:], cache=cache)  # M = 1: the decode path
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y, logits)
    _LAST_LOGITS[:] = [logits.astype(mx.float32)]
    return cache, y


def rel_err(a, b) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


_FORWARD = {}  # model id -> what runs a decode step (the compiled decoder in compile modes)


def step(model, cache, tok):
    logits = _FORWARD.get(id(model), model)(tok[:, None], cache=cache)
    return mx.argmax(logits[:, -1, :], axis=-1)


def decode_tps(model, prompt, steps: int) -> float:
    cache, y = prefill(model, prompt)
    for _ in range(4):  # warm: kernels compiled, selection measured
        y = step(model, cache, y)
        mx.eval(y)
    mx.synchronize()
    t0 = time.perf_counter()
    pipelined_steps(model, cache, y, steps)
    return steps / (time.perf_counter() - t0)


def pipelined_steps(model, cache, y, steps: int):
    """`steps` decode steps as a generation loop runs them (step n + 1 launched before step n
    is read back); returns the last step's token."""
    nxt = step(model, cache, y)
    mx.async_eval(nxt)
    for _ in range(steps - 1):
        y = nxt
        nxt = step(model, cache, y)
        mx.async_eval(nxt)
        y.tolist()
    nxt.tolist()
    return nxt


def host_split(model, prompt, steps: int = 16) -> dict:
    """Per step, unpipelined: graph building alone, then a synchronous eval of that graph."""
    cache, y = prefill(model, prompt)
    y = step(model, cache, y)
    mx.eval(y)
    builds, evals = [], []
    for _ in range(steps):
        mx.synchronize()
        t0 = time.perf_counter()
        y = step(model, cache, y)
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        evals.append(t2 - t1)
    return {"build_ms": 1e3 * statistics.median(builds), "eval_sync_ms": 1e3 * statistics.median(evals)}


def node_host_cost(n: int = 2000) -> dict:
    """µs to build one quantized-matmul graph node (no evaluation): ours vs MLX's."""
    from marlin_mlx.kernels.gated_mlp import gated_mlp_kernel

    K, N = 4096, 4096
    q, s, b = mx.quantize(mx.random.normal((N, K)).astype(mx.bfloat16), group_size=64, bits=4)
    x = mx.random.normal((1, K)).astype(mx.bfloat16)
    mx.eval(q, s, b, x)
    mx.eval(qmv.qmv_kernel(x, q, s, b, 64, 4), gated_mlp_kernel(x, (q, s, b), (q, s, b), 64, 4))
    lin = QuantizedLinear(K, N, False, 64, 4)
    lin.weight, lin.scales, lin.biases = q, s, b
    x3 = x.reshape(1, 1, K)
    mx.eval(lin(x3))
    out = {}
    for name, fn in (
            ("builtin_quantized_matmul", lambda: mx.quantized_matmul(x, q, s, b, True, 64, 4)),
            ("QuantizedLinear_call", lambda: lin(x3)),
            ("qmv_kernel", lambda: qmv.qmv_kernel(x, q, s, b, 64, 4)),
            ("gated_mlp_kernel", lambda: gated_mlp_kernel(x, (q, s, b), (q, s, b), 64, 4)),
            ("elementwise_add", lambda: x + x)):
        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = 1e6 * (time.perf_counter() - t0) / n
    return out


# --------------------------------------------------------------------------- compiled step

def graph_nodes(out) -> dict:
    """Primitive nodes MLX will evaluate for `out` (its unevaluated graph), by primitive."""
    import collections
    import re
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, out)
        names = re.findall(r'label\s*=\s*"([A-Za-z_]+)', f.read())
    return dict(collections.Counter(names).most_common())


def build_us(model, prompt, reps: int = 20, inner: int = 5) -> tuple:
    """Host µs to build one decode step's graph (no evaluation), and that graph's nodes."""
    cache, y = prefill(model, prompt)
    for _ in range(3):
        y = step(model, cache, y)
        mx.eval(y)
    nodes = graph_nodes(step(model, cache, y))
    for c in cache:
        c.trim(1)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = step(model, cache, y)
            for c in cache:
                c.trim(1)
        times.append((time.perf_counter() - t0) / inner)
        mx.eval(out)
    return 1e6 * statistics.median(times), nodes


def compile_probe(model, prompt, steps: int, modes) -> dict:
    """plain (as loaded), qkv (q/k/v fused), compiled (fused + CompiledDecoder): build µs,
    graph nodes, host split, decode tok/s and logits against plain. Fusing is one-way, so the
    modes run in this order."""
    from marlin_mlx.generation import decode_forward

    out, ref = {}, None
    for mode in modes:
        if mode == "plain":
            _FORWARD.pop(id(model), None)
        elif mode == "qkv":
            model.fuse_projections()
            _FORWARD.pop(id(model), None)
        elif mode == "compiled":
            _FORWARD[id(model)] = decode_forward(model, True)
        try:
            tps = decode_tps(model, prompt, steps)
            us, nodes = build_us(model, prompt)
            hs = host_split(model, prompt)
            # the logits of a compiled step (prefill's last token runs the plain model)
            cache, y = prefill(model, prompt)
            mx.eval(step(model, cache, y))
            logits = _FORWARD.get(id(model), model)(y[:, None], cache=cache).astype(mx.float32)
            ref = logits if ref is None else ref
            err = rel_err(logits, ref)
        except Exception as e:  # noqa: BLE001 - report, keep the other modes
            out[mode] = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(f"compile probe {mode}: ERROR {e}", flush=True)
            continue
        out[mode] = {"decode_tps": tps, "build_us": us, "nodes": sum(nodes.values()),
                     "node_kinds": nodes, **hs, "logits_rel_err_vs_first": err}
        print(f"{mode:>10}: {tps:7.1f} tok/s  build {us:7.0f} µs  {sum(nodes.values())} nodes  "
              f"sync eval {hs['eval_sync_ms']:.2f} ms  err {err:.1e}", flush=True)
    _FORWARD.pop(id(model), None)
    return out


# --------------------------------------------------------------------------- GPU profile

CATEGORIES = [("ours: gated gate/up", ("marlin_gated",)), ("ours: qmv", ("marlin_qmv",)),
              ("ours: paged attention", ("marlin_paged",)),
              ("ours: dequantize", ("marlin_dequant",)),
              ("mlx quantized matmul", ("qmv", "qmm", "quantiz", "affine", "gemv_quant")),
              ("attention (sdpa)", ("sdpa", "attention", "flash")),
              ("rms norm", ("rms",)), ("rope", ("rope",)),
              ("copy / slice update", ("copy", "slice", "scatter", "gather", "concat")),
              ("dense matmul", ("gemm", "gemv", "nvjet", "cutlass", "matmul", "xmma")),
              ("argmax / reduce", ("arg", "reduce", "Reduce")),
              ("elementwise / fused", ("binary", "unary", "ternary", "Compiled", "compiled",
                                       "fused", "sigmoid", "multiply", "add"))]


def categorize(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            if cat.startswith("ours: qmv") and "151936" in name:
                return "ours: qmv (lm_head)"
            return cat
    return "other"


def profile(model, prompt, steps: int = 8) -> dict:
    cache, y = prefill(model, prompt)
    for _ in range(3):
        y = step(model, cache, y)
        mx.eval(y)
    mx.synchronize()

    return cupti_profile(lambda: pipelined_steps(model, cache, y, steps), steps)


def cupti_profile(run, steps: int) -> dict:
    """GPU time per kernel category while `run()` executes `steps` steps (CUPTI through
    PyTorch's profiler, which traces every CUDA kernel of the process, MLX's included)."""
    import torch  # noqa: F401
    from torch.profiler import ProfilerActivity, profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        mx.synchronize()
        wall = time.perf_counter() - t0
    kernels, starts, ends = {}, [], []
    for e in prof.events():
        dev = str(getattr(e, "device_type", ""))
        if "CUDA" not in dev:
            continue
        tr = e.time_range
        kernels.setdefault(e.name, [0.0, 0])
        kernels[e.name][0] += tr.end - tr.start  # µs
        kernels[e.name][1] += 1
        starts.append(tr.start)
        ends.append(tr.end)
    cats: dict = {}
    for name, (us, cnt) in kernels.items():
        c = cats.setdefault(categorize(name), [0.0, 0])
        c[0] += us / steps
        c[1] += cnt / steps
    busy = sum(v[0] for v in cats.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
        "gpu_kernel_ms_per_step": busy / 1e3,
        "gpu_span_ms_per_step": (max(ends) - min(starts)) / 1e3 / steps if starts else None,
        "kernels_per_step": sum(v[1] for v in cats.values()),
        "categories_us_per_step": {k: {"us": round(v[0], 1), "launches": round(v[1], 1)}
                                   for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": n[:160], "us_per_step": round(us / steps, 2),
                         "launches_per_step": cnt / steps} for n, (us, cnt) in top],
    }


# --------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-8b")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick checks)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--variants", default="builtin,custom,custom-nofuse,auto,custom-pf1,custom-qkv")
    p.add_argument("--profile", default="", help="comma-separated variants to profile (CUPTI)")
    p.add_argument("--compile-modes", default="",
                   help="after the variants: plain,qkv,compiled (fused q/k/v, compiled step)")
    p.add_argument("--vocab", type=int, default=None, help="smaller vocabulary (CPU checks)")
    p.add_argument("--profile-compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true",
                   help="time the variants through the compiled decode step (as generate runs)")
    p.add_argument("--buffer-sweep", default="",
                   help="MLX_MAX_OPS_PER_BUFFER values to time (subprocesses), e.g. 60,200")
    p.add_argument("--env-sweep", default="",
                   help="environments to time (subprocesses), comma-separated, each "
                        "NAME=VALUE[+NAME=VALUE], e.g. MLX_USE_CUDA_GRAPHS=0")
    p.add_argument("--sweep-variants", default="custom")
    p.add_argument("--nodes", action="store_true",
                   help="also count each variant's graph nodes per step, by primitive")
    p.add_argument("--profile-only", default="", help=argparse.SUPPRESS)
    p.add_argument("--tps-only", default="", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    model, config = build(a.preset, a.bits, a.group_size, getattr(mx, a.dtype), a.layers, a.vocab)
    prompt = mx.random.randint(0, config["vocab_size"], (1, a.prompt)).astype(mx.int32)
    built_s = time.perf_counter() - t0

    if a.profile_only:
        apply_variant(model, a.profile_only)
        if a.profile_compiled:
            from marlin_mlx.generation import decode_forward
            _FORWARD[id(model)] = decode_forward(model, True)
        res = profile(model, prompt)
        print(json.dumps(res))
        return
    if a.tps_only:
        res = {}
        for v in a.tps_only.split(","):
            apply_variant(model, v)
            if a.compiled:
                from marlin_mlx.generation import decode_forward
                model.__dict__.pop("_compiled_decoder", None)
                _FORWARD[id(model)] = decode_forward(model, True)
            res[v] = decode_tps(model, prompt, a.steps)
        print(json.dumps(res))
        return

    report = {"preset": a.preset, "bits": a.bits, "group_size": a.group_size,
              "layers": config["num_hidden_layers"], "prompt": a.prompt, "steps": a.steps,
              "mlx": mx.__version__, "build_s": built_s,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python"] + sys.argv), "variants": {}}
    try:
        report["device"] = mx.device_info().get("device_name")
    except Exception:  # noqa: BLE001
        pass
    if qmv.backend() is not None:
        report["node_host_us"] = node_host_cost()
        print("host µs per graph node:",
              {k: round(v, 2) for k, v in report["node_host_us"].items()}, flush=True)
    ref_logits = None
    if a.compiled:
        from marlin_mlx.generation import decode_forward
        _FORWARD[id(model)] = decode_forward(model, True)
        report["compiled"] = True
    for i, v in enumerate(a.variants.split(",")):
        apply_variant(model, v)
        rep = a.variants.split(",")[:i].count(v)
        key = v if rep == 0 else f"{v}#{rep + 1}"  # a repeated variant keeps every run
        if a.compiled:  # a fresh trace: the compiled step keeps the choices it was traced with
            from marlin_mlx.generation import decode_forward
            model.__dict__.pop("_compiled_decoder", None)
            _FORWARD[id(model)] = decode_forward(model, True)
        try:
            tps = decode_tps(model, prompt, a.steps)
            hs = host_split(model, prompt)
        except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
            report["variants"][key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"{v:>22}: ERROR {e}", flush=True)
            continue
        if ref_logits is None:
            ref_logits = _LAST_LOGITS[0]
        err = rel_err(_LAST_LOGITS[0], ref_logits)  # same prompt: the paths must agree
        report["variants"][key] = {"decode_tps": tps, "ms_per_token": 1e3 / tps, **hs,
                                   "logits_rel_err_vs_first": err}
        if a.nodes:
            _, nodes = build_us(model, prompt, reps=2, inner=1)
            report["variants"][key]["graph_nodes"] = {"total": sum(nodes.values()), **nodes}
            print(f"{v:>22}: {sum(nodes.values())} graph nodes per step: {nodes}", flush=True)
        print(f"{key:>22}: {tps:7.1f} tok/s  {1e3 / tps:6.2f} ms/token  build {hs['build_ms']:.2f} ms"
              f"  sync eval {hs['eval_sync_ms']:.2f} ms  logits err {err:.1e}", flush=True)
    modes = [m for m in a.compile_modes.split(",") if m]
    if modes:
        apply_variant(model, a.variants.split(",")[-1] if a.variants else "auto")
        report["compile_probe"] = compile_probe(model, prompt, a.steps, modes)
    from marlin_mlx.kernels import selection
    report["selection"] = selection.choices()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    base = [sys.executable, __file__, "--preset", a.preset, "--bits", str(a.bits), "--group-size",
            str(a.group_size), "--prompt", str(a.prompt), "--dtype", a.dtype, "--steps", str(a.steps)]
    if a.layers:
        base += ["--layers", str(a.layers)]
    if a.vocab:
        base += ["--vocab", str(a.vocab)]
    sweep = [f"MLX_MAX_OPS_PER_BUFFER={n}" for n in a.buffer_sweep.split(",") if n]
    for spec in sweep + [e for e in a.env_sweep.split(",") if e]:
        env = dict(os.environ, **dict(kv.split("=", 1) for kv in spec.split("+")))
        r = subprocess.run(base + ["--tps-only", a.sweep_variants] + ["--compiled"] * a.compiled,
                           capture_output=True, text=True,
                           timeout=300, env=env)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if r.returncode == 0 and lines else {
            "error": (r.stderr or r.stdout)[-800:]}
        report.setdefault("env_sweep", {})[spec] = res
        print(f"{spec}: {res}", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
    for v in [v for v in a.profile.split(",") if v]:
        extra = []
        if v.endswith("+compiled"):  # the variant's kernels, decoded through the compiled step
            v, extra = v[:-len("+compiled")], ["--profile-compiled"]
        r = subprocess.run(base + ["--profile-only", v] + extra, capture_output=True, text=True,
                           timeout=240)
        v = v + ("+compiled" if extra else "")
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            report.setdefault("profile", {})[v] = {"error": (r.stderr or r.stdout)[-1500:]}
            print(f"profile {v}: failed rc={r.returncode}\n{(r.stderr or '')[-1500:]}", flush=True)
        else:
            res = json.loads(lines[-1])
            report.setdefault("profile", {})[v] = res
            print(f"profile {v}: wall {res['wall_ms_per_step']:.2f} ms/step, GPU kernels "
                  f"{res['gpu_kernel_ms_per_step']:.2f} ms/step, span {res['gpu_span_ms_per_step']}"
                  f", {res['kernels_per_step']:.0f} kernels/step", flush=True)
            for cat, d in res["categories_us_per_step"].items():
                print(f"   {cat:<26} {d['us']:9.1f} µs  {d['launches']:6.1f} launches", flush=True)
            for k in res["top_kernels"][:12]:
                print(f"     {k['us_per_step']:8.1f} µs x{k['launches_per_step']:.0f}  {k['name'][:110]}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
