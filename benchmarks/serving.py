"""Serving benchmark: N concurrent streaming clients against OpenAI-compatible servers.

For each configuration the script starts the server itself as a subprocess, waits for /health,
warms it up with one untimed burst of short requests, then runs a closed loop: every client
sends a streaming /v1/completions request, waits for the end, sends the next. The requests
(prompt and output lengths) come from one seeded sequence, identical for every configuration.
New requests stop after --duration seconds; requests in flight then finish (up to
--drain-timeout; any still running are cancelled and counted as unfinished).

Configurations (--configs, comma-separated):
  fifo    marlin-mlx serve, continuous batching, FIFO admission
  sjf     marlin-mlx serve, continuous batching, shortest job first
  single  marlin-mlx serve --max-batch-size 1 (one request at a time)
  mlx-lm  python -m mlx_lm.server (its own batching) on the same checkpoint

Measured per configuration: requests/s, output tokens/s (from the servers' usage counts),
latency and time to first token (P50/P95/P99, client side), success rate. JSON goes to
benchmarks/results/ with the device, MLX version and date; a table is printed.

  python benchmarks/serving.py --model marlin_mlx/demo_models/demo-base-4bit \\
      --clients 4 --duration 20 --prompt-tokens 16:128 --output-tokens 16:64
  python benchmarks/serving.py --random-weights qwen3-8b --clients 32 --duration 30

A random-weight checkpoint has no tokenizer: a word-level one (one token per word "wN", the
model's vocabulary size) is written beside it, so both servers can tokenize and detokenize.
The HTTP client is httpx (or aiohttp), not the openai package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("fifo", "sjf", "single", "mlx-lm")


# ------------------------------------------------------------------------ HTTP client

class _Http:
    """A streaming POST and a GET over httpx (or httpx2, or aiohttp): whichever is installed."""

    def __init__(self, limit: int):
        self.kind = None
        for name in ("httpx", "httpx2"):
            try:
                self.httpx = __import__(name)
                self.kind = "httpx"
                break
            except ImportError:
                continue
        if self.kind is None:
            import aiohttp

            self.aiohttp, self.kind = aiohttp, "aiohttp"
        self.limit = limit

    async def __aenter__(self):
        if self.kind == "httpx":
            limits = self.httpx.Limits(max_connections=self.limit + 4,
                                       max_keepalive_connections=self.limit + 4)
            self.client = self.httpx.AsyncClient(timeout=None, limits=limits)
        else:
            conn = self.aiohttp.TCPConnector(limit=self.limit + 4)
            self.client = self.aiohttp.ClientSession(
                connector=conn, timeout=self.aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc):
        await (self.client.aclose() if self.kind == "httpx" else self.client.close())

    async def get(self, url: str):
        if self.kind == "httpx":
            r = await self.client.get(url, timeout=5)
            return r.status_code, r.text
        async with self.client.get(url) as r:
            return r.status, await r.text()

    async def stream_lines(self, url: str, body: dict):
        """Yield (status, None) once, then each line of the response body."""
        if self.kind == "httpx":
            async with self.client.stream("POST", url, json=body) as r:
                yield r.status_code, None
                async for line in r.aiter_lines():
                    yield None, line
        else:
            async with self.client.post(url, json=body) as r:
                yield r.status, None
                async for raw in r.content:
                    yield None, raw.decode().rstrip("\r\n")


# ------------------------------------------------------------------------ workload

def word_pool(model_dir: Path, limit: int = 4000) -> list:
    """Words that are one token each for the model's tokenizer (for prompts of known length)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = []
    for i in range(min(tok.get_vocab_size(), 60000)):
        s = tok.decode([i])
        w = s.strip()
        if 2 <= len(w) <= 12 and w.isalnum() and w.isascii():
            if len(tok.encode(" " + w, add_special_tokens=False).ids) == 1:
                words.append(w)
                if len(words) >= limit:
                    break
    if len(words) < 50:
        raise SystemExit(f"{model_dir}: found too few one-token words in the tokenizer")
    return words


def _span(text: str, option: str) -> tuple:
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"{option} {text!r}: expected MIN:MAX, e.g. 32:512") from None
    if lo < 1 or hi < lo:
        raise SystemExit(f"{option} {text!r}: expected 1 <= MIN <= MAX")
    return lo, hi


def make_workload(words: list, n: int, prompt_span: tuple, output_span: tuple,
                  seed: int) -> list:
    """n requests with log-uniform prompt and output lengths (many short, some long)."""
    rng = random.Random(seed)

    def loguniform(lo, hi):
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 0.999)) - 1e-9)))

    out = []
    for i in range(n):
        p_len = max(prompt_span[0], min(prompt_span[1], loguniform(*prompt_span)))
        o_len = max(output_span[0], min(output_span[1], loguniform(*output_span)))
        prompt = " ".join(rng.choice(words) for _ in range(p_len))
        out.append({"i": i, "prompt": prompt, "prompt_words": p_len, "max_tokens": o_len})
    return out


