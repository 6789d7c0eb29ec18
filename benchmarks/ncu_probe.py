"""Kernel-only GPU times through Nsight Compute (no host overhead in the numbers).

    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
        python3 benchmarks/ncu_probe.py > ncu.csv
then `python3 benchmarks/ncu_probe.py --parse ncu.csv` prints median µs per (kernel, grid,
block). Where one compiled kernel serves several launches (a run-time row count), a probe puts
a numbered marker launch before each (stream_probe.py --rows) and
`python3 benchmarks/ncu_probe.py --parse-marked ncu.csv probe.err` attributes every kernel to
the label of the marker before it.
"""
import csv
import statistics
import sys

import mlx.core as mx

CASES = [(4096, 12288), (28672, 8192), (12288, 4096)]


def run():
    from marlin_mlx.kernels.dequantize import dequantize_kernel
    from marlin_mlx.kernels.gated_mlp import gated_mlp_kernel
    from marlin_mlx.kernels.qmv import qmv_kernel
    for K, N in CASES:
        w = mx.random.normal((N, K)).astype(mx.float16) * 0.02
        q, s, b = mx.quantize(w, group_size=64, bits=4)
        mx.eval(w, q, s, b)
        for M in (1, 4, 8):
            x = mx.random.normal((M, K)).astype(mx.float16)
            mx.eval(x)
            variants = {"PF0": dict(PF=0), "auto": {}, "R2": dict(R=2), "R8": dict(R=8)}
            for rep in range(2):
                for name, kw in variants.items():
                    mx.eval(qmv_kernel(x, q, s, b, 64, 4, **kw))
                mx.eval(mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4))
                mx.eval(x @ w.T)
                if M == 1:
                    mx.eval(gated_mlp_kernel(x, (q, s, b), (q, s, b), 64, 4))
                    mx.eval(dequantize_kernel(q, s, b, 64, 4, mx.float16))
        del w, q, s, b


# --sweep: qmv / gated-MLP launch shapes for Qwen3-8B's decode GEMVs (and the 28672->8192)
SWEEP_CASES = [(4096, 6144), (4096, 4096), (12288, 4096), (4096, 12288), (28672, 8192)]


def sweep():
    """M = 1, bfloat16 x: every (R, SK, PF) of qmv per shape, the auto choice and MLX's
    quantized_matmul beside them; the gated MLP of 4096 -> 2 x 12288 likewise."""
    from marlin_mlx.kernels.gated_mlp import gated_mlp_kernel
    from marlin_mlx.kernels.qmv import qmv_kernel
    dt = mx.bfloat16
    for K, N in SWEEP_CASES:
        q, s, b = mx.quantize(mx.random.normal((N, K)).astype(dt) * 0.02, group_size=64, bits=4)
        x = mx.random.normal((1, K)).astype(dt)
        mx.eval(q, s, b, x)
        steps = K // 1024
        for rep in range(2):
            mx.eval(qmv_kernel(x, q, s, b, 64, 4))
            mx.eval(mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4))
            for R in (2, 4, 8):
                for SK in (1, 2, 4, 8):
                    if SK > steps:
                        continue
                    for PF in (0, 1):
                        mx.eval(qmv_kernel(x, q, s, b, 64, 4, R=R, SK=SK, PF=PF))
            if (K, N) == (4096, 12288):
                mx.eval(gated_mlp_kernel(x, (q, s, b), (q, s, b), 64, 4))
                for R in (2, 4, 8):
                    for SK in (1, 2, 4):
                        for PF in (0, 1):
                            mx.eval(gated_mlp_kernel(x, (q, s, b), (q, s, b), 64, 4, R=R, SK=SK,
                                                     PF=PF))
        del q, s, b


def _rows(path):
    """The CSV's per-metric rows as dicts (header repeats and other lines skipped)."""
    hdr = None
    for r in csv.reader(open(path)):
        if "Kernel Name" in r and "Metric Name" in r:
            hdr = r
        elif hdr is not None and len(r) == len(hdr):
            yield dict(zip(hdr, r))


def _value(d):
    """(metric value, the value in µs if it is a time)."""
    val = float(d["Metric Value"].replace(",", ""))
    unit = d.get("Metric Unit", "ns")
    return val, (val / 1000 if unit in ("nsecond", "ns") else
                 (val if unit in ("usecond", "us") else val * 1000))


def parse(path):
    """Median kernel time per (kernel, grid, block), and the median warp instructions issued
    where the CSV has smsp__inst_executed.sum."""
    times, insts = {}, {}
    for d in _rows(path):
        name = d["Kernel Name"]
        if any(t in name for t in ("copy", "fill", "Random", "random", "astype", "normal")):
            continue
        key = f"{name[:120]} grid={d.get('Grid Size', '')} block={d.get('Block Size', '')}"
        val, us = _value(d)
        if d["Metric Name"] == "smsp__inst_executed.sum":
            insts.setdefault(key, []).append(val)
        if d["Metric Name"] == "gpu__time_duration.sum":
            times.setdefault(key, []).append(us)
    for name, ts in times.items():
        inst = (f"  {statistics.median(insts[name]) / 1e6:7.2f} M inst" if name in insts
                else "")
        print(f"{statistics.median(ts):9.2f} us  n={len(ts):3d}{inst}  {name}")


def parse_marked(path, labels_path):
    """Kernel time per marked label (the sum of the kernels between its marker and the next;
    the median over repetitions), as JSON {label: {"us": ..., "runs": [...], "kernels": [...]}}
    on stdout. Markers: kernels named stream_mark, whose i blocks number labels[i - 1]."""
    import json
    labels = None
    for line in open(labels_path):
        if line.startswith("LABELS "):
            labels = json.loads(line[len("LABELS "):])
    launches = {int(d["ID"]): (d["Kernel Name"], d.get("Grid Size", ""), _value(d)[1])
                for d in _rows(path) if d["Metric Name"] == "gpu__time_duration.sum"}
    out, label = {}, None
    for i in sorted(launches):
        name, grid, us = launches[i]
        if "stream_mark" in name:
            label = labels[int(grid.strip("()").split(",")[0]) - 1]  # blocks of 32 threads
            e = out.setdefault(label, {"runs": [], "kernels": []})
            e["runs"].append(0.0)
            continue
        if label is None:
            continue
        e = out[label]
        e["runs"][-1] += us
        if name[:80] not in e["kernels"]:
            e["kernels"].append(name[:80])
    for e in out.values():
        e["us"] = statistics.median(e["runs"])
    json.dump(out, sys.stdout, indent=1)


def pivot_marked(path, meta):
    """A --parse-marked JSON as a results file (benchmarks/report.py renders its `results`):
    one record per launch tag ("K x N M.." or "K x N g.. dtype"), a column per variant with
    the fastest repetition in µs; setup markers dropped, the raw runs kept under `launches`."""
    import json
    raw = json.load(open(path))
    rows = {}
    for label, e in raw.items():
        if label.startswith("setup"):
            continue
        tag, variant = label.rsplit(" ", 1)
        rows.setdefault(tag, {"launch": tag})[f"{variant} us"] = round(min(e["runs"]), 2)
    out = dict(meta, results=list(rows.values()), launches=raw)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--pivot-marked":  # raw.json 'json-of-meta'
        import json
        pivot_marked(sys.argv[2], json.loads(sys.argv[3]))
    elif len(sys.argv) > 3 and sys.argv[1] == "--parse-marked":
        parse_marked(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 2 and sys.argv[1] == "--parse":
        parse(sys.argv[2])
    elif "--sweep" in sys.argv:
        sweep()
    else:
        run()
