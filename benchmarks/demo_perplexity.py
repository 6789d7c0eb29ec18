"""Held-out perplexity of the demo models through marlin-mlx (sliding window, context 512, stride 256).

    python benchmarks/demo_perplexity.py --backend torch --data .demo \
        benchmarks/demo_models/demo-small benchmarks/demo_models/demo-base \
        marlin_mlx/demo_models/demo-base-4bit --out benchmarks/results/demo_perplexity.json
    python benchmarks/demo_perplexity.py --backend mlx --max-tokens 5000 --data .demo ...

`--backend torch` computes the same windows with transformers (the 4-bit model dequantized),
a reference for marlin-mlx's numbers and much faster on a small CPU than MLX's CPU backend.

The text is the test split of benchmarks/demo_corpus.py (every 5th chapter of each book, never
trained on), tokenized as in training: `.demo/test.npy` from `train_demo.py prepare`, i.e. each
chapter's tokens followed by EOS, all chapters in one stream. Models run in float32 on MLX.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

# benchmarks/ holds modules (e.g. kernels.py) that would shadow packages transformers probes for
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def torch_model(path: Path):
    """transformers' Qwen3 in float32 for a checkpoint folder; an mlx-lm 4-bit one is dequantized
    (mx.dequantize) so PyTorch computes with exactly the quantized weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config = json.loads((path / "config.json").read_text())
    q = config.pop("quantization", None)
    config.pop("quantization_config", None)
    if q is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    import mlx.core as mx

    raw = {}
    for f in sorted(path.glob("model*.safetensors")):
        raw.update(mx.load(str(f)))
    state = {}
    for name, w in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        if name.endswith(".weight") and f"{base}.scales" in raw:
            w = mx.dequantize(w, raw[f"{base}.scales"], raw[f"{base}.biases"],
                              group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
        state[name] = torch.from_numpy(np.array(w.astype(mx.float32)))
    model = Qwen3ForCausalLM(Qwen3Config.from_dict(config)).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        sys.exit(f"{path}: weights do not fit Qwen3 ({missing} {unexpected})")
    model.tie_weights()
    return model.eval()


def torch_perplexity(model, tokens, context, stride, batch_size, max_tokens=None):
    """The same windows and scoring as marlin_mlx.perplexity, computed by PyTorch."""
    import math

    import torch

    from marlin_mlx.perplexity import sliding_windows

    tokens = tokens[:max_tokens] if max_tokens else tokens
    windows = sliding_windows(len(tokens), context, stride)
    ids = torch.tensor(tokens)
    total, scored, t0 = 0.0, 0, time.perf_counter()
    groups, cur = [], []
    for w in windows:
        if cur and (len(cur) == batch_size or w.end - w.begin != cur[0].end - cur[0].begin):
            groups.append(cur)
            cur = []
        cur.append(w)
    groups.append(cur)
    with torch.no_grad():
        for g in groups:
            batch = torch.stack([ids[w.begin:w.end] for w in g])
            logp = torch.log_softmax(model(batch[:, :-1]).logits.float(), dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None])[..., 0].double()
            for i, w in enumerate(g):
                off = w.score_from - w.begin - 1
                total += nll[i, off:off + w.n_scored].sum().item()
                scored += w.n_scored
    seconds = time.perf_counter() - t0
    return {"perplexity": math.exp(total / scored), "nll": total / scored, "nll_sum": total,
            "n_scored": scored, "n_tokens": len(tokens), "n_windows": len(windows),
            "context": context, "stride": stride, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path(".demo"))
    ap.add_argument("--split", default="test", choices=["test", "valid"])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--backend", choices=["mlx", "torch"], default="mlx",
                    help="mlx: marlin-mlx's loader and model; torch: transformers (reference)")
    a = ap.parse_args()

    import mlx.core as mx

    from marlin_mlx.loader import load
    from marlin_mlx.perplexity import perplexity

    tokens_file = a.data / f"{a.split}.npy"
    if not tokens_file.is_file():
        sys.exit(f"{tokens_file}: missing; run `python benchmarks/train_demo.py prepare` first")
    tokens = np.load(tokens_file).astype(np.int64).tolist()
    meta = json.loads((a.data / "meta.json").read_text())
    first_doc = json.loads((a.data / "corpus" / f"{a.split}.jsonl").open().readline())
    results = []
    for path in a.models:
        model, tok = load(path, dtype="float32")
        if tok.encode(first_doc) != tokens[: len(tok.encode(first_doc))]:
            sys.exit(f"{path}: its tokenizer does not give the token ids in {tokens_file}")
        config = json.loads((path / "config.json").read_text())
        if a.backend == "mlx":
            r = perplexity(model, tokens, context=a.context, stride=a.stride,
                           batch_size=a.batch_size, max_tokens=a.max_tokens,
                           progress=False).to_dict()
        else:
            model = None  # free MLX's copy before PyTorch builds its own
            r = torch_perplexity(torch_model(path), tokens, a.context, a.stride, a.batch_size,
                                 a.max_tokens)
        row = {"model": path.name, "path": str(path), "backend": a.backend,
               "weights": "4-bit affine g{group_size}".format(**config["quantization"])
               if "quantization" in config else config.get("dtype", config.get("torch_dtype")),
               **r}
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
        mx.clear_cache()
    out = {"split": a.split, "backend": a.backend, "max_tokens": a.max_tokens, "corpus": {k: meta[k] for k in ("packages", "licence", "split")},
           "tokens_file": str(tokens_file), "compute_dtype": "float32",
           "mlx": mx.__version__, "machine": f"{platform.machine()} {platform.system()}",
           "date": time.strftime("%Y-%m-%d"), "results": results}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
