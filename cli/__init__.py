"""The `marlin-mlx` command line (typer)."""
