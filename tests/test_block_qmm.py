"""block_qmm (kernels/block_qmm.py): quantized expert products over 64-row expert blocks,
against a float64 NumPy reference; the Metal rendering on the CPU emulator (CI), the CUDA build
on a GPU (`-m gpu`), the MLX reference path everywhere."""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import block_qmm as bq
from marlin_mlx.kernels import launch, moe_experts

import test_moe_kernels as tmk  # its float64 expert oracle and routing helpers

TOL = {mx.float16: 4e-3, mx.bfloat16: 2e-2}


def _stack(E, N, K, bits, gs, sdt, seed):
    mx.random.seed(seed)
    w = mx.random.normal((E, N, K)) * 0.05
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    return q, s.astype(sdt), b.astype(sdt)


def _inputs(E, N, K, bits, gs, dt, nb, gated, seed=0):
    stacks = tuple(_stack(E, N, K, bits, gs, dt, seed + i) for i in range(2 if gated else 1))
    mx.random.seed(seed + 7)
    x = mx.random.normal((nb * bq.BLOCK, K)).astype(dt)
    owner = mx.array(np.random.default_rng(seed).integers(0, E, nb).astype(np.uint32))
    return x, owner, stacks


def _reference64(x, owner, stacks, gs, bits, used):
    xs = np.array(x.astype(mx.float32)).astype(np.float64).reshape(-1, bq.BLOCK, x.shape[-1])
    outs = []
    for w, s, b in stacks:
        dense = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32),
                                       group_size=gs, bits=bits)).astype(np.float64)
        outs.append(np.einsum("bmk,bnk->bmn", xs[:used], dense[np.array(owner)[:used]]))
    if len(outs) == 2:
        return outs[0] / (1 + np.exp(-outs[0])) * outs[1]
    return outs[0]


def _rel_err(y, ref, used):
    y = np.array(y.astype(mx.float32)).astype(np.float64).reshape(-1, bq.BLOCK, ref.shape[-1])
    y = y[:used]
    assert np.isfinite(y).all()
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


CASES = [  # E, N, K, bits, gs, dtype, blocks, used, gated
    (3, 40, 160, 4, 32, mx.bfloat16, 3, 2, True),   # magic decode, N and K tails, a spare block
    (2, 24, 128, 3, 64, mx.float16, 2, 2, False),   # float decode, codes across words
    (2, 16, 256, 8, 64, mx.float16, 1, 1, True),    # 8-bit magic decode (float16)
]


@pytest.mark.parametrize("E,N,K,bits,gs,dt,nb,used,gated", CASES)
def test_block_qmm_on_cpu_emulator(E, N, K, bits, gs, dt, nb, used, gated, tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    x, owner, stacks = _inputs(E, N, K, bits, gs, dt, nb, gated)
    spec, template, grid, tg, oshape = bq.plan(x, stacks, gs, bits)
    meta = mx.array([used], dtype=mx.int32)
    y = metal_emulator.emulate([dict(spec=spec, inputs=[x, owner, meta] + [a for t in stacks for a in t],
                                     template=template, grid=grid, threadgroup=tg,
                                     output_shapes=[oshape], output_dtypes=[dt])], tmp_path)[0]
    assert y.shape == (nb * bq.BLOCK, N)
    assert _rel_err(y, _reference64(x, owner, stacks, gs, bits, used), used) < TOL[dt]


@pytest.mark.parametrize("gated", [False, True])
def test_block_qmm_reference_path(gated):
    # no GPU: the public op takes MLX's dequantize + gather_mm over the same blocks
    x, owner, stacks = _inputs(4, 48, 128, 4, 64, mx.float16, 3, gated, seed=3)
    with mx.stream(mx.cpu):
        y = bq.block_qmm(x, owner, mx.array([3], mx.int32), stacks, 64, 4)
    assert _rel_err(y, _reference64(x, owner, stacks, 64, 4, 3), 3) < TOL[mx.float16]


def test_block_qmm_rejects_bad_shapes():
    x, owner, stacks = _inputs(2, 16, 64, 4, 32, mx.float16, 2, False)
    with pytest.raises(ValueError, match="owner"):
        bq.block_qmm(x[:100], owner, mx.array([2], mx.int32), stacks, 32, 4)
    with pytest.raises(ValueError, match="stacks"):
        bq.block_qmm(x, owner, mx.array([2], mx.int32), stacks * 3, 32, 4)
    assert not bq.supported(mx.float32, 64, stacks, 32, 4)   # 16-bit activations only
    assert not bq.supported(mx.float16, 64, stacks, 48, 4)   # group not a multiple of 32
    assert not bq.supported(mx.float16, 96, stacks, 32, 4)   # K not the stacks'
    assert bq.supported(mx.float16, 64, stacks, 32, 4)


def test_prefill_quant_blocks_routes_through_block_qmm(monkeypatch):
    # 16-bit activations take block_qmm (its MLX reference here, the kernel on a GPU): blocks
    # of 64 rows, busy experts over several blocks, spare blocks past the used count
    calls = []
    real = bq.block_qmm
    monkeypatch.setattr(bq, "block_qmm",
                        lambda *a, **kw: calls.append(len(a[3])) or real(*a, **kw))
    mx.random.seed(5)
    E, D, I, n, k = 8, 128, 64, 90, 3
    gate, up, down = tmk._experts(E, D, I, 4, 64, mx.float16)
    x = mx.random.normal((n, D)).astype(mx.float16)
    inds = tmk._uneven_routing(np.random.default_rng(5), n, k, E)
    assert np.bincount(np.array(inds).ravel()).max() > 64
    w = mx.softmax(mx.random.normal((n, k)), axis=-1)
    y = moe_experts.switch_glu_prefill(x, inds, w, gate, up, down, 64, 4, variant="quant_blocks")
    ref = tmk.experts64(x, inds, w, gate, up, down, 4, 64)
    assert calls == [2, 1] and y.dtype == mx.float16
    assert np.linalg.norm(tmk._f64(y) - ref) / np.linalg.norm(ref) < 5e-3


GPU_CASES = [  # GLM-4.7-Flash's experts (gate/up gated, down), Qwen3-30B-A3B's, odd ones
    (8, 1536, 2048, 4, 64, mx.bfloat16, 6, 5, True),
    (8, 2048, 1536, 4, 64, mx.bfloat16, 6, 6, False),
    (8, 768, 2048, 4, 64, mx.float16, 4, 3, True),
    (4, 200, 160, 3, 32, mx.bfloat16, 3, 3, False),
    (4, 136, 256, 8, 128, mx.bfloat16, 3, 2, True),
    (4, 128, 512, 2, 64, mx.float16, 2, 2, False),
    (4, 96, 384, 6, 64, mx.float16, 2, 2, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("E,N,K,bits,gs,dt,nb,used,gated", GPU_CASES)
def test_block_qmm_on_gpu(E, N, K, bits, gs, dt, nb, used, gated, monkeypatch):
    if launch.backend() is None:
        pytest.skip("no GPU backend")
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, owner, stacks = _inputs(E, N, K, bits, gs, dt, nb, gated, seed=11)
    assert bq.supported(x.dtype, K, stacks, gs, bits)
    y = bq.block_qmm_kernel(x, owner, mx.array([used], mx.int32), stacks, gs, bits)
    assert _rel_err(y, _reference64(x, owner, stacks, gs, bits, used), used) < TOL[dt]
