"""Collect benchmarks/results/*.json into benchmarks/RESULTS.md tables and PNG plots.

Understands the JSON written by `marlin-mlx bench`, `marlin-mlx memory`, `marlin-mlx perplexity`,
benchmarks/kernels.py ({"meta", "rows"}) and benchmarks/cpu_decode.py; any other JSON object is
shown by its short top-level fields and a table of its `results` records. Plots need matplotlib (`pip install matplotlib`); without it the tables are
still written and RESULTS.md says the plots were skipped.

    python benchmarks/report.py                       # results/ -> RESULTS.md (+ plots/)
    python benchmarks/report.py DIR --output FILE.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GB = 1e9


def _gb(n) -> str:
    return "-" if n is None else f"{n / GB:.2f} GB"


def _stat(s, scale=1.0, digits=1) -> str:
    if not isinstance(s, dict):
        return "-"
    return (f"{s['median'] * scale:.{digits}f} "
            f"({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})")


def _machine_line(m: dict) -> str:
    name = m.get("device_name") or "?"
    gpus = m.get("nvidia_smi")
    if gpus:
        name = gpus[0]
    return (f"{m.get('device', '?')}: {name}; MLX {m.get('mlx', '?')}, mlx-lm "
            f"{m.get('mlx_lm', '?')}, {m.get('platform', '')}; {m.get('date', '?')}")


def _command(report: dict) -> str:
    cmd = report.get("command")
    if not cmd:
        return ""
    args = list(cmd)
    if args and args[0].endswith(("marlin-mlx", "__main__.py", "main.py")):
        args[0] = "marlin-mlx"
    return "`" + " ".join(args) + "`"


# ---------------------------------------------------------------------------- sections

def bench_section(name: str, r: dict) -> list:
    s = r["settings"]
    q = r.get("quantization")
    qtext = f"{q['bits']}-bit {q['mode']}, group {q['group_size']}" if q else "as stored"
    lines = [f"### {r['model']} ({qtext}) — `{name}`", "",
             f"- machine: {_machine_line(r['machine'])}",
             f"- workload: batch {s['batch_size']}, {s['gen_tokens']} decode tokens, median "
             f"(min–max) of {s['trials']} trials after {s['warmup']} warm-up"
             + ("; the runtimes' trials alternating" if s.get("interleave") else "")]
    if _command(r):
        lines.append(f"- command: {_command(r)}")
    lines.append("")
    runtimes = list(r["runtimes"])
    lines += ["| prompt | runtime | prefill tok/s | decode tok/s | TTFT ms | peak memory | "
              "weights GB/s |", "|---|---|---|---|---|---|---|"]
    for i, row0 in enumerate(r["runtimes"][runtimes[0]]["results"]):
        for rt in runtimes:
            row = r["runtimes"][rt]["results"][i]
            lines.append(f"| {row['prompt_tokens']} | {rt} | {_stat(row['prefill_tps'])} | "
                         f"{_stat(row['decode_tps'])} | {_stat(row['ttft_s'], 1e3)} | "
                         f"{_gb(row['peak_memory_bytes'])} | {row['weights_gbps']:.3g} |")
    if "ratios" in r:
        lines += ["", "| prompt | prefill ratio | decode ratio | TTFT ratio | peak memory ratio | "
                      "greedy tokens agreeing |", "|---|---|---|---|---|---|"]
        for x in r["ratios"]:
            if "prompt_tokens" in x:
                lines.append(f"| {x['prompt_tokens']} | {x['prefill_tps']:.2f}x | "
                             f"{x['decode_tps']:.2f}x | {x['ttft_s']:.2f}x | "
                             f"{x['peak_memory']:.2f}x | {x['greedy_prefix_agreement']:.0%} |")
        lines.append("")
        lines.append("Ratios are marlin-mlx / mlx-lm: above 1 is faster for tok/s; below 1 is "
                     "better for TTFT and memory.")
    lines += ["", "| runtime | load time | weights | load peak (MLX) | load RSS growth | "
                  "RSS growth / weights |", "|---|---|---|---|---|---|"]
    for rt in runtimes:
        ld = r["runtimes"][rt]["load"]
        ratio = ld.get("load_rss_over_weights")
        lines.append(f"| {rt} | {ld['load_time_s']:.2f} s | {_gb(ld['weight_bytes'])} | "
                     f"{_gb(ld['load_peak_memory_bytes'])} | {_gb(ld.get('load_rss_growth_bytes'))}"
                     f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    return lines + [""]


def memory_section(name: str, r: dict) -> list:
    s = r["settings"]
    lines = [f"### Memory: {r['model']} ({r['runtime']}) — `{name}`", "",
             f"- machine: {_machine_line(r['machine'])}",
             f"- context {s['context']} x batch {s['batch_size']}, {s['gen_tokens']} decode tokens"]
    if _command(r):
        lines.append(f"- command: {_command(r)}")
    lines += ["", "| phase | peak | weights | KV cache | other |", "|---|---|---|---|---|"]
    for phase in ("load", "prefill", "decode"):
        p = r[phase]
        lines.append(f"| {phase} | {_gb(p['peak_bytes'])} | {_gb(p['weights_bytes'])} | "
                     f"{_gb(p['kv_cache_bytes'])} | {_gb(p['other_bytes'])} |")
    lines.append(f"\nKV cache per token: {r['decode']['kv_bytes_per_token'] / 1024:.1f} KiB; "
                 f"baseline before load {_gb(r['baseline_bytes'])}.")
    return lines + [""]


def perplexity_section(name: str, r: dict) -> list:
    lines = [f"### Perplexity — `{name}`", "", f"- machine: {_machine_line(r['machine'])}"]
    if _command(r):
        lines.append(f"- command: {_command(r)}")
    lines += ["", "| model | data | perplexity | tokens scored | context / stride | time |",
              "|---|---|---|---|---|---|"]
    for x in r["results"]:
        lines.append(f"| {x['model']} | {x['data']} | {x['perplexity']:.4f} | {x['n_scored']} | "
                     f"{x['context']} / {x['stride']} | {x['seconds']:.1f} s |")
    if "delta" in r:
        d = r["delta"]
        lines.append(f"\nDelta vs baseline: {d['perplexity']:+.4f} ({d['relative']:+.2%}).")
    return lines + [""]


def kernels_section(name: str, r: dict) -> list:
    m = r["meta"]
    lines = [f"### Kernels — `{name}`", "",
             f"- device: {m.get('device')} ({m.get('backend')}), MLX {m.get('mlx')}, "
             f"{m.get('date')}; measured copy bandwidth {m.get('copy_GBs', 0):.0f} GB/s",
             *([f"- command: `{m['command']}`"] if m.get("command") else []), "",
             "| K→N | M | bits | ours µs | ours GB/s | MLX µs | MLX GB/s | fp16 µs | vs MLX | "
             "vs fp16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['K']}→{x['N']} | {x['M']} | {x['bits']} | {x['ours_us']:.1f} | "
                     f"{x['ours_GBs']:.0f} | {x['mlx_us']:.1f} | {x['mlx_GBs']:.0f} | "
                     f"{x['fp16_us']:.1f} | {x['vs_mlx']:.2f}x | {x['vs_fp16']:.2f}x |")
    return lines + [""]


def large_qmm_section(name: str, r: dict) -> list:
    """benchmarks/large_qmm.py: each tiling of large_qmm beside dequantize + matmul, MLX's
    quantized_matmul and the 16-bit matmul (µs per launch)."""
    m = r["meta"]
    tilings = sorted({k[5:-3] for x in r["rows"] for k in x
                      if k.startswith("lqmm_") and k.endswith("_us")})
    lines = [f"### large_qmm — `{name}`", "", f"- machine: {_machine_line(m)}",
             *([f"- command: `{m['command']}`"] if m.get("command") else []), "",
             "| K→N | M | 16-bit matmul µs | dequantize + matmul µs | MLX µs | " +
             " | ".join(f"large_qmm {t} µs" for t in tilings) + " |",
             "|---|---|---|---|---|" + "---|" * len(tilings)]
    for x in r["rows"]:
        cells = [f"{x[f'lqmm_{t}_us']:.1f}" if f"lqmm_{t}_us" in x else "-" for t in tilings]
        lines.append(f"| {x['K']}→{x['N']} | {x['M']} | {x['fp16_us']:.1f} | "
                     f"{x['dq+mm_us']:.1f} | {x['mlx_us']:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def buffer_attention_section(name: str, r: dict) -> list:
    """benchmarks/buffer_attention.py: the buffer kernel's tilings beside MLX's SDPA and the
    paged kernel over whole buffers (µs per call, wall clock in one graph)."""
    paths = [k[:-3] for k in r["cases"][0] if k.endswith("_us")]
    lines = [f"### Decode attention over KV buffers — `{name}`", "",
             f"- machine: {r.get('device', '?')}, MLX {r.get('mlx', '?')}, {r.get('date', '?')}, "
             f"{r.get('dtype', '?')}, heads {r.get('heads')}",
             f"- default tiling: {r.get('default_tiling')}",
             *([f"- command: `{r['command']}`"] if r.get("command") else []), "",
             "| batch | context | " + " | ".join(f"{p} µs" for p in paths) + " |",
             "|---|---|" + "---|" * len(paths)]
    for x in r["cases"]:
        lines.append(f"| {x['batch']} | {x['ctx']} | " +
                     " | ".join(f"{x[p + '_us']:.1f}" for p in paths) + " |")
    return lines + [""]


def decode_probe_section(name: str, r: dict) -> list:
    """benchmarks/decode_probe.py: decode tok/s and host split per variant (in one process, in
    the order run), and the CUPTI profile of the profiled variants."""
    lines = [f"### Decode step — `{name}`", "",
             f"- machine: {r.get('device', '?')}, MLX {r.get('mlx', '?')}, {r.get('date', '?')}, "
             f"{r.get('preset')} {r.get('bits')}-bit g{r.get('group_size')}, prompt "
             f"{r.get('prompt')}, compiled step: {bool(r.get('compiled'))}",
             *([f"- command: `{r['command']}`"] if r.get("command") else []), "",
             "| variant | decode tok/s | ms / token | build ms | sync eval ms |",
             "|---|---|---|---|---|"]
    for v, x in r["variants"].items():
        if "decode_tps" in x:
            lines.append(f"| {v} | {x['decode_tps']:.1f} | {x['ms_per_token']:.2f} | "
                         f"{x['build_ms']:.2f} | {x['eval_sync_ms']:.2f} |")
        else:
            lines.append(f"| {v} | {_cell(x.get('error', '?'))} | | | |")
    prof = r.get("profile") or {}
    if prof:
        lines += ["", "| profiled variant | wall ms / step | GPU kernel ms / step | "
                  "kernels / step |", "|---|---|---|---|"]
        for v, x in prof.items():
            if "gpu_kernel_ms_per_step" in x:
                lines.append(f"| {v} | {x['wall_ms_per_step']:.2f} | "
                             f"{x['gpu_kernel_ms_per_step']:.2f} | {x['kernels_per_step']:.0f} |")
    return lines + [""]


def cpu_decode_section(name: str, r: dict) -> list:
    res = r["results"]
    lines = [f"### {r['benchmark']} — `{name}`", "",
             f"- {r['machine'].get('platform')}, {r['machine'].get('cpu_count')} CPUs; MLX "
             f"{r['versions'].get('mlx')}, mlx-lm {r['versions'].get('mlx_lm')}; {r['date']}",
             f"- model: {json.dumps(r.get('model'))}",
             f"- workload: {json.dumps(r.get('workload'))}",
             "", "| runtime | prompt tok/s (median) | decode tok/s (median) |", "|---|---|---|"]
    for rt, x in res.items():
        lines.append(f"| {rt} | {x['prompt_tps_median']:.1f} | {x['decode_tps_median']:.1f} |")
    return lines + [""]


def serving_section(name: str, r: dict) -> list:
    env, st = r.get("environment", {}), r.get("settings", {})
    device = env.get("mlx_device_name") or env.get("mlx_device", "?")
    lines = [f"### `{name}`: {r.get('model', '?')}", "",
             f"{device}, MLX {env.get('mlx', '?')}, mlx-lm {env.get('mlx_lm', '?')}, "
             f"{env.get('date', '?')}; {st.get('clients')} concurrent streaming clients for "
             f"{st.get('duration')} s, prompts {st.get('prompt_tokens')} tokens, outputs "
             f"{st.get('output_tokens')} tokens (seed {st.get('seed')}), served dtype "
             f"{st.get('served_dtype', '?')}. Command: `python benchmarks/serving.py` with "
             "these settings.", "",
             "| server | ok | success | req/s | out tok/s | latency p50/p95/p99 s "
             "| TTFT p50/p95/p99 s |", "|---|---|---|---|---|---|---|"]
    res = r["results"]
    for cfg, x in res.items():
        if not isinstance(x, dict) or "requests_ok" not in x:
            lines.append(f"| {cfg} | failed: {_cell(x)} | | | | | |")
            continue
        lat = "/".join(f"{x[f'latency_s_p{q}']:.2f}" for q in (50, 95, 99))
        ttft = "/".join(f"{x[f'ttft_s_p{q}']:.2f}" for q in (50, 95, 99))
        lines.append(f"| {cfg} | {x['requests_ok']} | {x['success_rate']:.0%} | "
                     f"{x['requests_per_s']:.2f} | {x['output_tokens_per_s']:.1f} | {lat} | "
                     f"{ttft} |")
    ok = {k: v for k, v in res.items() if isinstance(v, dict) and v.get("output_tokens_per_s")}
    ratios = [f"{a} / {b}: {ok[a]['output_tokens_per_s'] / ok[b]['output_tokens_per_s']:.2f}x"
              for a in ("fifo", "sjf") for b in ("single", "mlx-lm") if a in ok and b in ok]
    if ratios:
        lines += ["", "Output tokens/s ratios: " + "; ".join(ratios) + "."]
    return lines + [""]


def paged_attention_section(name: str, r: dict) -> list:
    lines = [f"### `{name}`", "",
             f"{r.get('device', '?')}, MLX {r.get('mlx', '?')}, {r.get('date', '?')}; decode "
             f"(one query per sequence), block size {r.get('block_size')}, µs per call. Command: "
             "`python benchmarks/paged_attention.py --quick`.", "",
             "| heads | dtype | B | context | kernel µs | GB/s | plain-MLX reference µs "
             "| MLX SDPA on a contiguous cache µs | rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        lines.append(f"| {c['shape']} {c['heads']} | {c['dtype']} | {c['B']} | {c['ctx']} | "
                     f"{c['kernel_us']:.1f} | {c['kernel_GBps']:.0f} | {c['reference_us']:.1f} | "
                     f"{c['sdpa_contiguous_us']:.1f} | {c['rel_err_vs_reference']:.1e} |")
    return lines + [""]


def moe_layer_section(name: str, r: dict) -> list:
    """benchmarks/moe_layer.py: one MoE layer, decode paths or prefill variants (µs a layer)."""
    prefill = "prefill_tokens" in r
    what = (f"prefill of {r['prefill_tokens']} tokens (`--prefill-variants`)" if prefill
            else "one decode token")
    lines = [f"### `{name}`", "",
             f"{r.get('device', {}).get('device_name', '?')}, MLX {r.get('mlx', '?')}, "
             f"{r.get('date', '?')}; {r.get('bits')}-bit affine g{r.get('group_size')}, "
             f"{r.get('layers')} distinct layers chained; {what}; µs a layer (MLX eval time). "
             "Command: `python benchmarks/moe_layer.py"
             + (" --prefill-variants`." if prefill else " --sweep`."), "",
             "| model shape | path | µs a layer |", "|---|---|---|"]
    for model, res in r["results"].items():
        for path, x in res.items():
            if isinstance(x, dict) and "eval_us" in x:
                lines.append(f"| {model} | {path} | {x['eval_us']:.1f} |")
    return lines + [""]


def _scalar(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def generic_section(name: str, r) -> list:
    """Other JSON: its short top-level fields, and a table of a `results` list of records."""
    lines = [f"### `{name}`", ""]
    if not isinstance(r, dict):
        return lines + ["_(not a JSON object)_", ""]
    for k, v in r.items():
        if _scalar(v) and len(str(v)) <= 300:
            lines.append(f"- {k}: {_cell(v)}")
        elif isinstance(v, list) and all(isinstance(x, str) for x in v) and len(v) <= 5:
            lines += [f"- {k}:"] + [f"  - `{x}`" for x in v]
    records = r.get("results")
    if isinstance(records, list) and records and all(isinstance(x, dict) for x in records):
        cols = [c for c in records[0] if _scalar(records[0][c])]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(x.get(c)) for c in cols) + " |" for x in records]
    return lines + [""]


def kind_of(r: dict) -> str | None:
    if not isinstance(r, dict):
        return None
    if r.get("kind") in ("bench", "memory", "perplexity", "buffer_attention"):
        return r["kind"]
    rows = r.get("rows")
    if isinstance(r.get("meta"), dict) and isinstance(rows, list) and rows \
            and all(isinstance(x, dict) and "M" in x and "ours_GBs" in x for x in rows):
        return "kernels"
    if isinstance(r.get("meta"), dict) and isinstance(rows, list) and rows \
            and all(isinstance(x, dict) and "dq+mm_us" in x for x in rows):
        return "large_qmm"
    if r.get("benchmark") == "cpu_decode":
        return "cpu_decode"
    if isinstance(r.get("variants"), dict) and r.get("preset") and "steps" in r:
        return "decode_probe"
    if r.get("benchmark") == "serving" and isinstance(r.get("results"), dict):
        return "serving"
    if isinstance(r.get("cases"), list) and r["cases"] and "kernel_us" in r["cases"][0]:
        return "paged_attention"
    res = r.get("results")
    if isinstance(res, dict) and res and all(
            isinstance(v, dict) and any(isinstance(x, dict) and "eval_us" in x for x in v.values())
            for v in res.values()):
        return "moe_layer"
    return None


SECTIONS = {"bench": bench_section, "memory": memory_section, "perplexity": perplexity_section,
            "kernels": kernels_section, "large_qmm": large_qmm_section,
            "cpu_decode": cpu_decode_section,
            "serving": serving_section, "paged_attention": paged_attention_section,
            "moe_layer": moe_layer_section, "buffer_attention": buffer_attention_section,
            "decode_probe": decode_probe_section}
TITLES = {"bench": "Throughput (marlin-mlx bench)", "kernels": "Kernels (benchmarks/kernels.py)",
          "large_qmm": "Many-row product (benchmarks/large_qmm.py)",
          "cpu_decode": "CPU decode (benchmarks/cpu_decode.py)",
          "memory": "Memory (marlin-mlx memory)",
          "serving": "Serving (benchmarks/serving.py)",
          "paged_attention": "Paged attention (benchmarks/paged_attention.py)",
          "moe_layer": "MoE layer (benchmarks/moe_layer.py)",
          "buffer_attention": "Decode attention over KV buffers (benchmarks/buffer_attention.py)",
          "decode_probe": "Decode step by variant (benchmarks/decode_probe.py)",
          "perplexity": "Perplexity (marlin-mlx perplexity)"}


# ---------------------------------------------------------------------------- plots

def plot_decode_vs_context(benches: list, out: Path, plt) -> Path | None:
    runs = [(n, r) for n, r in benches
            if len(next(iter(r["runtimes"].values()))["results"]) > 1]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in runs:
        for rt, run in r["runtimes"].items():
            xs = [row["prompt_tokens"] for row in run["results"]]
            ys = [row["decode_tps"]["median"] for row in run["results"]]
            m = r["machine"]
            dev = (m.get("nvidia_smi") or [m.get("device_name") or m.get("device")])[0]
            model = str(r["model"]).replace("random:", "")
            ax.plot(xs, ys, marker="o", label=f"{Path(model).stem} [{dev.split(',')[0]}] {rt}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode tok/s (median)")
    ax.set_title("Decode throughput vs context")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "decode_vs_context.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kernel_gbps(kernels: list, out: Path, plt) -> list:
    paths = []
    for name, r in kernels:
        shapes = sorted({(x["K"], x["N"], x["bits"]) for x in r["rows"]})
        if not shapes:
            continue
        fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3.6), squeeze=False)
        for ax, (K, N, bits) in zip(axes[0], shapes):
            rows = sorted((x for x in r["rows"] if (x["K"], x["N"], x["bits"]) == (K, N, bits)),
                          key=lambda x: x["M"])
            Ms = [x["M"] for x in rows]
            for key, label in (("ours_GBs", "marlin-mlx"), ("mlx_GBs", "MLX built-in"),
                               ("fp16_GBs", "fp16 matmul")):
                ax.plot(Ms, [x[key] for x in rows], marker="o", label=label)
            if r["meta"].get("copy_GBs"):
                ax.axhline(r["meta"]["copy_GBs"], color="gray", ls="--", lw=1, label="copy BW")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{K}→{N}, {bits}-bit", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("GB/s")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Kernel bandwidth vs M — {r['meta'].get('device')}", fontsize=10)
        fig.tight_layout()
        path = out / f"kernel_gbps_{Path(name).stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- main

def build(results_dir: Path, output: Path, plots: bool = True) -> str:
    found = {k: [] for k in SECTIONS}
    unknown = []
    for f in sorted(results_dir.glob("*.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            unknown.append(f"{f.name} (unreadable: {e})")
            continue
        k = kind_of(r)
        if k is None:
            unknown.append(f.name)
        else:
            found[k].append((f.name, r))

    lines = ["# Benchmark results", "",
             f"Generated by `python benchmarks/report.py` from `{results_dir.name}/*.json`; "
             "how to reproduce: benchmarks/README.md. Every figure names its machine, MLX version "
             "and date.", ""]
    # the curated headline (hand-written, with its commands) comes first when there is one
    summary = output.parent / "SUMMARY.md"
    if summary.is_file():
        lines += [summary.read_text().rstrip(), ""]
    plot_dir = output.parent / "plots"
    images = []
    if plots and (found["bench"] or found["kernels"]):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            lines += ["_Plots skipped: matplotlib is not installed "
                      "(`pip install matplotlib`)._", ""]
        else:
            plot_dir.mkdir(parents=True, exist_ok=True)
            p = plot_decode_vs_context(found["bench"], plot_dir, plt)
            images += ([p] if p else []) + plot_kernel_gbps(found["kernels"], plot_dir, plt)
    for kind in ("bench", "serving", "kernels", "large_qmm", "paged_attention",
                 "buffer_attention", "decode_probe", "moe_layer", "cpu_decode", "memory",
                 "perplexity"):
        if not found[kind]:
            continue
        lines += [f"## {TITLES[kind]}", ""]
        for name, r in found[kind]:
            try:
                lines += SECTIONS[kind](name, r)
            except (KeyError, TypeError, ZeroDivisionError) as e:
                lines += [f"_`{name}`: could not be read as {kind} results ({e!r})._", ""]
    if images:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(output.parent).as_posix()})" for p in images]
        lines.append("")
    if unknown:
        lines += ["## Other results", ""]
        for u in unknown:
            if u.endswith(".json"):
                lines += generic_section(u, json.loads((results_dir / u).read_text()))
            else:
                lines += [f"- {u}", ""]
    text = "\n".join(lines)
    output.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=str(HERE / "results"))
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: {results}: no such results folder", file=sys.stderr)
        return 1
    build(results, Path(args.output), plots=not args.no_plots)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
