"""Quantization quality table for the demo-base model: every variant of issue 7's list converted
with `marlin_mlx.convert`, scored on a fixed prefix of the held-out test split.

    python benchmarks/quality_table.py --max-tokens 20000 \
        --out benchmarks/results/quality_demo-base.json
    python benchmarks/quality_table.py --crosscheck --crosscheck-tokens 2000   # mlx vs torch
    python benchmarks/quality_table.py --only target-bpw-4.5 --src /tmp/demo-base-src \
        --work /tmp/qt --out /tmp/qt.json      # one row, from a private copy of demo-base
    python benchmarks/quality_table.py --merge /tmp/qt.json     # ... added to the results

Per variant: convert the bf16 checkpoint into a temporary folder (its bits per weight come from
the convert result, its size is the sum of its safetensors files), dequantize it back to float32
with `convert(..., dequantize=True)` (so per-layer bits and the mxfp4/nvfp4 modes need nothing
special), and score that with transformers in float32 through demo_perplexity.py's windows
(context 512, stride 256). The JSON is rewritten after every variant; rows already present for
the same token count are kept, so an interrupted run resumes.

`--crosscheck` scores a few quantized folders through marlin-mlx itself (the MLX model on the
packed weights) and through the torch path on a short prefix; the two must agree.

Calibration (GPTQ, --target-bpw) is plain text built from the TRAIN split only
(.demo/corpus/train.jsonl), never from the test split.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
# benchmarks/ holds modules (kernels.py) that would shadow packages transformers probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
ROOT = _HERE.parent
SRC = ROOT / "benchmarks" / "demo_models" / "demo-base"
MIXED = "attn=8,ffn_gate=4,ffn_up=4,ffn_down=6,lm_head=8"


def _variants() -> list:
    v = [dict(variant="bf16", format="bf16")]
    for bits in (8, 6, 4, 3, 2):
        for g in (32, 64, 128):
            v.append(dict(variant=f"affine-{bits}bit-g{g}", format="affine", bits=bits,
                          group_size=g))
    v += [dict(variant="mxfp4", format="mxfp4"), dict(variant="nvfp4", format="nvfp4"),
          dict(variant="mixed-guide", format="affine", bits=4, group_size=64, recipe=MIXED),
          dict(variant="mixed-3-4", format="affine", bits=4, group_size=64, recipe="mixed-3-4"),
          # equal size to uniform 4-bit g64 (demo-base: every attention block and every MLP
          # matrix has 786,432 weights; the head is tied to the 8192x512 embedding, so
          # `lm_head=` has no effect and `embed=` sets the head's bits)
          dict(variant="mixed-attn6-ffn3", format="affine", bits=4, group_size=64,
               recipe="attn=6,ffn_gate=3,ffn_up=3"),
          dict(variant="mixed-attn5-down5-ffn3", format="affine", bits=4, group_size=64,
               recipe="attn=5,ffn_down=5,ffn_gate=3,ffn_up=3"),
          dict(variant="mixed-embed6-ffn3", format="affine", bits=4, group_size=64,
               recipe="embed=6,ffn_gate=3,ffn_up=3"),
          # the preset that --target-bpw 4.5's choice suggested (4.43 bpw: below 4-bit g64)
          dict(variant="mixed-4.5", format="affine", bits=4, group_size=64, recipe="mixed-4.5"),
          dict(variant="gptq-4bit-g64", format="affine", bits=4, group_size=64, method="gptq"),
          dict(variant="gptq-3bit-g64", format="affine", bits=3, group_size=64, method="gptq"),
          # per-layer (bits, group size) from one forward+backward pass on 2 x 256 train
          # tokens (calibration.SENS_WINDOWS/SENS_TOKENS); 4.5 <= uniform 4-bit g64's 4.504
          dict(variant="target-bpw-4.5", format="affine", bits=4, target_bpw=4.5,
               num_samples=2),
          # the same allocation against uniform 3-bit g64 (3.504 bpw)
          dict(variant="target-bpw-3.5", format="affine", bits=4, target_bpw=3.5,
               num_samples=2)]
    return v


def calibration_text(data: Path, out: Path) -> Path:
    """Train-split chapters as plain text (chapters separated by blank lines)."""
    docs = [json.loads(line) for line in (data / "corpus" / "train.jsonl").open()]
    out.write_text("\n\n".join(docs), encoding="utf-8")
    return out


def _demo_perplexity():
    spec = importlib.util.spec_from_file_location("demo_perplexity", _HERE / "demo_perplexity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def convert_variant(v: dict, work: Path, calib: Path, num_samples: int) -> tuple:
    # SRC may be rebound by --src (a private copy while benchmarks/demo_models moves around)
    """-> (quantized folder, ConvertResult or None, seconds)."""
    from marlin_mlx.convert import convert

    if v["format"] == "bf16":
        return SRC, None, 0.0
    out = work / v["variant"]
    t0 = time.perf_counter()
    kw = dict(fmt=v["format"], bits=v.get("bits"), group_size=v.get("group_size"),
              recipe=v.get("recipe"), method=v.get("method", "rtn"),
              target_bpw=v.get("target_bpw"), force=True, progress=False,
              log=lambda s: print(f"  [{v['variant']}] {s}", flush=True))
    if kw["method"] == "gptq" or kw["target_bpw"] is not None:
        kw.update(calibration=calib, num_samples=v.get("num_samples", num_samples))
    r = convert(SRC, out, **kw)
    return out, r, time.perf_counter() - t0


def torch_ppl(dp, folder: Path, work: Path, tokens, max_tokens: int, quantized: bool) -> dict:
    from marlin_mlx.convert import convert

    path = folder
    if quantized:  # transformers needs float weights: convert's own dequantize, float32
        path = work / f"{folder.name}-f32"
        convert(folder, path, dequantize=True, dtype="float32", force=True, progress=False)
    try:
        return dp.torch_perplexity(dp.torch_model(path), tokens, 512, 256, 8, max_tokens)
    finally:
        if quantized:
            shutil.rmtree(path, ignore_errors=True)


def mlx_ppl(folder: Path, tokens, max_tokens: int) -> dict:
    import mlx.core as mx

    from marlin_mlx.loader import load
    from marlin_mlx.perplexity import perplexity

    model, _ = load(folder, dtype="float32")
    r = perplexity(model, tokens, context=512, stride=256, batch_size=8, max_tokens=max_tokens,
                   progress=False).to_dict()
    del model
    mx.clear_cache()
    return r


def _write(out: Path, doc: dict, keys=None) -> None:
    """Write `doc`; with `keys`, only those keys replace what is on disk (the table run and
    a crosscheck run can share the file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    disk = json.loads(out.read_text()) if out.is_file() else {}
    if keys is None:
        doc = {**doc, **{k: v for k, v in disk.items() if k == "crosscheck"}}
    else:
        doc = {**disk, **{k: doc[k] for k in keys}}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)


