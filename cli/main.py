"""The `marlin-mlx` command line: thin typer commands over the runtime.

Heavy imports (mlx, transformers) happen inside the commands so that `--help` is instant.
User errors (a bad path, a broken checkpoint, an option out of range) print one line
`error: ...` on stderr and exit with status 1; typer's own usage errors exit with 2.
Set MARLIN_MLX_DEBUG=1 to get the full traceback of an unexpected error instead.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from .common import UserErrors, fail, one_line

app = typer.Typer(
    name="marlin-mlx",
    help=(
        "MLX-native LLM runtime with Marlin-style quantized kernels (Metal, CUDA; CPU through "
        "reference paths).\n\n"
        "\b\nExamples:\n"
        "  marlin-mlx generate --prompt 'Once upon a time'\n"
        "  marlin-mlx generate -m ./Qwen3-0.6B -p 'Hello' --temp 0.7 --top-p 0.9\n"
        "  marlin-mlx doctor\n\n"
        "Run 'marlin-mlx COMMAND --help' for a command's options."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rich truncates long option names at 80 columns
    context_settings={"help_option_names": ["-h", "--help"]},
)




def _version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import marlin_mlx

    parts = [f"marlin-mlx {marlin_mlx.__version__}"]
    for dist in ("mlx", "mlx-lm"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return parts[0] + " (" + ", ".join(parts[1:]) + ")"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(_version_text())
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version_callback,
        is_eager=True,
    ),
) -> None:
    """MLX-native LLM runtime with Marlin-style quantized kernels."""


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):  # `echo ... |` adds one
            prompt = prompt[:-1]
    if not prompt.strip():
        fail("the prompt is empty")
    return prompt


def _resolve_model(model: Optional[str]) -> str:
    if model is not None:
        return model
    from marlin_mlx.bundled import default_model_path

    path = default_model_path()
    if path is None:
        fail("no bundled default model in this build; pass --model PATH_OR_HF_REPO")
    return str(path)


_DTYPES = ("float32", "float16", "bfloat16")


def _dtype_choice(value):
    if value is not None and value not in _DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(_DTYPES)}, got {value!r}")
    return value


def _positive(value, name):
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{name} must be > 0, got {value}")
    return value


def _below_one(value, name):
    if value is not None and value >= 1:
        raise typer.BadParameter(f"{name} must be < 1, got {value}")
    return value


@app.command(short_help="Generate text from a prompt, streaming it, then statistics.")
def generate(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", metavar="PATH|REPO",
        help="Model folder (HF or mlx-lm format) or Hugging Face repo id. "
        "Default: the demo model bundled with marlin-mlx.",
    ),
    prompt: str = typer.Option(
        ..., "--prompt", "-p", metavar="TEXT", help="The prompt text; '-' reads it from stdin."
    ),
    max_tokens: int = typer.Option(
        256, "--max-tokens", "-n", min=1, metavar="N", help="Most tokens to generate."
    ),
    temp: Optional[float] = typer.Option(
        None, "--temp", min=0.0, show_default=False,
        help="Sampling temperature; 0 is greedy. [default: 0, or the model's generation_config]",
    ),
    top_p: Optional[float] = typer.Option(
        None, "--top-p", max=1.0, callback=lambda v: _positive(v, "--top-p"), show_default=False,
        help="Nucleus sampling: keep the most likely tokens up to this probability mass. "
        "[default: 1 (off), or the model's generation_config]",
    ),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", min=0, show_default=False,
        help="Keep only the k most likely tokens. [default: 0 (off), or the model's]",
    ),
    min_p: Optional[float] = typer.Option(
        None, "--min-p", min=0.0, callback=lambda v: _below_one(v, "--min-p"), show_default=False,
        help="Drop tokens less likely than min-p times the most likely one. "
        "[default: 0 (off), or the model's]",
    ),
    repetition_penalty: Optional[float] = typer.Option(
        None, "--repetition-penalty", callback=lambda v: _positive(v, "--repetition-penalty"),
        help="Penalty (>1 discourages) for tokens in the recent context. "
        "[default: the model's generation_config, else off]",
    ),
    repetition_context_size: int = typer.Option(
        20, "--repetition-context-size", min=1, help="How many recent tokens the penalty sees."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat",
        help="Wrap the prompt in the tokenizer's chat template. Default: on when it has one.",
    ),
    system: Optional[str] = typer.Option(None, "--system", metavar="TEXT", help="System message (chat mode)."),
    stop: Optional[List[str]] = typer.Option(
        None, "--stop", metavar="TEXT", help="Stop when the text contains this string (repeatable)."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", callback=_dtype_choice,
        help=f"Compute dtype ({', '.join(_DTYPES)}); default: float32 on CPU, "
        "the checkpoint's on a GPU.",
    ),
    verbose: bool = typer.Option(
        True, "--verbose/--quiet", "-v/-q",
        help="Print separators and statistics (prompt and generation tok/s, peak memory), "
        "or only the generated text.",
    ),
    distributed: bool = typer.Option(
        False, "--distributed",
        help="Tensor-parallel across the processes started by `mlx.launch` (each loads its "
        "shard; rank 0 prints), e.g. `mlx.launch --backend ring -n 2 -- marlin-mlx generate "
        "... --distributed`.",
    ),
) -> None:
    """Generate text from a prompt, streaming it to stdout, then print statistics.

    \b
    Examples:
      marlin-mlx generate --prompt "Once upon a time"
      marlin-mlx generate -m ./my-qwen3 -p "Write a haiku" --temp 0.7 --top-p 0.9 --seed 1
      echo "Summarize: ..." | marlin-mlx generate -m ./my-llama -p - --no-chat -q
    """
    with UserErrors():
        if system is not None and chat is False:
            fail("--system needs chat mode; drop --no-chat")
        text = _read_prompt(prompt)
        path = _resolve_model(model)

        from marlin_mlx.loader import load, sampling_defaults

        group = None
        if distributed:
            import os

            from marlin_mlx.distributed import broadcast_int, init

            group = init()
            if group.size() == 1:
                typer.echo("note: --distributed in a single process (start it with mlx.launch)",
                           err=True)
            # every rank must sample the same token: one seed, rank 0's
            own = seed if seed is not None else int.from_bytes(os.urandom(3), "little")
            seed = broadcast_int(own, group)
            if group.rank() > 0:
                verbose = False
        mdl, tokenizer = load(path, dtype=dtype, group=group)
        # options left unset take the checkpoint's recommendation (generation_config.json),
        # as transformers does; the bundled demo model asks for a repetition penalty there
        given = {"temperature": temp, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                 "repetition_penalty": repetition_penalty}
        sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                    "repetition_penalty": None}
        sampling.update(sampling_defaults(path))
        sampling.update({k: v for k, v in given.items() if v is not None})
        # imported after loading: it pulls in transformers, slow to import, and a bad model
        # path should fail fast
        from marlin_mlx.generation import (
            chat_prompt,
            encode_prompt,
            format_stats,
            has_chat_template,
            stream_generate,
        )
        templated = has_chat_template(tokenizer)
        if chat and not templated:
            fail(f"--chat: the tokenizer of {path} has no chat template")
        if chat is None:
            chat = templated
        if system is not None and not chat:
            fail(f"--system: the tokenizer of {path} has no chat template")
        ids = chat_prompt(tokenizer, text, system) if chat else encode_prompt(tokenizer, text)

        if verbose:
            typer.echo("=" * 10)
        response = None
        out = sys.stdout
        if group is not None and group.rank() > 0:
            out = open(os.devnull, "w")  # the other ranks compute in step, silently
        for response in stream_generate(
            mdl, tokenizer, ids, max_tokens, **sampling,
            repetition_context_size=repetition_context_size, seed=seed, stop=stop or None,
        ):
            if response.text:
                out.write(response.text)
                out.flush()
        out.write("\n")
        if verbose:
            typer.echo("=" * 10)
            if response is not None:
                typer.echo(format_stats(response))


# Measurement commands live in cli/bench.py (their own module); registered here so that
# `marlin-mlx --help` lists them after generate.
from .bench import bench, memory, perplexity  # noqa: E402  (light: heavy imports are inside)

from .convert import convert  # noqa: E402

app.command(name="convert")(convert)
app.command(name="bench")(bench)
app.command(name="perplexity")(perplexity)
app.command(name="memory")(memory)

from .serve import serve  # noqa: E402  (light: starlette/uvicorn are imported inside)

app.command(name="serve", short_help="Serve a model over an OpenAI-compatible HTTP API.")(serve)


def _device_lines() -> List[tuple]:
    import platform

    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        backend = "gpu (metal)" if mx.metal.is_available() else "gpu (cuda)"
    else:
        backend = "cpu"
    try:
        info = mx.device_info(dev)
    except Exception:  # older MLX or a backend without device info
        info = {}
    name = info.get("device_name") or platform.processor() or platform.machine()
    rows = [("mlx", mx.__version__), ("backend", backend), ("device", str(name))]
    mem = info.get("total_memory") or info.get("memory_size")
    if mem:
        rows.append(("device memory", f"{int(mem) / 2**30:.1f} GiB"))
    return rows


def _table(rows: List[dict], columns: List[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*columns), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


@app.command(short_help="Check versions, MLX backend and device, kernel self-tests.")
def doctor() -> None:
    """Check the installation: versions, MLX backend and device, kernel self-tests.

    \b
    Prints the MLX version, the backend (cpu, or gpu through metal or cuda), the device name,
    the bundled default model, and the table of kernel self-tests (op, format, self_test,
    chosen_path, detail) when the kernels provide one. Exits with 1 when a self-test failed.
    """
    with UserErrors():
        import platform

        rows = [("marlin-mlx", _version_text().split(" ", 2)[1]),
                ("python", platform.python_version()),
                ("platform", platform.platform())]
        rows += _device_lines()
        from marlin_mlx.bundled import default_model_path

        bundled = default_model_path()
        rows.append(("default model", str(bundled) if bundled else "none bundled (use --model)"))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            typer.echo(f"{key:<{width}}  {value}")

        from marlin_mlx import kernels

        report_fn = getattr(kernels, "doctor_report", None)
        typer.echo("")
        if report_fn is None:
            typer.echo("kernels: no self-test report (marlin_mlx.kernels has no doctor_report yet)")
            return
        try:
            report = list(report_fn())
        except Exception as exc:
            fail(f"kernel self-test report failed: {type(exc).__name__}: {one_line(exc)}")
        if not report:
            typer.echo("kernels: the self-test report is empty")
            return
        columns = ["op", "format", "self_test", "chosen_path", "detail"]
        typer.echo(_table(report, columns))
        failed = [r for r in report if str(r.get("self_test", "")).lower() in ("fail", "failed", "false")]
        if failed:
            fail(f"{len(failed)} kernel self-test(s) failed")


@app.command()
def version() -> None:
    """Print the versions of marlin-mlx, MLX and mlx-lm."""
    typer.echo(_version_text())


if __name__ == "__main__":
    app(prog_name="marlin-mlx")
