"""What every command shares: one `error:` line for what the user can fix, never a traceback."""

import os

import typer


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class UserErrors:
    """Turn errors into one `error:` line and exit status 1 (no traceback).

    MarlinError and ValueError carry messages written for the user. Anything else is a bug or
    an environment problem: still one line, with its type. MARLIN_MLX_DEBUG=1 lets every
    error through with its traceback.
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, SystemExit)):
            return False
        if isinstance(exc, KeyboardInterrupt):
            typer.echo("", err=True)
            raise typer.Exit(130)
        if isinstance(exc, BrokenPipeError):  # e.g. `marlin-mlx generate ... | head -1`
            raise typer.Exit(0)
        if os.environ.get("MARLIN_MLX_DEBUG"):
            return False
        from marlin_mlx.errors import MarlinError

        if isinstance(exc, (MarlinError, ValueError)):
            fail(one_line(exc))
        fail(f"{type(exc).__name__}: {one_line(exc)} (set MARLIN_MLX_DEBUG=1 for a traceback)")
