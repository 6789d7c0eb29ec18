"""`marlin-mlx serve`: the OpenAI-compatible HTTP server (registered in cli/main.py)."""

from __future__ import annotations

from typing import Optional

import typer

from .common import UserErrors, fail

_SCHEDULERS = ("fifo", "sjf")


def serve(
    model: Optional[str] = typer.Argument(
        None, metavar="MODEL",
        help="Model folder (HF or mlx-lm format) or Hugging Face repo id. "
        "Default: the demo model bundled with marlin-mlx.",
    ),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", min=1,
                                       help="Most requests decoded together in one step."),
    num_kv_blocks: Optional[int] = typer.Option(
        None, "--num-kv-blocks", min=1, show_default=False,
        help="KV cache blocks in the pool. [default: sized by the engine from memory]"),
    block_size: int = typer.Option(16, "--block-size", min=1, help="Tokens per KV cache block."),
    max_waiting_time: float = typer.Option(
        0.05, "--max-waiting-time", min=0.0,
        help="Seconds the scheduler may wait to gather new requests into a batch."),
    scheduler: str = typer.Option(
        "fifo", "--scheduler", metavar="fifo|sjf",
        help="Admission order: first come first served, or shortest job first."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", metavar="KEY", envvar="MARLIN_MLX_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every route except /health."),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", min=1, show_default=False,
        help="Most tokens (prompt + completion) per request. [default: the model's context]"),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", min=1,
                                      help="Prompt tokens per prefill step, interleaved with "
                                      "decode steps of the running requests."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache",
                                      help="Share the KV blocks of common prompt prefixes."),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", metavar="NAME", show_default=False,
        help="The model id clients send and /v1/models lists. [default: MODEL as given, or "
        "the bundled model's folder name]"),
    log_level: str = typer.Option("info", "--log-level",
                                  help="uvicorn log level: critical, error, warning, info, debug."),
    distributed: bool = typer.Option(
        False, "--distributed",
        help="Tensor-parallel across the processes started by mlx.launch (each loads its "
        "shard; rank 0 serves), e.g. mlx.launch --backend ring -n 2 -- marlin-mlx serve M "
        "--distributed"),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    \b
    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions
    (streaming with "stream": true), GET /health, GET /metrics (Prometheus text).
    \b
    Examples:
      marlin-mlx serve                                  # the bundled demo model on :8000
      marlin-mlx serve ./Qwen3-8B-4bit --port 8080 --max-batch-size 64 --api-key s3cret
      curl localhost:8000/v1/completions -H 'content-type: application/json' \\
           -d '{"model": "demo-base-4bit", "prompt": "Once upon a time", "max_tokens": 32}'
    """
    with UserErrors():
        try:
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            fail('serving needs the serve extra: pip install "marlin-mlx[serve]"')
        if scheduler not in _SCHEDULERS:
            fail(f"--scheduler must be fifo or sjf, got {scheduler!r}")
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            fail(f"--log-level must be critical, error, warning, info or debug, got {log_level!r}")
        if api_key is not None and not api_key.strip():
            fail("--api-key is empty")
        if model is None:
            from marlin_mlx.bundled import default_model_path

            path = default_model_path()
            if path is None:
                fail("no bundled default model in this build; pass MODEL (a folder or repo id)")
            model, name = str(path), path.name
        else:
            name = model
        if not distributed:  # the other ranks of a distributed run do not bind
            _check_port(host, port)
        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach "
                       "this port can use the model", err=True)

        from marlin_mlx.serving.server import serve as run_server

        typer.echo(f"marlin-mlx serve: loading {model}", err=True)
        run_server(model, host=host, port=port, model_name=served_model_name or name,
                   max_batch_size=max_batch_size, num_kv_blocks=num_kv_blocks,
                   block_size=block_size, max_waiting_time=max_waiting_time,
                   scheduler=scheduler, api_key=api_key, max_model_len=max_model_len,
                   prefill_chunk=prefill_chunk, enable_prefix_cache=prefix_cache,
                   log_level=log_level, distributed=distributed)


def _check_port(host: str, port: int) -> None:
    """Fail in one line before loading the model when the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        fail(f"--host {host!r}: cannot resolve ({e.strerror})")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            fail(f"cannot listen on {host}:{port}: {e.strerror}")
