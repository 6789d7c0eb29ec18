"""The demo model shipped inside the package, the default of `marlin-mlx generate`."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "demo_models"
DEFAULT_MODEL = "demo-base-4bit"


def default_model_path() -> Path | None:
    """Path of the bundled default model, or None when this build ships none."""
    path = BUNDLED_DIR / DEFAULT_MODEL
    return path if (path / "config.json").is_file() else None
