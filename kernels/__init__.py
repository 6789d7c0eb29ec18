"""Quantized kernels as MLX custom ops, with plain-MLX references.

Public pieces: `Linear` (dense), `QuantizedLinear`, `QuantizedEmbedding` and `quantize_modules`.
"""

from .quantized_linear import Linear, QuantizedEmbedding, QuantizedLinear, quantize_modules

__all__ = ["Linear", "QuantizedLinear", "QuantizedEmbedding", "quantize_modules"]
