"""Where a batched decode step of the serving engine spends its time.

Builds a model of a preset's shapes with random weights in memory, a ModelRunner with a paged
KV pool, and B sequences of `--context` cached tokens each, then for each batch size measures
through `ModelRunner.forward` (the engine's only model entry point):
- host time to build one step's lazy graph, and a synchronous step (build + evaluate);
- pipelined steps (step n + 1 built and launched before step n is read back) and, as the engine
  runs, steps built ahead (step n + 1 built, step n read back, then step n + 1 launched);
- with --profile, GPU time per kernel category (CUPTI) for the listed batch sizes;
- prefill chunks of the given lengths through the paged cache;
- with --engine, the whole engine in process (no HTTP): N greedy requests, one at a time and
  all at once, output tokens per second.

    python benchmarks/engine_probe.py --preset qwen3-8b --batch 1,8,32 --profile 1,32 \\
        --engine 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_probe import build, cupti_profile  # noqa: E402

from marlin_mlx.serving.paged_cache import (  # noqa: E402
    DECODE, PREFILL, ModelRunner, StepInputs, pack_prefill)


class Batch:
    """B sequences with `context` cached tokens each, on disjoint blocks of the pool."""

    def __init__(self, runner: ModelRunner, B: int, context: int, room: int, seed: int = 0):
        bs = runner.pool.block_size
        self.runner, self.B, self.bs = runner, B, bs
        per = -(-(context + room) // bs)
        if B * per > runner.pool.num_blocks:
            raise ValueError(f"{B} sequences of {context + room} tokens need {B * per} blocks, "
                             f"the pool has {runner.pool.num_blocks}")
        self.tables = np.arange(B * per, dtype=np.int32).reshape(B, per)
        self.positions = np.full(B, context, np.int32)
        self.rng = np.random.default_rng(seed)
        self.vocab = int(runner.model.args.vocab_size)

    def inputs(self, tokens=None) -> StepInputs:
        B, bs, pos = self.B, self.bs, self.positions
        ids = self.rng.integers(0, self.vocab, (B, 1)).astype(np.int32) if tokens is None else tokens
        slots = (self.tables[np.arange(B), pos // bs] * bs + pos % bs).astype(np.int32)
        return StepInputs(kind=DECODE, token_ids=ids, positions=pos.copy(),
                          block_tables=self.tables, slot_mapping=slots, context_lens=pos + 1)

    def step(self, prev=None):
        """Build one decode step (lazy); returns the sampled tokens."""
        inp = self.inputs()
        if prev is not None:
            inp.prev_rows = np.arange(self.B, dtype=np.int32)
        logits = self.runner.forward(inp, prev_tokens=prev)
        self.positions += 1
        return mx.argmax(logits, axis=-1)


def prefill_cache(runner: ModelRunner, batch: Batch, context: int) -> None:
    """Fill every sequence's first `context` slots with real keys/values (one prefill each)."""
    bs = batch.bs
    for i in range(batch.B):
        pos = np.arange(context)
        table = batch.tables[i]
        runner.forward(StepInputs(
            kind=PREFILL, token_ids=batch.rng.integers(0, batch.vocab, (1, context)).astype(np.int32),
            positions=np.array([0], np.int32), block_tables=table[None],
            slot_mapping=(table[pos // bs] * bs + pos % bs).astype(np.int32),
            context_lens=np.array([context], np.int32)))
        mx.eval(runner.pool.arrays())


def time_batch(runner, B, context, steps, profile: bool) -> dict:
    batch = Batch(runner, B, context, room=6 * steps + 16)  # warm, sync, 2 modes, profile
    prefill_cache(runner, batch, context)
    for _ in range(3):  # warm: compilation and kernel selection for this batch size
        mx.eval(batch.step(), runner.pool.arrays())
    builds, syncs = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        y = batch.step()
        t1 = time.perf_counter()
        mx.eval(y, runner.pool.arrays())
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        syncs.append(t2 - t0)

    def pipelined():
        prev = batch.step()
        mx.async_eval(prev, runner.pool.arrays())
        for _ in range(steps - 1):
            nxt = batch.step(prev)
            mx.async_eval(nxt, runner.pool.arrays())
            prev.tolist()
            prev = nxt
        prev.tolist()

    def ahead():  # the engine's order: build n + 1, read back n, then start n + 1
        prev = batch.step()
        mx.async_eval(prev, runner.pool.arrays())
        for _ in range(steps - 1):
            nxt = batch.step(prev)
            prev.tolist()
            mx.async_eval(nxt, runner.pool.arrays())
            prev = nxt
        prev.tolist()

    timed = {}
    for name, fn in (("pipelined", pipelined), ("ahead", ahead)):
        mx.synchronize()
        t0 = time.perf_counter()
        fn()
        timed[name] = (time.perf_counter() - t0) / steps
    out = {"B": B, "context": context, "build_ms": 1e3 * statistics.median(builds),
           "sync_step_ms": 1e3 * statistics.median(syncs),
           "pipelined_step_ms": 1e3 * timed["pipelined"], "ahead_step_ms": 1e3 * timed["ahead"],
           "tokens_per_s": B / timed["ahead"]}
    print(f"B={B:3d} ctx={context}: build {out['build_ms']:6.2f} ms  sync step "
          f"{out['sync_step_ms']:7.2f} ms  pipelined {out['pipelined_step_ms']:7.2f} ms  "
          f"ahead {out['ahead_step_ms']:7.2f} ms -> {out['tokens_per_s']:7.1f} tok/s", flush=True)
    if profile:
        try:
            out["profile"] = cupti_profile(ahead, steps)
            cats = out["profile"]["categories_us_per_step"]
            print("   GPU per step: " + ", ".join(f"{k} {v['us']:.0f} µs" for k, v in cats.items()),
                  flush=True)
        except Exception as e:  # CUPTI unavailable: the timings above still stand
            out["profile_error"] = f"{type(e).__name__}: {e}"
            print(f"   profile failed: {out['profile_error']}", flush=True)
    return out


def time_prefill(runner, shape: str, reps: int = 3) -> dict:
    """Median time of a prefill forward of S rows of L tokens ("SxL", or "L" for one row),
    repeated (the shape seen before): how a packed forward's cost grows with its rows."""
    S, L = (int(x) for x in shape.split("x")) if "x" in shape else (1, int(shape))
    inp = prefill_inputs(runner, L, rows=S)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        runner.forward(inp)
        mx.eval(runner.pool.arrays())
        times.append(time.perf_counter() - t0)
    t = statistics.median(times[1:])
    print(f"prefill {S}x{L}: {1e3 * t:.1f} ms ({S * L / t:.0f} tok/s)", flush=True)
    return {"rows": S, "tokens": L, "ms": 1e3 * t, "tokens_per_s": S * L / t}


def time_fresh_prefills(runner, count: int, lo: int = 32, hi: int = 512) -> dict:
    """Prefill chunks of `count` lengths never seen before (as a server meets prompts), with
    exact shapes and with the engine's shape buckets (pack_prefill): the first-use cost of a
    new shape shows as first against again."""
    rng = np.random.default_rng(7)
    lengths = rng.choice(np.arange(lo, hi + 1), size=count, replace=False).tolist()
    out = {}
    for name, bucket in (("exact", None), ("bucketed", 512)):
        rows = []
        for n in lengths:
            inp = prefill_inputs(runner, n, bucket=bucket)
            t0 = time.perf_counter()
            runner.forward(inp)
            mx.eval(runner.pool.arrays())
            t1 = time.perf_counter()
            runner.forward(inp)
            mx.eval(runner.pool.arrays())
            rows.append({"tokens": n, "shape": list(inp.token_ids.shape),
                         "first_ms": 1e3 * (t1 - t0), "again_ms": 1e3 * (time.perf_counter() - t1)})
        first = statistics.mean(r["first_ms"] for r in rows)
        again = statistics.mean(r["again_ms"] for r in rows)
        print(f"fresh prefill lengths, {name} shapes ({count}, {lo}-{hi}): first use "
              f"{first:.1f} ms, again {again:.1f} ms on average", flush=True)
        out[name] = {"rows": rows, "first_ms_mean": first, "again_ms_mean": again}
    return out


def check_packed_prefill(runner, vocab: int, length: int = 300) -> dict:
    """The next-token logits after a prompt prefilled alone with exact shapes, and again as
    one row of a bucketed packed forward beside another prompt: they should agree to the
    compute dtype's rounding (on a GPU the two take different attention kernels)."""
    bs, scratch = runner.pool.block_size, runner.pool.num_blocks - 1
    rng = np.random.default_rng(3)
    prompt = rng.integers(1, vocab, length + 1).tolist()
    other = rng.integers(1, vocab, 77).tolist()
    nb = -(-(length + 1) // bs)
    tables = [list(range(nb)), list(range(nb, 2 * nb)), list(range(2 * nb, 3 * nb))]
    logits = []
    for table, chunks, bucket in (
            (tables[0], [(prompt, 0, length, tables[0])], None),
            (tables[1], [(other, 0, 76, tables[2]), (prompt, 0, 200, tables[1])], 512),
            (tables[1], [(prompt, 200, length - 200, tables[1])], 512)):
        runner.forward(pack_prefill(chunks, bs, scratch, bucket))
        mx.eval(runner.pool.arrays())
        if chunks[-1][1] + chunks[-1][2] == length:
            t = np.array([table], np.int32)
            out = runner.forward(StepInputs(
                kind=DECODE, token_ids=np.array([[prompt[-1]]], np.int32),
                positions=np.array([length], np.int32), block_tables=t,
                slot_mapping=np.array([t[0, length // bs] * bs + length % bs], np.int32),
                context_lens=np.array([length + 1], np.int32)))
            logits.append(np.array(out[0].astype(mx.float32)))
    a, b = logits
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    same = bool(a.argmax() == b.argmax())
    print(f"packed prefill check: max |diff| / max |logit| = {rel:.2e}, same argmax: {same}",
          flush=True)
    return {"length": length, "max_rel_diff": rel, "same_argmax": same}


def prefill_inputs(runner, length: int, rows: int = 1, bucket=None) -> StepInputs:
    """`rows` sequences of `length` new tokens each, on blocks of their own (pack_prefill)."""
    bs = runner.pool.block_size
    nb = -(-length // bs)
    chunks = [([0] * length, 0, length, list(range(r * nb, (r + 1) * nb))) for r in range(rows)]
    return pack_prefill(chunks, bs, runner.pool.num_blocks - 1, bucket)


def engine_throughput(model, requests: int, prompt: int, output: int, concurrent: bool) -> dict:
    """Output tokens/s of the engine in process: `requests` greedy requests, all submitted at
    once (`concurrent`) or each after the previous finished."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from serving import write_word_tokenizer
    from transformers import AutoTokenizer

    from marlin_mlx.serving.engine import Engine, SamplingParams

    tmp = Path(tempfile.mkdtemp())
    write_word_tokenizer(tmp, int(model.args.vocab_size))
    tok = AutoTokenizer.from_pretrained(str(tmp))
    engine = Engine(model, tok, max_batch_size=max(requests, 1), max_model_len=prompt + output + 8,
                    max_waiting_time=0.0)
    engine.start()
    rng = np.random.default_rng(1)
    done = threading.Semaphore(0)
    counts = []

    def on_event(ev):
        if ev.finish_reason is not None:
            counts.append(ev.completion_tokens)
            done.release()

    params = SamplingParams(max_tokens=output, temperature=0.0)
    # the vocabulary of a random model has no EOS worth hitting; any token ids are fine
    prompts = [rng.integers(1, int(model.args.vocab_size), prompt).tolist() for _ in range(requests)]
    t0 = time.perf_counter()
    if concurrent:
        for p in prompts:
            engine.submit(p, params, on_event)
        for _ in prompts:
            done.acquire()
    else:
        for p in prompts:
            engine.submit(p, params, on_event)
            done.acquire()
    wall = time.perf_counter() - t0
    engine.stop()
    out = {"requests": requests, "concurrent": concurrent, "prompt": prompt, "output": output,
           "wall_s": wall, "output_tokens": sum(counts), "tokens_per_s": sum(counts) / wall}
    print(f"engine {'concurrent' if concurrent else 'one at a time'}: {requests} requests, "
          f"{sum(counts)} tokens in {wall:.2f} s -> {out['tokens_per_s']:.1f} tok/s", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-8b")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=256, help="cached tokens per sequence")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=4097, help="pool size (the server's default "
                   "for 32 sequences of 2048 tokens is 4096 + 1 scratch block)")
    p.add_argument("--profile", default="", help="batch sizes to profile with CUPTI")
    p.add_argument("--prefill", default="",
                   help="comma-separated prefill shapes: L (one row) or SxL (S rows of L tokens)")
    p.add_argument("--prefill-fresh", type=int, default=0,
                   help="time this many never-seen prefill lengths (32-512), first use and again")
    p.add_argument("--prefill-check", action="store_true",
                   help="compare logits after an exact and a bucketed packed prefill")
    p.add_argument("--engine", type=int, default=0, help="requests for the in-process engine run")
    p.add_argument("--engine-prompt", type=int, default=128)
    p.add_argument("--engine-output", type=int, default=64)
    p.add_argument("--vocab", type=int, default=None, help="smaller vocabulary (quick runs)")
    p.add_argument("--variants", default="plain,compiled",
                   help="decode through the plain model and/or its compiled decoder")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731

    # MLX's CPU backend runs bfloat16 matmuls very slowly: compute in float32 there
    dtype = mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    model, _ = build(a.preset, a.bits, a.group_size, dtype=dtype, layers=a.layers, vocab=a.vocab)
    res = {"preset": a.preset, "bits": a.bits, "group_size": a.group_size, "layers": a.layers,
           "num_blocks": a.num_blocks, "mlx": mx.__version__, "device": str(mx.default_device()),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("MARLIN_MLX", "MLX_"))},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "batches": [],
           "prefill": [], "engine": []}

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))

    for variant in a.variants.split(","):
        compiled = {"compiled": True, "plain": False}[variant]
        print(f"== {variant}", flush=True)
        runner = ModelRunner(model, a.num_blocks, 16, compile=compiled)
        for B in ints(a.batch):
            r = time_batch(runner, B, a.context, a.steps, B in ints(a.profile))
            res["batches"].append({"variant": variant, **r})
            save()
        if variant == a.variants.split(",")[0]:
            for shape in a.prefill.split(","):
                if shape:
                    res["prefill"].append(time_prefill(runner, shape))
            if a.prefill_check:
                res["prefill_check"] = check_packed_prefill(runner, int(model.args.vocab_size))
            if a.prefill_fresh:
                res["prefill_fresh"] = time_fresh_prefills(runner, a.prefill_fresh)
                save()
        del runner
        mx.clear_cache()
        if a.engine:
            os.environ["MARLIN_MLX_COMPILE"] = "1" if compiled else "0"
            for concurrent in (False, True):
                r = engine_throughput(model, a.engine, a.engine_prompt, a.engine_output, concurrent)
                res["engine"].append({"variant": variant, **r})
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
