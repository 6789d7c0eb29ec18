"""Linear layers over quantized weights, with parameter names in mlx-lm's layout.

`weight` holds packed uint32 words along the input dimension, `scales` and (for `affine`)
`biases` hold one value per group, exactly as `mx.quantize` produces them, so mlx-lm and
mlx-community checkpoints load unchanged.
"""

import mlx.core as mx
import mlx.nn as nn

# The dense layer the models use; a name of our own so the models depend on kernels/ only.
Linear = nn.Linear


class QuantizedLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, bias: bool = False,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((output_dims, input_dims))
        q = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales = q[0], q[1]
        if mode == "affine":
            self.biases = q[2]
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, bits: int = 4,
                    mode: str = "affine") -> "QuantizedLinear":
        out_dims, in_dims = linear.weight.shape
        ql = cls(in_dims, out_dims, "bias" in linear, group_size, bits, mode)
        q = mx.quantize(linear.weight, group_size=group_size, bits=bits, mode=mode)
        ql.weight, ql.scales = q[0], q[1]
        if mode == "affine":
            ql.biases = q[2]
        if "bias" in linear:
            ql.bias = linear.bias
        return ql

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self.weight, self.scales, self.get("biases"), transpose=True,
                                group_size=self.group_size, bits=self.bits, mode=self.mode)
        if "bias" in self:
            y = y + self.bias
        return y


class QuantizedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dims: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.num_embeddings, self.dims = num_embeddings, dims
        q = mx.quantize(mx.zeros((num_embeddings, dims)), group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales = q[0], q[1]
        if mode == "affine":
            self.biases = q[2]
        self.freeze()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int = 64, bits: int = 4,
                       mode: str = "affine") -> "QuantizedEmbedding":
        n, d = emb.weight.shape
        qe = cls(n, d, group_size, bits, mode)
        q = mx.quantize(emb.weight, group_size=group_size, bits=bits, mode=mode)
        qe.weight, qe.scales = q[0], q[1]
        if mode == "affine":
            qe.biases = q[2]
        return qe

    def __call__(self, ids: mx.array) -> mx.array:
        biases = self.biases[ids] if "biases" in self else None
        return mx.dequantize(self.weight[ids], self.scales[ids], biases, group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def as_linear(self, x: mx.array) -> mx.array:
        """Tied output projection: x @ embedding.T with the quantized table."""
        return mx.quantized_matmul(x, self.weight, self.scales, self.get("biases"), transpose=True,
                                   group_size=self.group_size, bits=self.bits, mode=self.mode)


def quantize_modules(model: nn.Module, group_size: int = 64, bits: int = 4, mode: str = "affine",
                     class_predicate=None) -> nn.Module:
    """Swap Linear/Embedding layers for quantized ones, in place.

    `class_predicate(path, module)` returns False to skip a layer, True to use the defaults, or a
    dict with `group_size`/`bits`/`mode` overrides (mlx-lm's per-layer quantization config).
    """
    replacements = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        choice = True if class_predicate is None else class_predicate(path, module)
        if choice is False:
            continue
        opts = {"group_size": group_size, "bits": bits, "mode": mode}
        if isinstance(choice, dict):
            opts.update({k: v for k, v in choice.items() if k in opts})
        if module.weight.shape[-1] % opts["group_size"] != 0:
            continue
        if isinstance(module, nn.Linear):
            new = QuantizedLinear.from_linear(module, **opts)
        else:
            new = QuantizedEmbedding.from_embedding(module, **opts)
        replacements.append((path, new))
    if replacements:
        model.update_modules(nn.utils.tree_unflatten(replacements))
    return model
