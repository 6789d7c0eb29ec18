"""Model definitions, one file per architecture, found by `model_type`.

A module `models/<model_type>.py` that defines top-level `class ModelArgs` and `class Model` is an
architecture; adding one needs no edit here. Shared pieces (base, cache, moe, ...) define neither
and are skipped. `SUPPORTED_MODEL_TYPES` lists the architectures.
"""

import importlib
import pkgutil
import re
from pathlib import Path

_DEFINES_MODEL = re.compile(r"^class Model\b", re.M)
_DEFINES_ARGS = re.compile(r"^class ModelArgs\b", re.M)


def _is_architecture(name: str) -> bool:
    # read the source rather than import it, so listing stays cheap and never runs model code
    try:
        text = (Path(__path__[0]) / f"{name}.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return bool(_DEFINES_MODEL.search(text) and _DEFINES_ARGS.search(text))


SUPPORTED_MODEL_TYPES = tuple(sorted(
    m.name for m in pkgutil.iter_modules(__path__)
    if not m.ispkg and not m.name.startswith("_") and _is_architecture(m.name)
))


def get_model_class(model_type: str):
    """`(Model, ModelArgs)` for a config's `model_type`; ValueError naming the supported ones."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    module = importlib.import_module(f"{__name__}.{model_type}")
    return module.Model, module.ModelArgs


__all__ = ["get_model_class", "SUPPORTED_MODEL_TYPES"]
