"""Measured selection between a custom kernel and MLX's built-in path (DESIGN.md).

On first use of an (op, format, shape class) on a GPU backend the custom kernel is checked
against the reference on fresh random data and timed against the built-in path; a kernel that
disagrees is disabled with a warning, and the faster correct path is kept. Choices are cached
in memory and in `<cache dir>/selection.json`, the cache dir being $MARLIN_MLX_CACHE_DIR,
else $XDG_CACHE_HOME/marlin-mlx, else ~/.cache/marlin-mlx. The environment variable
MARLIN_MLX_KERNELS=auto|custom|builtin forces a path (custom still falls back on failure of the
self-test only in auto mode; `custom` skips both the test and the timing).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import mlx.core as mx

from .launch import SRC_DIR, backend

ENV_MODE = "MARLIN_MLX_KERNELS"
MODES = ("auto", "custom", "builtin")
_CHOICES: dict[str, dict] = {}
_LOADED = False


def mode() -> str:
    m = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV_MODE}={m!r}: expected one of {', '.join(MODES)}")
    return m


def cache_dir() -> Path:
    if os.environ.get("MARLIN_MLX_CACHE_DIR"):
        return Path(os.environ["MARLIN_MLX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "marlin-mlx"


@functools.lru_cache(maxsize=None)
def _source_tag() -> str:
    """A hash of the kernel sources: an edited kernel is measured again, not trusted from a
    choice recorded for its earlier version."""
    h = hashlib.sha256()
    for path in sorted(Path(SRC_DIR).glob("*.h")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def _device_tag() -> str:
    try:
        info = mx.device_info()
        name = info.get("device_name") or info.get("architecture") or ""
    except Exception:  # noqa: BLE001 - the tag is informational
        name = ""
    return f"{backend()}|{name}|mlx{mx.__version__}|src{_source_tag()}"


def _load():
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    try:
        with open(cache_dir() / "selection.json", encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            _CHOICES.update({k: v for k, v in data.items() if isinstance(v, dict)})
    except (OSError, ValueError):
        pass


def _save():
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"selection.json.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_CHOICES, f, indent=1, sort_keys=True)
        os.replace(tmp, d / "selection.json")
    except OSError:
        pass  # a read-only home only costs re-measuring next time


# Timing rotates over copies of the inputs until they span more than the GPU's L2 cache, as a
# model's layers do in decode: with one copy a small layer's weights stay in L2 and the timing
# rewards whichever path has the lower launch cost instead of the one that streams faster.
ROTATE_BYTES = 256 << 20
MAX_COPIES = 16


def _input_sets(make_inputs, first: tuple) -> list:
    sets = [first]
    size = max(sum(a.nbytes for a in first), 1)
    while size * len(sets) < ROTATE_BYTES and len(sets) < MAX_COPIES:
        more = make_inputs()
        mx.eval(*more)
        sets.append(more)
    return sets


def _time_pair(fns, sets: list, rounds: int = 7) -> list:
    """Median seconds per call of each function in `fns`, n calls in one graph, cycling through
    `sets` of inputs. The graph is built before the clock starts, as in a decode loop, where
    building the next step overlaps this step's GPU work; the clock covers MLX's encoding and
    the GPU. The functions take turns round by round (after one untimed warm-up round each), so
    a GPU clock still ramping up or a burst of other work on the machine is not charged to
    whichever path happened to be timed first: the H200 once timed our 12288 -> 4096 GEMV at
    71.8 us against MLX's 39.4 us, while in a decode step MLX's kernel took 32 us a launch and
    ours averaged 12 us over the q/k/v, o_proj and down projections (CUPTI)."""
    n = max(16, len(sets))
    ts = [[] for _ in fns]
    for r in range(rounds + 1):
        for i, fn in enumerate(fns):
            outs = [fn(*sets[j % len(sets)]) for j in range(n)]
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval(outs)
            if r:  # round 0 warms up (first launches, clocks)
                ts[i].append((time.perf_counter() - t0) / n)
    return [statistics.median(t) for t in ts]


def rel_err(y, ref) -> float:
    y = y.astype(mx.float32)
    ref = ref.astype(mx.float32)
    den = mx.linalg.norm(ref).item()
    num = mx.linalg.norm(y - ref).item()
    if num != num:  # NaN
        return float("inf")
    return num / max(den, 1e-30)


# A fused decode kernel replaces several MLX launches. Each launch also costs host time in a
# decode step (MLX's graph building and CUDA graph nodes: benchmarks/host_cost.py), which the
# timing of the two paths back to back shows only in part; so a fusion is kept while it times
# within this factor of the ops it replaces. (Seen on the H200: GLM's q_b norm GEMV timed 11.3
# vs 11.2 us and lost; the MLX ops that then ran cost ~10 more launches per layer.)
FUSION_MARGIN = 1.10


def use_custom(op: str, fmt: str, shape_class: str, make_inputs, custom, builtin, reference,
               tol: float, margin: float = 1.0) -> bool:
    """True to run the custom kernel for this (op, format, shape class).

    make_inputs() -> tuple of arrays; custom/builtin/reference(*inputs) -> array.
    `reference` is the oracle (float32 dequantize + matmul); `builtin` is MLX's fast path.
    The custom kernel is chosen when it passes and times at most `margin` x the builtin."""
    m = mode()
    if m != "auto" or backend() is None:
        return m == "custom" and backend() is not None
    key = f"{_device_tag()}|{op}|{fmt}|{shape_class}"
    _load()
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit.get("chosen_path") == "custom"
    rec = measure(op, fmt, make_inputs, custom, builtin, reference, tol, margin)
    _CHOICES[key] = rec
    _save()
    return rec["chosen_path"] == "custom"


def measure(op, fmt, make_inputs, custom, builtin, reference, tol, margin=1.0) -> dict:
    inputs = make_inputs()
    mx.eval(*inputs)
    try:
        err = rel_err(custom(*inputs), reference(*inputs))
    except Exception as e:  # noqa: BLE001 - a kernel that cannot build is disabled, not fatal
        warnings.warn(f"marlin-mlx: custom {op} kernel for {fmt} failed ({e}); "
                      f"using MLX's built-in path", RuntimeWarning, stacklevel=3)
        return {"op": op, "format": fmt, "self_test": "error", "chosen_path": "builtin",
                "detail": f"{type(e).__name__}: {e}"[:300]}
    if not err <= tol:
        warnings.warn(f"marlin-mlx: custom {op} kernel for {fmt} disagrees with the reference "
                      f"(relative error {err:.2e} > {tol:.0e}); using MLX's built-in path",
                      RuntimeWarning, stacklevel=3)
        return {"op": op, "format": fmt, "self_test": "fail", "chosen_path": "builtin",
                "detail": f"rel_err={err:.2e}"}
    sets = _input_sets(make_inputs, inputs)
    t_c, t_b = _time_pair((custom, builtin), sets)
    del sets
    return {"op": op, "format": fmt, "self_test": "pass",
            "chosen_path": "custom" if t_c <= t_b * margin else "builtin",
            "detail": f"rel_err={err:.1e} custom={t_c * 1e6:.1f}us builtin={t_b * 1e6:.1f}us"}


def choices() -> dict:
    _load()
    return dict(_CHOICES)


def clear(memory_only: bool = False):
    """Forget the cached choices (and the cache file unless memory_only)."""
    global _LOADED
    _CHOICES.clear()
    _LOADED = memory_only
    if not memory_only:
        try:
            os.remove(cache_dir() / "selection.json")
        except OSError:
            pass