def main():
    global SRC
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / ".demo")
    ap.add_argument("--src", type=Path, default=SRC,
                    help="the bf16 demo-base folder (default benchmarks/demo_models/demo-base)")
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--num-samples", type=int, default=16,
                    help="calibration windows of 512 tokens (gptq, target-bpw)")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to (re)run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality_table"))
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "quality_demo-base.json")
    ap.add_argument("--crosscheck", nargs="*", default=None,
                    help="instead of the table: mlx vs torch on these variants "
                         "(default bf16 affine-4bit-g64 gptq-4bit-g64)")
    ap.add_argument("--crosscheck-tokens", type=int, default=2000)
    ap.add_argument("--merge", nargs="*", type=Path, default=None,
                    help="instead of running: add the rows (and crosscheck) of these result "
                         "files, e.g. from a parallel run with another --out, to --out")
    a = ap.parse_args()
    SRC = a.src.resolve()

    import mlx.core as mx
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dp = _demo_perplexity()
    tokens = np.load(a.data / "test.npy").astype(np.int64).tolist()
    a.work.mkdir(parents=True, exist_ok=True)
    calib = calibration_text(a.data, a.work / "calibration_train.txt")
    variants = {v["variant"]: v for v in _variants()}
    doc = json.loads(a.out.read_text()) if a.out.is_file() else {}
    command = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])

    if a.crosscheck is not None:
        names = a.crosscheck or ["bf16", "affine-4bit-g64", "gptq-4bit-g64"]
        rows = doc.get("crosscheck", {}).get("rows", [])
        for name in names:
            v = variants[name]
            folder, _, _ = convert_variant(v, a.work, calib, a.num_samples)
            q = v["format"] != "bf16"
            t = torch_ppl(dp, folder, a.work, tokens, a.crosscheck_tokens, q)
            m = mlx_ppl(folder, tokens, a.crosscheck_tokens)
            row = {"variant": name, "n_tokens": a.crosscheck_tokens,
                   "perplexity_torch": t["perplexity"], "perplexity_mlx": m["perplexity"],
                   "rel_diff": m["perplexity"] / t["perplexity"] - 1,
                   "seconds_torch": t["seconds"], "seconds_mlx": m["seconds"]}
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if r["variant"] != name] + [row]
            doc["crosscheck"] = {"command": command, "context": 512, "stride": 256,
                                 "note": "rows may come from several runs of this command",
                                 "rows": rows}
            _write(a.out, doc, keys=["crosscheck"])
            if folder != SRC:
                shutil.rmtree(folder, ignore_errors=True)
        return

    keep = {r["variant"]: r for r in doc.get("rows", []) if r.get("n_tokens") == a.max_tokens}
    # the command that makes every row (runs: the invocations that actually made this file)
    doc["command"] = (f"python benchmarks/quality_table.py --max-tokens {a.max_tokens} "
                      f"--num-samples {a.num_samples}")
    doc["runs"] = doc.get("runs", []) + [command]
    doc.update({"model": "demo-base", "source": "benchmarks/demo_models/demo-base"
                + ("" if SRC == (ROOT / "benchmarks/demo_models/demo-base").resolve()
                   else f" (copy at {SRC})"),
                "split": "test", "tokens_file": str(a.data / "test.npy"),
                "max_tokens": a.max_tokens, "context": 512, "stride": 256,
                "scoring": "transformers float32 on convert --dequantize float32 weights",
                "calibration": "train split (.demo/corpus/train.jsonl) as plain text, "
                               "calibration_windows windows of 512 tokens (per row)",
                "mlx": mx.__version__, "torch": torch.__version__,
                "machine": f"{platform.machine()} {platform.system()}",
                "date": time.strftime("%Y-%m-%d")})
    if a.merge is not None:
        for f in a.merge:
            other = json.loads(f.read_text())
            keep.update({r["variant"]: r for r in other.get("rows", [])
                         if r.get("n_tokens") == a.max_tokens})
            if "crosscheck" in other:
                doc["crosscheck"] = other["crosscheck"]
                _write(a.out, doc, keys=["crosscheck"])
        doc["merged_from"] = doc.get("merged_from", []) + [
            (lambda o: o.get("runs") or o.get("crosscheck", {}).get("command"))(
                json.loads(f.read_text())) for f in a.merge]
        a.only = []
    todo = [n for n in variants if a.only is None or n in a.only]
    base = keep.get("bf16")

    def save():
        ordered = [keep[n] for n in variants if n in keep]
        for rr in ordered:
            rr["delta_vs_bf16_pct"] = (100 * (rr["perplexity"] / base["perplexity"] - 1)
                                       if base else None)
        doc["rows"] = ordered
        _write(a.out, doc)

    if a.merge is not None:
        save()
        return
    for name in todo:
        if name in keep and (a.only is None):
            continue
        v = variants[name]
        print(f"== {name}", flush=True)
        folder, res, conv_s = convert_variant(v, a.work, calib, a.num_samples)
        q = v["format"] != "bf16"
        r = torch_ppl(dp, folder, a.work, tokens, a.max_tokens, q)
        row = {"variant": name, "format": v["format"], "bits": v.get("bits"),
               "group_size": v.get("group_size"), "recipe": v.get("recipe"),
               "method": v.get("method", "rtn") if q else None,
               "target_bpw": v.get("target_bpw"),
               "bpw": res.bits_per_weight if res else 16.0,
               "quantized_bpw": res.quantized_bits_per_weight if res else None,
               "file_MB": round(_size_mb(folder), 3), "perplexity": r["perplexity"],
               "nll": r["nll"], "n_tokens": a.max_tokens, "n_scored": r["n_scored"],
               "convert_seconds": round(conv_s, 1), "score_seconds": round(r["seconds"], 1)}
        if res is not None and res.quantized_bits_per_weight is not None and q:
            cfg = json.loads((folder / "config.json").read_text())["quantization"]
            row["bits"] = cfg["bits"]
            row["group_size"] = cfg["group_size"]
            per = {k: w["bits"] for k, w in cfg.items() if isinstance(w, dict)}
            if per:
                hist = {}
                for b in per.values():
                    hist[str(b)] = hist.get(str(b), 0) + 1
                row["layer_overrides_by_bits"] = hist
        if v.get("method") == "gptq" or v.get("target_bpw") is not None:
            row["calibration_windows"] = v.get("num_samples", a.num_samples)
        if name == "bf16":
            base = row
        keep[name] = row
        if folder != SRC:
            shutil.rmtree(folder, ignore_errors=True)
        save()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
