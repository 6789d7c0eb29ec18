"""Held-out perplexity of the demo models through marlin-mlx (sliding window, context 512, stride 256).

    python benchmarks/demo_perplexity.py --data .demo \
        benchmarks/demo_models/demo-small benchmarks/demo_models/demo-base \
        marlin_mlx/demo_models/demo-base-4bit --out benchmarks/results/demo_perplexity.json

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
        r = perplexity(model, tokens, context=a.context, stride=a.stride,
                       batch_size=a.batch_size, max_tokens=a.max_tokens, progress=False)
        row = {"model": path.name, "path": str(path),
               "weights": "4-bit affine g{group_size}".format(**config["quantization"])
               if "quantization" in config else config.get("dtype", config.get("torch_dtype")),
               **r.to_dict()}
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
        mx.clear_cache()
    out = {"split": a.split, "corpus": {k: meta[k] for k in ("packages", "licence", "split")},
           "tokens_file": str(tokens_file), "compute_dtype": "float32",
           "mlx": mx.__version__, "machine": f"{platform.machine()} {platform.system()}",
           "date": time.strftime("%Y-%m-%d"), "results": results}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
