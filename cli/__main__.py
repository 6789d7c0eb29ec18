"""`python -m marlin_mlx.cli` runs the `marlin-mlx` command line."""

from .main import app

app(prog_name="marlin-mlx")
