"""The serving engine's paged KV cache: block manager bookkeeping, and model forwards through
`ModelRunner` (chunked prefill + batched decode over block pools) against the same model with its
ordinary contiguous cache (KVCache / MLACache)."""

import mlx.core as mx
import numpy as np
import pytest

from marlin_mlx.serving import paged_cache as pc
from marlin_mlx.serving.block_manager import ROOT_KEY, BlockManager, block_key
from marlin_mlx.serving.paged_cache import DECODE, PREFILL, ModelRunner, StepInputs
from serving_models import ARCHS, random_model

# --------------------------------------------------------------------------- block manager


def test_allocate_release_and_exhaustion():
    bm = BlockManager(4, 2)
    got = [bm.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3] and bm.num_free == 0 and bm.num_used == 4
    assert bm.allocate() is None
    bm.release(got[:2])
    assert bm.num_free == 2
    bm.check()
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release([got[0]])


def _fill(bm, tokens):
    """Allocate and register full blocks for `tokens`, as a finished prefill would."""
    blocks, parent = [], ROOT_KEY
    for i in range(len(tokens) // bm.block_size):
        b = bm.allocate()
        parent = bm.register(b, parent, tokens[i * bm.block_size : (i + 1) * bm.block_size])
        blocks.append(b)
    return blocks


def test_prefix_match_shares_blocks_with_refcounts():
    bm = BlockManager(8, 2)
    a = _fill(bm, [1, 2, 3, 4, 5, 6])
    hits, keys = bm.match_prefix([1, 2, 3, 4, 9, 9, 7], max_blocks=10)
    assert hits == a[:2]  # stops at the first block that differs
    assert keys[1] == block_key(block_key(ROOT_KEY, [1, 2])[0], [3, 4])[0]
    assert [bm.ref[b] for b in a] == [2, 2, 1]
    assert bm.match_prefix([1, 2, 3, 4], max_blocks=1)[0] == a[:1]  # capped by max_blocks
    bm.release(a[:1])
    bm.release(hits)
    bm.release(a)
    # unused but keyed: cached (count as free), and still matchable
    assert bm.num_used == 0 and bm.num_free == 8 and len(bm.lru) == 3
    again, _ = bm.match_prefix([1, 2, 3, 4, 5, 6], max_blocks=3)
    assert again == a and bm.num_used == 3
    bm.release(again)
    bm.check()


def test_same_tokens_after_a_different_prefix_do_not_match():
    bm = BlockManager(4, 2)
    _fill(bm, [1, 2, 3, 4])
    assert bm.match_prefix([9, 9, 3, 4], max_blocks=2)[0] == []


def test_lru_eviction_when_free_blocks_run_out():
    bm = BlockManager(3, 2)
    old = _fill(bm, [1, 2])
    new = _fill(bm, [5, 6])
    bm.release(old)
    bm.release(new)  # LRU order: old, then new
    assert len(bm.free) == 1 and len(bm.lru) == 2
    first = bm.allocate()  # a never-used free block goes first
    assert first not in old + new
    second = bm.allocate()  # then the least recently used cached block is evicted
    assert second == old[0]
    assert bm.match_prefix([1, 2], max_blocks=1)[0] == []  # its contents are forgotten
    hit, _ = bm.match_prefix([5, 6], max_blocks=1)
    assert hit == new
    bm.release([first, second] + hit)
    bm.check()
    assert bm.num_free == 3


def test_duplicate_content_stays_unkeyed_and_frees():
    bm = BlockManager(4, 2)
    a = _fill(bm, [1, 2])
    b = _fill(bm, [1, 2])  # computed twice concurrently: only the first is the cached copy
    bm.release(b)
    assert list(bm.free).count(b[0]) == 1 and b[0] not in bm.lru
    bm.release(a)
    assert a[0] in bm.lru
    bm.check()


# --------------------------------------------------------------------------- paged forwards


def _inputs_prefill(table, bs, tokens, start):
    n = len(tokens)
    pos = np.arange(start, start + n)
    t = np.array(table, np.int32)
    return StepInputs(PREFILL, np.array([tokens], np.int32), np.array([start], np.int32), t[None],
                      (t[pos // bs] * bs + pos % bs).astype(np.int32),
                      np.array([start + n], np.int32))


def _inputs_decode(tables, bs, tokens, positions):
    B = len(tables)
    width = max(len(t) for t in tables)
    bt = np.zeros((B, width), np.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t
    pos = np.array(positions, np.int32)
    slots = (bt[np.arange(B), pos // bs] * bs + pos % bs).astype(np.int32)
    return StepInputs(DECODE, np.array(tokens, np.int32)[:, None], pos, bt, slots, pos + 1)


@pytest.mark.filterwarnings("error:compiled decode step disabled")  # no silent fallback
@pytest.mark.parametrize("arch", ARCHS)
def test_paged_prefill_and_batched_decode_match_contiguous_cache(arch):
    """Three sequences of different lengths: chunked paged prefill, then three batched decode
    steps; the logits equal each sequence run alone with the model's own cache."""
    model = random_model(arch)
    bs = 4
    runner = ModelRunner(model, num_blocks=40, block_size=bs)
    rng = np.random.RandomState(0)
    lens = [3, 13, 22]  # 22 > the qwen3 window of 8: the window masks in prefill and decode
    prompts = [rng.randint(0, 400, n).tolist() for n in lens]
    # scattered, non-contiguous blocks per sequence
    free = rng.permutation(40).tolist()
    tables = [[free.pop() for _ in range(-(-(n + 3) // bs))] for n in lens]
    for p, t in zip(prompts, tables):
        done = 0
        while done < len(p) - 1:  # chunks of 5, leaving the last token to the decode batch
            n = min(5, len(p) - 1 - done)
            runner.forward(_inputs_prefill(t, bs, p[done : done + n], done))
            done += n
        mx.eval(runner.pool.arrays())
    seqs = [list(p) for p in prompts]
    ref_caches = [model.make_cache() for _ in prompts]
    ref_logits = [model(mx.array([p[:-1]]), cache=c) for p, c in zip(prompts, ref_caches)]
    for step in range(3):
        positions = [len(s) - 1 for s in seqs]
        logits = runner.forward(_inputs_decode(tables, bs, [s[-1] for s in seqs], positions))
        for i, s in enumerate(seqs):
            ref = model(mx.array([[s[-1]]]), cache=ref_caches[i])[0, -1]
            np.testing.assert_allclose(np.array(logits[i]), np.array(ref), rtol=1e-4, atol=1e-4)
            s.append(int(mx.argmax(ref)))
    del ref_logits


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_prefill_rows_match_contiguous_cache(arch):
    """Chunks of three sequences in one prefill forward (`pack_prefill`), once padded to the
    GPU's shape buckets (a padding row, longer rows, a wider block table) and once exact, the
    second step starting after cached tokens; then a batched decode step equals each sequence
    run alone with the model's own cache (GLM: latent cache; qwen3: window 8 masks in prefill)."""
    model = random_model(arch)
    bs, scratch = 4, 39
    runner = ModelRunner(model, num_blocks=40, block_size=bs)
    rng = np.random.RandomState(3)
    lens = [5, 17, 23]
    prompts = [rng.randint(0, 400, n).tolist() for n in lens]
    free = rng.permutation(39).tolist()
    tables = [[free.pop() for _ in range(-(-(n + 1) // bs))] for n in lens]
    done = [0, 0, 0]
    for chunk, budget in ((9, 64), (16, None)):  # bucketed shapes (padding), then exact ones
        idx = [i for i in range(3) if lens[i] - 1 > done[i]]
        rows = [(prompts[i], done[i], min(chunk, lens[i] - 1 - done[i]), tables[i]) for i in idx]
        inputs = pc.pack_prefill(rows, bs, scratch, budget)
        if budget:  # rows 9 -> 16 tokens, 3 -> 4 rows, context -> 256 tokens
            assert inputs.token_ids.shape == (4, 16) and inputs.block_tables.shape == (4, 64)
        for i, (_, _, n, _) in zip(idx, rows):
            done[i] += n
        runner.forward(inputs)
        mx.eval(runner.pool.arrays())
    assert done == [n - 1 for n in lens]
    ref_caches = [model.make_cache() for _ in prompts]
    for p, c in zip(prompts, ref_caches):
        model(mx.array([p[:-1]]), cache=c)
    logits = runner.forward(_inputs_decode(tables, bs, [p[-1] for p in prompts],
                                           [n - 1 for n in lens]))
    for i, p in enumerate(prompts):
        ref = model(mx.array([[p[-1]]]), cache=ref_caches[i])[0, -1]
        np.testing.assert_allclose(np.array(logits[i]), np.array(ref), rtol=1e-4, atol=1e-4)


def test_paged_ops_fall_back_to_plain_mlx(monkeypatch):
    """The plain-MLX path of paged_cache (used when kernels/paged_attention.py is absent) gives
    the same logits as the kernel module's path."""
    model = random_model("llama")
    outs = []
    for ops in (pc._ops, None):
        monkeypatch.setattr(pc, "_ops", ops)
        runner = ModelRunner(model, num_blocks=8, block_size=4)
        runner.forward(_inputs_prefill([5, 2, 7], 4, list(range(1, 10)), 0))
        outs.append(runner.forward(_inputs_decode([[5, 2, 7]], 4, [10], [9])))
    np.testing.assert_allclose(np.array(outs[0]), np.array(outs[1]), rtol=1e-5, atol=1e-5)


def test_paged_ops_reference_semantics():
    rng = np.random.RandomState(1)
    cache = mx.array(rng.randn(6, 2, 4, 8).astype(np.float32))
    entries = mx.array(rng.randn(3, 2, 8).astype(np.float32))
    slots = mx.array([1, 13, 22], mx.int32)
    out = np.array(pc.write_paged_ref(mx.array(cache), entries, slots))
    want = np.array(cache).copy()
    for t, s in enumerate([1, 13, 22]):
        want[s // 4, :, s % 4] = np.array(entries[t])
    np.testing.assert_array_equal(out, want)
    g = np.array(pc.gather_paged_ref(mx.array(out), mx.array([5, 0], mx.int32), 6))
    np.testing.assert_array_equal(g[0], np.concatenate([want[5], want[0][:, :2]], axis=1))
    rows = np.array(pc.gather_paged_ref(mx.array(out), mx.array([[5, 0], [2, 4]], mx.int32), 8))
    assert rows.shape == (2, 2, 8, 8)
    np.testing.assert_array_equal(rows[1], np.concatenate([want[2], want[4]], axis=1))


# --------------------------------------------------------------------------- prefill rows


def _scheduled(prompt_lens, chunk):
    from marlin_mlx.serving.scheduler import Scheduler, Sequence
    sched = Scheduler(BlockManager(256, 16), max_batch_size=32, prefill_chunk=chunk)
    for i, n in enumerate(prompt_lens):
        sched.add(Sequence(f"r{i}", n, 8, list(range(1, n + 1)), i))
    return [n for _, n in sched.schedule().prefill]


def test_prefill_rows_pick_the_row_length_that_computes_most():
    assert _scheduled([1000, 20, 20], 512) == [512]  # one long prompt: one full row
    assert _scheduled([501, 13], 512) == [500]  # 256 + 12 would compute less
    assert _scheduled([201, 151, 101], 512) == [128, 128, 100]  # 356 tokens in 4 rows of 128
    assert _scheduled([31] * 40, 512) == [16] * 32  # 32 rows of 16 beat 16 rows of 30 (480)
    assert _scheduled([2], 512) == [1]  # the last token is left to the decode step
    assert _scheduled([5, 9], 8) == [4]  # below the shortest bucket: one row of the budget


def test_prefill_groups_bound_the_gathered_context():
    rows = [([0] * 9000, 8990, 10, []), ([0] * 40, 0, 40, []), ([0] * 9000, 8980, 16, []),
            ([0] * 100, 0, 99, [])]
    sizes = lambda gs: [[r[2] for r in g] for g in gs]  # noqa: E731
    assert sizes(pc.prefill_groups(rows, 1 << 16)) == [[10, 40, 16, 99]]
    assert sizes(pc.prefill_groups(rows, 18000)) == [[10, 40], [16, 99]]  # 3 x 9000 > 18000
    assert sizes(pc.prefill_groups(rows, 100)) == [[10], [40], [16], [99]]  # alone if too long
