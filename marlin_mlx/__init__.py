"""marlin-mlx: an MLX-native LLM runtime with Marlin-style quantized kernels."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import marlin_mlx` stays cheap (the CLI imports it for --help).
    # importlib, not `from . import x`: the latter probes the package with hasattr and re-enters here
    import importlib

    if name == "load":
        return importlib.import_module(".loader", __name__).load
    if name in ("generate", "stream_generate"):
        return getattr(importlib.import_module(".generation", __name__), name)
    raise AttributeError(f"module 'marlin_mlx' has no attribute {name!r}")


__all__ = ["load", "generate", "stream_generate", "__version__"]
