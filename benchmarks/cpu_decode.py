"""Decode and prompt throughput of one checkpoint through marlin-mlx and through mlx-lm.

Builds a small random Qwen3 in Hugging Face format (float32 weights, a byte-level BPE
tokenizer trained here on Python's bundled documentation), loads it with `marlin_mlx.load` and
with `mlx_lm.load`, and runs the same prompt ids through `marlin_mlx.stream_generate` and
`mlx_lm.stream_generate` in alternating trials in one process (greedy, EOS ignored on both
sides so every trial generates the same number of tokens). Both sides are timed by the same
code from the yielded responses:

  prompt tok/s = prompt tokens / time to the first generated token
  decode tok/s = (generated tokens - 1) / time from the first to the last token
  decode CPU ms/token = process CPU time (all threads) from the first to the last token,
                        per token: the work done, which other load on the machine disturbs
                        far less than wall-clock rates
Medians and bests of the trials, and the median ratio of adjacent (paired) trials, are
reported; the load average is recorded with them.

Writes benchmarks/results/cpu_decode.json and prints a markdown table.

    python benchmarks/cpu_decode.py                      # hidden 512, 4 layers (default)
    python benchmarks/cpu_decode.py --hidden 256 --trials 7
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cpu_decode.json"


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on Python's own documentation (English prose, offline)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)


def build_checkpoint(out_dir: Path, hidden: int, layers: int, vocab: int, seed: int) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    heads = max(hidden // 64, 1)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=0,
    )
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(out_dir, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 3,
        "num_attention_heads": heads,
        "num_key_value_heads": max(heads // 2, 1),
        "head_dim": 64,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "parameters": n_params,
        "dtype": "float32",
    }


def run_trial(stream, prompt_ids, gen_tokens):
    """Time one generation from a `stream_generate`-like iterator factory."""
    tokens = []
    t0 = time.perf_counter()
    t_first = t_last = c_first = c_last = None
    for response in stream(prompt_ids, gen_tokens):
        t_last, c_last = time.perf_counter(), time.process_time()
        if t_first is None:
            t_first, c_first = t_last, c_last
        tokens.append(response.token)
    return {
        "prompt_tps": len(prompt_ids) / (t_first - t0),
        "decode_tps": (len(tokens) - 1) / (t_last - t_first),
        "decode_cpu_ms_per_token": 1e3 * (c_last - c_first) / (len(tokens) - 1),
        "tokens": tokens,
        "reported_prompt_tps": response.prompt_tps,
        "reported_generation_tps": response.generation_tps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import mlx.core as mx
    import mlx_lm

    import marlin_mlx
    from marlin_mlx.generation import stream_generate
    from marlin_mlx.loader import load

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "qwen3-bench"
        model_info = build_checkpoint(ckpt, args.hidden, args.layers, args.vocab, args.seed)

        m_model, m_tok = load(str(ckpt))
        l_model, l_tok = mlx_lm.load(str(ckpt))
        # Same float32 weights on both sides (mlx-lm keeps the checkpoint's dtype; make sure).
        l_model.set_dtype(mx.float32)
        l_tok.eos_token_ids = set()  # generate exactly gen_tokens tokens, as marlin-mlx below

        rng = __import__("random").Random(args.seed)
        prompt_ids = [rng.randrange(1, len(m_tok)) for _ in range(args.prompt_tokens)]

        def marlin_stream(ids, n):
            return stream_generate(m_model, m_tok, ids, n, eos_token_ids=[])

        def mlxlm_stream(ids, n):
            return mlx_lm.stream_generate(l_model, l_tok, ids, n)

        sides = {"marlin-mlx": marlin_stream, "mlx-lm": mlxlm_stream}
        for stream in sides.values():  # warm-up: first-call allocations and caches
            run_trial(stream, prompt_ids, 8)
        load_before = os.getloadavg()
        trials = {name: [] for name in sides}
        for _ in range(args.trials):
            for name, stream in sides.items():  # alternate so drift hits both alike
                trials[name].append(run_trial(stream, prompt_ids, args.gen_tokens))
        load_after = os.getloadavg()

    summary = {}
    for name, runs in trials.items():
        summary[name] = {
            "decode_tps_median": statistics.median(r["decode_tps"] for r in runs),
            "decode_tps_best": max(r["decode_tps"] for r in runs),
            "prompt_tps_median": statistics.median(r["prompt_tps"] for r in runs),
            "prompt_tps_best": max(r["prompt_tps"] for r in runs),
            "decode_cpu_ms_per_token_median": statistics.median(
                r["decode_cpu_ms_per_token"] for r in runs),
            "decode_tps_all": [round(r["decode_tps"], 2) for r in runs],
            "prompt_tps_all": [round(r["prompt_tps"], 2) for r in runs],
            "generated_tokens": len(runs[0]["tokens"]),
        }
    m, l = summary["marlin-mlx"], summary["mlx-lm"]
    a, b = trials["marlin-mlx"][0]["tokens"], trials["mlx-lm"][0]["tokens"]
    same_prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    result = {
        "benchmark": "cpu_decode",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "mlx_device": str(mx.default_device()),
            "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        },
        "versions": {
            "mlx": mx.__version__,
            "mlx_lm": version("mlx-lm"),
            "marlin_mlx": marlin_mlx.__version__,
        },
        "model": model_info,
        "workload": {
            "prompt_tokens": args.prompt_tokens,
            "generated_tokens": args.gen_tokens,
            "sampling": "greedy, EOS ignored",
            "trials": args.trials,
            "order": "alternating, one warm-up each",
        },
        "results": summary,
        "ratio_marlin_over_mlxlm": {
            "decode_median": m["decode_tps_median"] / l["decode_tps_median"],
            "decode_best": m["decode_tps_best"] / l["decode_tps_best"],
            "prompt_median": m["prompt_tps_median"] / l["prompt_tps_median"],
            "prompt_best": m["prompt_tps_best"] / l["prompt_tps_best"],
            # each marlin-mlx trial over the mlx-lm trial run right after it: both see about
            # the same load from other processes, so these are steadier on a busy machine
            "decode_paired_median": statistics.median(
                a["decode_tps"] / b["decode_tps"]
                for a, b in zip(trials["marlin-mlx"], trials["mlx-lm"])),
            "prompt_paired_median": statistics.median(
                a["prompt_tps"] / b["prompt_tps"]
                for a, b in zip(trials["marlin-mlx"], trials["mlx-lm"])),
            # >1 means marlin-mlx does less work per token
            "decode_cpu_time_mlxlm_over_marlin": l["decode_cpu_ms_per_token_median"]
            / m["decode_cpu_ms_per_token_median"],
        },
        "greedy_tokens_identical_prefix": same_prefix,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    r = result["ratio_marlin_over_mlxlm"]
    print(
        f"Qwen3 random, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{model_info['parameters'] / 1e6:.1f}M params, float32; prompt {args.prompt_tokens} "
        f"tokens, {args.gen_tokens} generated; median of {args.trials} alternating trials; "
        f"MLX {mx.__version__} ({mx.default_device()}), {result['date']}\n"
    )
    print("| runtime | decode tok/s median (best) | prompt tok/s median (best) "
          "| decode CPU ms/token |")
    print("|---|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['decode_tps_median']:.1f} ({s['decode_tps_best']:.1f}) "
              f"| {s['prompt_tps_median']:.1f} ({s['prompt_tps_best']:.1f}) "
              f"| {s['decode_cpu_ms_per_token_median']:.2f} |")
    print(f"| marlin-mlx / mlx-lm | {r['decode_median']:.3f} ({r['decode_best']:.3f}) "
          f"| {r['prompt_median']:.3f} ({r['prompt_best']:.3f}) "
          f"| {1 / r['decode_cpu_time_mlxlm_over_marlin']:.3f} |")
    print(f"| paired-trial ratio, median | {r['decode_paired_median']:.3f} "
          f"| {r['prompt_paired_median']:.3f} | |")
    print(f"\nload average (1 min) before/after: {result['machine']['load_average_1min_before_after']}")
    print(f"\ngreedy tokens identical for the first {same_prefix} of {len(a)}; wrote {args.out}")


if __name__ == "__main__":
    main()