# ------------------------------------------------------------------------ servers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(config: str, model: Path, port: int, args) -> list:
    if config == "mlx-lm":
        return [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port",
                str(port), "--host", "127.0.0.1", "--log-level", "WARNING",
                "--max-tokens", str(args.output_span[1])]
    cmd = [sys.executable, "-m", "marlin_mlx.cli", "serve", str(model), "--port", str(port),
           "--served-model-name", "bench", "--log-level", "warning",
           "--max-batch-size", "1" if config == "single" else str(args.max_batch_size),
           "--scheduler", "sjf" if config == "sjf" else "fifo",
           "--max-model-len", str(args.max_model_len)]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    return cmd


async def wait_healthy(http: _Http, port: int, proc, deadline: float, log: Path) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; log:\n"
                               + log.read_text()[-3000:])
        try:
            status, _ = await http.get(f"http://127.0.0.1:{port}/health")
            if status == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError(f"the server was not healthy after {deadline:.0f} s")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn / http.server shut down cleanly on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------ one request

async def one_request(http: _Http, url: str, model_name: str, req: dict) -> dict:
    body = {"model": model_name, "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    rec = {"i": req["i"], "ok": False, "max_tokens": req["max_tokens"]}
    t0 = time.perf_counter()
    first = None
    chunks = 0
    done = False
    finish = None
    try:
        async for status, line in http.stream_lines(url, body):
            if status is not None:
                rec["status"] = status
                if status != 200:
                    break
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                rec["error"] = str(obj["error"])[:200]
                break
            for choice in obj.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
                finish = choice.get("finish_reason") or finish
            if obj.get("usage"):
                rec["prompt_tokens"] = obj["usage"].get("prompt_tokens")
                rec["output_tokens"] = obj["usage"].get("completion_tokens")
    except Exception as e:  # connection refused or reset: a failed request
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
    end = time.perf_counter()
    rec.update(start=t0, end=end, latency=end - t0,
               ttft=(first - t0) if first is not None else None, chunks=chunks,
               finish_reason=finish)
    if rec.get("output_tokens") is None:
        rec["output_tokens"] = chunks  # a server without usage in streams: one chunk per token
    rec["ok"] = done and finish in ("stop", "length") and "error" not in rec
    return rec


# ------------------------------------------------------------------------ load

async def run_load(http: _Http, port: int, model_name: str, workload: list, clients: int,
                   duration: float, drain_timeout: float) -> tuple:
    url = f"http://127.0.0.1:{port}/v1/completions"
    records = []
    it = iter(workload)
    t_start = time.perf_counter()
    stop_at = t_start + duration

    async def client():
        while time.perf_counter() < stop_at:
            req = next(it, None)
            if req is None:
                return
            records.append(await one_request(http, url, model_name, req))

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=duration + drain_timeout)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return records, len(pending), t_start


