"""Quantized kernels as MLX custom ops, with plain-MLX references.

Public pieces: `Linear` (dense), `QuantizedLinear`, `QuantizedEmbedding`, `quantize_modules`,
`quantized_matmul` (the op QuantizedLinear dispatches through), `swiglu` (an MLP's
silu(gate(x)) * up(x), fused for quantized layers) and
`doctor_report()` (each kernel's self-test result and chosen path on this backend).
"""

from .quantized_linear import (Linear, QuantizedEmbedding, QuantizedLinear, doctor_report,
                               quantize_modules, quantized_matmul, swiglu)

__all__ = ["Linear", "QuantizedLinear", "QuantizedEmbedding", "quantize_modules",
           "quantized_matmul", "swiglu", "doctor_report"]
# the op modules: marlin_mlx.kernels.qmv (fused GEMV), .dequantize, .formats, .selection,
# .fused_linear and .qk_rope (decode-step fusions the models call), ...
