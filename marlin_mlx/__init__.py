"""marlin-mlx: an MLX-native LLM runtime with Marlin-style quantized kernels."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import marlin_mlx` stays cheap (the CLI imports it for --help).
    if name == "load":
        from .loader import load

        return load
    if name in ("generate", "stream_generate"):
        from . import generate as _g

        return getattr(_g, name)
    raise AttributeError(f"module 'marlin_mlx' has no attribute {name!r}")


__all__ = ["load", "generate", "stream_generate", "__version__"]