def pct(values: list, q: float):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(math.floor(k)), int(math.ceil(k))
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(records: list, unfinished: int, t_start: float) -> dict:
    ok = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    end = max((r["end"] for r in ok), default=t_start)
    elapsed = max(end - t_start, 1e-9)
    out_tokens = sum(r["output_tokens"] or 0 for r in ok)
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok
            if r["ttft"] is not None and (r["output_tokens"] or 0) > 1]
    s = {"requests_ok": len(ok), "requests_failed": len(failed), "unfinished": unfinished,
         "success_rate": len(ok) / max(len(records), 1), "elapsed_s": elapsed,
         "requests_per_s": len(ok) / elapsed, "output_tokens": out_tokens,
         "output_tokens_per_s": out_tokens / elapsed,
         "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in ok)}
    for name, vals in (("latency_s", lat), ("ttft_s", ttft), ("tpot_s", tpot)):
        for q in (50, 95, 99):
            s[f"{name}_p{q}"] = pct(vals, q)
    if failed:
        s["first_errors"] = [r.get("error") or f"status {r.get('status')}" for r in failed[:5]]
    return s


async def bench_config(config: str, model: Path, workload: list, args, logdir: Path) -> dict:
    port = _free_port()
    cmd = server_command(config, model, port, args)
    log = logdir / f"{config}.log"
    env = dict(os.environ)
    env.pop("MARLIN_MLX_API_KEY", None)
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    print(f"[{config}] starting: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t_launch = time.perf_counter()
    try:
        async with _Http(args.clients) as http:
            await wait_healthy(http, port, proc, args.startup_timeout, log)
            startup = time.perf_counter() - t_launch
            name = "bench" if config != "mlx-lm" else "default_model"
            # warm-up: one untimed burst that reaches every batch size the load will use
            warm = [{"i": -1, "prompt": w["prompt"], "max_tokens": min(8, w["max_tokens"])}
                    for w in workload[-args.clients:]]
            await asyncio.gather(*(one_request(http, f"http://127.0.0.1:{port}/v1/completions",
                                               name, w) for w in warm))
            print(f"[{config}] healthy after {startup:.1f} s; running {args.clients} clients "
                  f"for {args.duration:.0f} s", file=sys.stderr, flush=True)
            records, unfinished, t_start = await run_load(
                http, port, name, workload, args.clients, args.duration, args.drain_timeout)
            summary = summarize(records, unfinished, t_start)
            summary["startup_s"] = startup
            if config != "mlx-lm":
                status, text = await http.get(f"http://127.0.0.1:{port}/metrics")
                if status == 200:
                    from marlin_mlx.serving.server import metrics_snapshot

                    # counters include the warm-up requests
                    summary["server_metrics"] = metrics_snapshot(text)
    finally:
        stop_server(proc)
    summary["command"] = cmd
    summary["requests"] = [{k: (round(v, 5) if isinstance(v, float) else v)
                            for k, v in r.items() if k not in ("start", "end")}
                           for r in records] if args.keep_requests else None
    return summary


# ------------------------------------------------------------------------ environment

def device_info() -> dict:
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(), "python": platform.python_version()}
    try:
        import mlx.core as mx

        info["mlx"] = mx.__version__
        info["mlx_device"] = str(mx.default_device())
        try:
            info["mlx_device_name"] = mx.device_info().get("device_name")
        except Exception:
            pass
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["mlx_lm"] = version("mlx-lm")
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            info["gpu"] = r.stdout.strip().splitlines()[0]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    info["cpu_count"] = os.cpu_count()
    return info


def write_word_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer: token i is the word "wi" (0 is <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    vocab.update({f"w{i}": i for i in range(1, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(str(out))


def random_checkpoint(preset: str, out: Path, bits: int, group_size: int) -> Path:
    from marlin_mlx.random_weights import save_random_checkpoint

    if (out / "config.json").is_file():
        print(f"reusing {out}", file=sys.stderr)
    else:
        t = time.perf_counter()
        save_random_checkpoint(preset, out, bits=bits, group_size=group_size)
        print(f"wrote random {preset} to {out} in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    if not (out / "tokenizer.json").is_file():
        cfg = json.loads((out / "config.json").read_text())
        write_word_tokenizer(out, int(cfg["vocab_size"]))
    return out


def cast_copy(model: Path, out: Path, dtype: str) -> Path:
    """A copy of the checkpoint with every floating tensor (scales and biases of quantized
    layers too) in `dtype`, so that every server computes in it. On MLX's CPU backend mlx-lm
    keeps a checkpoint's bfloat16, which that backend runs orders of magnitude slower than
    float32 (marlin-mlx computes in float32 there), so without this the CPU comparison would
    measure the dtype, not the servers."""
    import mlx.core as mx

    target = getattr(mx, dtype)
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.suffix == ".safetensors":
            arrays = mx.load(str(f))
            arrays = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
                      for k, v in arrays.items()}
            mx.save_safetensors(str(out / f.name), arrays, metadata={"format": "mlx"})
        elif f.is_file():
            shutil.copy2(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ------------------------------------------------------------------------ report

def table(results: dict) -> str:
    cols = [("config", "{}"), ("ok", "{}"), ("fail", "{}"), ("unfin", "{}"), ("req/s", "{:.2f}"),
            ("out tok/s", "{:.1f}"), ("lat p50", "{:.2f}"), ("lat p95", "{:.2f}"),
            ("lat p99", "{:.2f}"), ("ttft p50", "{:.3f}"), ("ttft p95", "{:.3f}"),
            ("ttft p99", "{:.3f}"), ("success", "{:.1%}")]
    keys = [None, "requests_ok", "requests_failed", "unfinished", "requests_per_s",
            "output_tokens_per_s", "latency_s_p50", "latency_s_p95", "latency_s_p99",
            "ttft_s_p50", "ttft_s_p95", "ttft_s_p99", "success_rate"]
    rows = []
    for config, s in results.items():
        if "error" in s:
            rows.append([config, "error: " + s["error"][:60]] + [""] * (len(cols) - 2))
            continue
        row = [config]
        for (_, fmt), k in zip(cols[1:], keys[1:]):
            v = s.get(k)
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(c[0]), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line([c[0] for c in cols]), line(["-" * w for w in widths])] + [line(r) for r in rows]
    base = results.get("single", {}).get("output_tokens_per_s")
    peer = results.get("mlx-lm", {}).get("output_tokens_per_s")
    for config in ("fifo", "sjf"):
        tps = results.get(config, {}).get("output_tokens_per_s")
        if tps and base:
            out.append(f"{config}: {tps / base:.2f}x the tokens/s of one-at-a-time")
        if tps and peer:
            out.append(f"{config}: {tps / peer:.2f}x the tokens/s of mlx_lm.server")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="Model folder (default: the bundled demo model).")
    src.add_argument("--random-weights", metavar="PRESET",
                     help="Random weights of a preset's shapes (e.g. qwen3-8b), written to "
                     "--save-random or a temporary folder.")
    ap.add_argument("--save-random", type=Path, help="Where to keep the random checkpoint.")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"Comma-separated, from {', '.join(CONFIGS)} (default: all).")
    ap.add_argument("--clients", type=int, default=32, help="Concurrent clients.")
    ap.add_argument("--duration", type=float, default=30.0,
                    help="Seconds during which clients send new requests.")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="Seconds to let requests in flight finish after --duration.")
    ap.add_argument("--prompt-tokens", default="32:512", help="MIN:MAX prompt length (words).")
    ap.add_argument("--output-tokens", default="32:256", help="MIN:MAX max_tokens.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="auto",
                    choices=("auto", "as-is", "float32", "float16", "bfloat16"),
                    help="Serve a copy of the checkpoint cast to this dtype (auto: float32 on "
                    "MLX's CPU backend, as stored on a GPU).")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--keep-requests", action="store_true", help="Store every request in the JSON.")
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/"
                    "serving_<model>_<device>.json).")
    args = ap.parse_args(argv)
    args.prompt_span = _span(args.prompt_tokens, "--prompt-tokens")
    args.output_span = _span(args.output_tokens, "--output-tokens")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise SystemExit(f"--configs: unknown {', '.join(bad) or '(none)'}; "
                         f"choose from {', '.join(CONFIGS)}")
    if args.prompt_span[1] + args.output_span[1] + 8 > args.max_model_len:  # BOS, merges
        raise SystemExit("--prompt-tokens MAX + --output-tokens MAX must fit --max-model-len")

    tmp = None
    if args.random_weights:
        folder = args.save_random or Path(tempfile.mkdtemp(prefix="serving-random-"))
        tmp = None if args.save_random else folder
        model = random_checkpoint(args.random_weights, folder, args.bits, args.group_size)
        label = f"random-{args.random_weights}-{args.bits}bit"
    else:
        if args.model is None:
            sys.path.insert(0, str(ROOT))
            from marlin_mlx.bundled import default_model_path

            args.model = default_model_path()
        model, label = args.model.resolve(), args.model.name
    dtype = args.dtype
    if dtype == "auto":
        import mlx.core as mx

        dtype = "float32" if mx.default_device().type == mx.cpu else "as-is"
    cast_dir, source = None, model
    if dtype != "as-is":
        cast_dir = Path(tempfile.mkdtemp(prefix="serving-cast-"))
        model = cast_copy(model, cast_dir, dtype)
        print(f"serving a {dtype} copy of the checkpoint: {model}", file=sys.stderr)
    args.served_dtype = dtype
    try:
        words = word_pool(model)
        # enough requests for any duration: the sequence is the same for every config
        workload = make_workload(words, 20000, args.prompt_span, args.output_span, args.seed)
        env = device_info()
        logdir = Path(tempfile.mkdtemp(prefix="serving-logs-"))
        device = env.get("gpu") or ("cpu" if "cpu" in env.get("mlx_device", "cpu") else "gpu")
        out = args.out or ROOT / "benchmarks" / "results" / \
            f"serving_{label}_{device.replace(' ', '-')}.json"
        report = {"benchmark": "serving", "model": label, "environment": env,
                  "settings": {k: v for k, v in vars(args).items()
                               if k not in ("model", "out", "save_random")},
                  "results": {}, "server_logs": str(logdir)}
        report["settings"]["model_path"] = str(source)
        results = report["results"]
        out.parent.mkdir(parents=True, exist_ok=True)
        for config in configs:
            try:
                results[config] = asyncio.run(bench_config(config, model, workload, args, logdir))
            except Exception as e:  # one broken server does not lose the others' numbers
                results[config] = {"error": f"{type(e).__name__}: {e}"}
            print(table({config: results[config]}).splitlines()[-1], file=sys.stderr, flush=True)
            # written after every config: a run cut short keeps what it measured
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    finally:
        for folder in (tmp, cast_dir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    print(table(results))
    print(f"wrote {out}")
    return 0 if all("error" not in s for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
