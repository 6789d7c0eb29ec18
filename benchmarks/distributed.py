"""Tensor-parallel benchmark: one process vs N processes (marlin_mlx.distributed).

For each preset (random weights of a real model's shapes, 4-bit affine by default) it writes
the checkpoint once, then runs the same measurement in one process and under `mlx.launch`
with N ranks: load time, prefill and decode tok/s (greedy, batch 1, medians over trials) and,
per rank, the weight bytes held, MLX's peak memory and the peak RSS. One JSON file results.

On a two-GPU machine (the lead's run; NVLink multicast stays off):

    source .gpu/b/stage2 && python3 benchmarks/distributed.py --backend nccl \\
        --presets qwen3-8b glm-4.7-flash --out benchmarks/results/distributed_h200x2.json

On the CPU (ring backend over 127.0.0.1; small shapes, to check the script and the memory split):

    python benchmarks/distributed.py --backend ring --presets qwen3-8b glm-4.7-flash \\
        --layers 2 --prompt-tokens 64 --gen-tokens 8 --trials 1 \\
        --out benchmarks/results/distributed_cpu_ring.json

`--worker` is the per-rank part the driver launches; it is not meant to be run by hand.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ["-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


# ----------------------------------------------------------------------------- one rank

def worker(args) -> None:
    from marlin_mlx import distributed
    from marlin_mlx.bench import PeakRSS, machine_info, param_bytes, prompt_ids, run_trial, summarize
    from marlin_mlx.loader import load_model

    group = distributed.init(args.backend) if args.ranks > 1 else None
    if group is not None and group.size() != args.ranks:
        raise SystemExit(f"expected {args.ranks} ranks, the launcher started {group.size()}")
    PeakRSS.reset()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, config = load_model(args.model, group=group)
    load_s = time.perf_counter() - t0
    mine = {"weight_bytes": param_bytes(model), "load_peak_mlx_bytes": mx.get_peak_memory(),
            "load_peak_rss_bytes": PeakRSS.peak() or 0}

    vocab = config["vocab_size"]
    trials = {n: [] for n in ("prefill_tps", "decode_tps", "ttft_s")}
    for t in range(args.warmup + args.trials):
        prompt = prompt_ids(vocab, 1, args.prompt_tokens, seed=t)
        r = run_trial(model, model.make_cache, prompt, args.gen_tokens, args.prefill_step)
        if t >= args.warmup:
            for k in trials:
                trials[k].append(r[k])
    mine.update(peak_mlx_bytes=mx.get_peak_memory(), peak_rss_bytes=PeakRSS.peak() or 0)

    # every rank's memory figures (in KiB: int32 holds them exactly), rank 0 writes
    keys = sorted(mine)
    row = mx.array([mine[k] // 1024 for k in keys], dtype=mx.int32)
    table = (mx.distributed.all_gather(row[None], group=group) if group is not None
             else row[None]).tolist()
    if group is not None and group.rank() != 0:
        return
    result = {
        "ranks": args.ranks, "backend": args.backend if group is not None else "single",
        "load_s": load_s, "per_rank": [{k: int(v) * 1024 for k, v in zip(keys, r)} for r in table],
        **{k: summarize(v) for k, v in trials.items()},
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
        "machine": machine_info(),
    }
    Path(args.json).write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- driver

def run_one(args, model: Path, ranks: int, out: Path) -> dict:
    cmd = [str(Path(__file__).resolve()), "--worker", "--model", str(model), "--ranks", str(ranks),
           "--json", str(out), "--backend", args.backend, "--prompt-tokens", str(args.prompt_tokens),
           "--gen-tokens", str(args.gen_tokens), "--trials", str(args.trials),
           "--warmup", str(args.warmup), "--prefill-step", str(args.prefill_step)]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}  # NVLink multicast off on the lent machines
    if ranks == 1:
        full = [sys.executable, *cmd]
    else:
        full = [sys.executable, *LAUNCH, "--backend", args.backend, "-n", str(ranks),
                "--env", "NCCL_NVLS_ENABLE=0", "--python", sys.executable, "--", *cmd]
        if args.backend == "ring":
            full[len(LAUNCH) + 1:len(LAUNCH) + 1] = ["-p", str(args.port)]
    print("+", " ".join(full), flush=True)
    proc = subprocess.run(full, cwd=ROOT, env=env, timeout=args.timeout)
    if proc.returncode != 0 or not out.is_file():
        return {"ranks": ranks, "error": f"exit status {proc.returncode}"}
    return json.loads(out.read_text())


def driver(args) -> None:
    from marlin_mlx.random_weights import save_random_checkpoint

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mlx": mx.__version__,
              "device": str(mx.default_device()), "bits": args.bits, "runs": []}
    ckpt_root = Path(args.ckpt_dir)
    for preset in args.presets:
        overrides = {"num_hidden_layers": args.layers} if args.layers else {}
        name = f"{preset}-{args.bits}bit" + (f"-{args.layers}L" if args.layers else "")
        path = ckpt_root / name
        if not (path / "config.json").is_file():
            print(f"writing random checkpoint {path}", flush=True)
            save_random_checkpoint(preset, path, bits=args.bits, config_overrides=overrides)
        for ranks in args.ranks:
            with tempfile.TemporaryDirectory() as tmp:
                r = run_one(args, path, ranks, Path(tmp) / "r.json")
            r["preset"], r["checkpoint"] = preset, name
            report["runs"].append(r)
            if "error" in r:
                print(f"{name} x{ranks}: {r['error']}", flush=True)
                continue
            gb = [p["weight_bytes"] / 2**30 for p in r["per_rank"]]
            peak = [p["peak_mlx_bytes"] / 2**30 for p in r["per_rank"]]
            print(f"{name} x{ranks}: prefill {r['prefill_tps']['median']:.1f} tok/s, decode "
                  f"{r['decode_tps']['median']:.2f} tok/s, weights/rank "
                  f"{', '.join(f'{g:.3f}' for g in gb)} GiB, peak/rank "
                  f"{', '.join(f'{g:.3f}' for g in peak)} GiB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen3-8b", "glm-4.7-flash"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--layers", type=int, default=None, help="cut the presets to this many layers")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backend", default="nccl" if mx.cuda.is_available() else "ring")
    p.add_argument("--port", type=int, default=35111, help="ring backend: first port")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "marlin-mlx-tp"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.ranks = args.ranks[0]
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
