"""`marlin-mlx bench`, `perplexity` and `memory`: measurement commands.

Registered on the app in cli/main.py with `app.command()(bench)` etc. Heavy imports happen
inside the commands; user errors print one `error: ...` line and exit with status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import UserErrors, fail

MODEL_HELP = "Model folder or Hugging Face repo id."
RANDOM_HELP = ("Random weights of a real model's shapes instead of --model: qwen3-8b, qwen3-4b, "
               "llama-3.1-8b, glm-4.7-flash, qwen3-30b-a3b, or a config.json path.")




def _int_list(text: str, option: str) -> list:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        fail(f"{option} {text!r}: expected comma-separated integers, e.g. 512,2048")
    if not values or min(values) < 1:
        fail(f"{option} {text!r}: expected positive integers, e.g. 512,2048")
    return values


def _write_json(path: Optional[Path], report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    typer.echo(f"wrote {path}", err=True)


def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    random_weights: Optional[str] = typer.Option(None, "--random-weights", help=RANDOM_HELP),
    prompt_tokens: str = typer.Option("512", "--prompt-tokens",
                                      help="Prompt lengths, comma-separated (e.g. 512,2048)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Decode steps per trial."),
    trials: int = typer.Option(5, "--trials", help="Timed trials per prompt length."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed trials before timing."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences decoded together."),
    prefill_step: int = typer.Option(2048, "--prefill-step",
                                     help="Prompt tokens per prefill chunk."),
    compare: Optional[str] = typer.Option(None, "--compare",
                                          help="Also run the same checkpoint through: mlx-lm."),
    bits: int = typer.Option(4, "--bits", help="Random weights: bits (16 = not quantized)."),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="Random weights: group size (affine: 64)."),
    fmt: str = typer.Option("affine", "--format",
                            help="Random weights: affine, mxfp4, nvfp4 or mxfp8."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="Compute dtype (default: float32 on CPU, else the "
                                             "checkpoint's)."),
    save_random: Optional[Path] = typer.Option(None, "--save-random",
                                               help="Keep the random checkpoint in this folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt ids and random weights."),
    compile: bool = typer.Option(True, "--compile/--no-compile",
                                 help="marlin-mlx decodes through its compiled step (fused q/k/v, "
                                      "mx.compile between attentions); mlx-lm never does."),
    interleave: bool = typer.Option(False, "--interleave",
                                    help="With --compare: keep both runtimes loaded and "
                                         "alternate their trials (fairer on a noisy machine)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-trial progress."),
):
    """Prefill/decode tok/s, time to first token, peak memory and load time (median of trials).

    \b
    Examples:
      marlin-mlx bench -m ./Qwen3-0.6B --compare mlx-lm --json out.json
      marlin-mlx bench --random-weights qwen3-8b --bits 4 --prompt-tokens 512,2048 \\
          --compare mlx-lm --json benchmarks/results/qwen3-8b-4bit.json
    """
    with UserErrors():
        from marlin_mlx.bench import BenchSettings, format_report, run_bench

        settings = BenchSettings(prompt_tokens=_int_list(prompt_tokens, "--prompt-tokens"),
                                 gen_tokens=gen_tokens, trials=trials, warmup=warmup,
                                 batch_size=batch_size, prefill_step=prefill_step, seed=seed,
                                 compile=compile)

        def progress(runtime, P, t, trial):
            if not quiet:
                typer.echo(f"  {runtime:<10} prompt {P:>6}  trial {t}/{trials}: prefill "
                           f"{trial['prefill_tps']:9.1f} tok/s  decode {trial['decode_tps']:8.1f} "
                           f"tok/s", err=True)

        report = run_bench(model=model, random_weights=random_weights, settings=settings,
                           compare_with=compare, bits=bits, group_size=group_size, fmt=fmt,
                           dtype=dtype, save_random=str(save_random) if save_random else None,
                           interleave=interleave, progress=progress,
                           log=lambda s: typer.echo(s, err=True))
        typer.echo(format_report(report))
        _write_json(json_out, report)


def perplexity(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", "-d", help="UTF-8 text file to score."),
    context: int = typer.Option(512, "--context", help="Tokens per window."),
    stride: int = typer.Option(256, "--stride", help="Tokens between window starts."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens",
                                             help="Score only the first N tokens of the text."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    baseline: Optional[str] = typer.Option(None, "--baseline",
                                           help="A second model (e.g. the bf16 original) to "
                                                "compare against."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
):
    """Sliding-window perplexity of a text file (context 512, stride 256 by default).

    \b
    Example:
      marlin-mlx perplexity -m ./Qwen3-8B-4bit --data wiki.test.raw --baseline ./Qwen3-8B
    """
    with UserErrors():
        from marlin_mlx.measure import machine_info
        from marlin_mlx.perplexity import evaluate_file

        kw = dict(context=context, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
                  dtype=dtype, progress=not no_progress and sys.stderr.isatty())
        results = [evaluate_file(model, data, **kw)]
        if baseline:
            results.append(evaluate_file(baseline, data, **kw))
        report = {"schema": "marlin-mlx/perplexity/1", "kind": "perplexity",
                  "machine": machine_info(), "command": sys.argv, "results": results}
        for r in results:
            typer.echo(f"{r['model']}: perplexity {r['perplexity']:.4f} over {r['n_scored']} "
                       f"tokens ({r['n_windows']} windows of {context}, stride {stride}; "
                       f"{r['seconds']:.1f} s)")
        if baseline:
            ours, base = results
            delta = ours["perplexity"] - base["perplexity"]
            report["delta"] = {"perplexity": delta, "relative": delta / base["perplexity"],
                               "same_token_count": ours["n_scored"] == base["n_scored"]}
            typer.echo(f"delta vs baseline: {delta:+.4f} ({delta / base['perplexity']:+.2%})")
            if ours["n_scored"] != base["n_scored"]:
                typer.echo("warning: the two tokenizers split the text differently; the "
                           "perplexities are per token of different tokenizations", err=True)
        _write_json(json_out, report)


def memory(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    random_weights: Optional[str] = typer.Option(None, "--random-weights", help=RANDOM_HELP),
    context: int = typer.Option(4096, "--context", help="Prompt tokens prefilled."),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="Decode steps after the prefill."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences."),
    prefill_step: int = typer.Option(2048, "--prefill-step",
                                     help="Prompt tokens per prefill chunk."),
    runtime: str = typer.Option("marlin-mlx", "--runtime", help="marlin-mlx or mlx-lm."),
    bits: int = typer.Option(4, "--bits", help="Random weights: bits (16 = not quantized)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Random weights."),
    fmt: str = typer.Option("affine", "--format", help="Random weights: quantization format."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
):
    """Peak memory after load, after prefilling --context tokens and during decode, split into
    weights, KV cache and the rest.

    \b
    Example:
      marlin-mlx memory -m ./Qwen3-8B-4bit --context 4096
    """
    with UserErrors():
        from marlin_mlx.memory import format_memory, profile_memory_for

        kw = dict(context=context, gen_tokens=gen_tokens, batch_size=batch_size,
                  prefill_step=prefill_step, runtime=runtime, dtype=dtype)
        if random_weights is not None:
            kw.update(bits=bits, group_size=group_size, fmt=fmt)
        report = profile_memory_for(model, random_weights, **kw)
        report["command"] = sys.argv
        typer.echo(format_memory(report))
        _write_json(json_out, report)


__all__ = ["bench", "perplexity", "memory"]
