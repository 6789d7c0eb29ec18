"""The continuous-batching engine (marlin_mlx.serving.engine) on CPU, against
`marlin_mlx.generation` on the same model: greedy tokens, seeded sampling, stop strings, batching
invariance, prefix caching, preemption under block pressure, aborts, scheduling order, bad input."""

import threading

import numpy as np
import pytest

from marlin_mlx.bundled import default_model_path
from marlin_mlx.generation import generate, stream_generate
from marlin_mlx.loader import load, load_tokenizer
from marlin_mlx.serving.engine import Engine, Event, SamplingParams
from serving_models import random_model

TIMEOUT = 120


class Collector:
    """on_event target: gathers each request's events; `wait` blocks until all have finished."""

    def __init__(self):
        self.events = {}
        self.done = {}
        self.order = []  # request ids in finishing order
        self.cv = threading.Condition()

    def __call__(self, ev: Event):
        with self.cv:
            self.events.setdefault(ev.request_id, []).append(ev)
            if ev.finish_reason is not None:
                assert ev.request_id not in self.done, "two final events"
                self.done[ev.request_id] = ev
                self.order.append(ev.request_id)
                self.cv.notify_all()

    def wait(self, rids):
        with self.cv:
            assert self.cv.wait_for(lambda: all(r in self.done for r in rids), TIMEOUT)

    def tokens(self, rid):
        return [t for e in self.events[rid] for t in e.token_ids]

    def text(self, rid):
        return "".join(e.text for e in self.events[rid])


def run(engine, prompts, params):
    """Submit all prompts at once (one params or a list), wait, return (collector, ids)."""
    col = Collector()
    plist = params if isinstance(params, list) else [params] * len(prompts)
    rids = [engine.submit(p, sp, col) for p, sp in zip(prompts, plist)]
    col.wait(rids)
    return col, rids


def reference(model, tok, prompt, n, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, **kw)]


def prompts_of(n, seed=0, lo=1, hi=30):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 390, rng.randint(lo, hi + 1)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(make_checkpoint):
    return load_tokenizer(make_checkpoint("llama"))


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen3_moe", "glm4_moe_lite"])
def model_tok(request, make_checkpoint, tokenizer):
    arch = request.param
    if arch in ("llama", "qwen3"):  # real HF checkpoints through the loader
        return load(make_checkpoint(arch))
    return random_model(arch), tokenizer


@pytest.fixture
def engine_of():
    started = []

    def make(model, tok, **kw):
        eng = Engine(model, tok, **kw)
        eng.start()
        started.append(eng)
        return eng

    yield make
    for eng in started:
        eng.stop()


@pytest.mark.parametrize("chunk,pad", [(8, False), (32, True)])
def test_greedy_equals_generate(model_tok, engine_of, chunk, pad):
    model, tok = model_tok
    prompts = prompts_of(5, lo=1, hi=30)
    # small blocks and chunks: prompts span several blocks and several prefill steps; with 32,
    # chunks of several prompts share a forward, padded to the GPU's shape buckets
    eng = engine_of(model, tok, block_size=4, prefill_chunk=chunk, max_waiting_time=0.01,
                    pad_prefill=pad)
    col, rids = run(eng, prompts, SamplingParams(max_tokens=12, temperature=0))
    for p, rid in zip(prompts, rids):
        want = reference(model, tok, p, 12)
        assert col.tokens(rid) == want
        ev = col.done[rid]
        assert ev.finish_reason == ("stop" if want[-1] in tok.eos_token_ids else "length")
        assert (ev.prompt_tokens, ev.completion_tokens) == (len(p), len(want))
    assert eng.metrics()["kv_blocks_used"] == 0


def test_sixteen_concurrent_requests_match_each_alone(tokenizer, engine_of):
    model = random_model("llama", seed=3)
    prompts = prompts_of(16, seed=5, lo=1, hi=40)
    # different lengths: sequences leave the batch at different steps
    params = [SamplingParams(max_tokens=4 + (7 * i) % 13, temperature=0) for i in range(16)]
    eng = engine_of(model, tokenizer, block_size=8, max_batch_size=16)
    together, rids = run(eng, prompts, params)
    assert eng.metrics()["requests_finished_total"] == 16
    for p, sp, rid in zip(prompts, params, rids):
        alone, (one,) = run(eng, [p], sp)
        assert together.tokens(rid) == alone.tokens(one)
        assert together.tokens(rid) == reference(model, tokenizer, p, sp.max_tokens)


def test_seeded_sampling_is_reproducible_and_matches_generate(tokenizer, engine_of):
    model = random_model("qwen3", seed=1)
    eng = engine_of(model, tokenizer, block_size=4)
    p = prompts_of(1, seed=9)[0]
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    others = prompts_of(5, seed=10)  # the same request in a batch with other sampled requests
    col, rids = run(eng, [p] + others,
                    [sp] + [SamplingParams(max_tokens=12, seed=i) for i in range(5)])
    alone, (one,) = run(eng, [p], sp)
    want = reference(model, tokenizer, p, 12, temperature=0.9, top_p=0.95, seed=1234)
    assert col.tokens(rids[0]) == alone.tokens(one) == want
    other_seed, (o,) = run(eng, [p], SamplingParams(max_tokens=12, temperature=0.9, seed=99))
    assert other_seed.tokens(o) != want


def test_prefix_cache_reuses_blocks_with_identical_output(tokenizer, engine_of):
    model = random_model("glm4_moe_lite", seed=2)
    eng = engine_of(model, tokenizer, block_size=4, num_kv_blocks=64)
    shared = prompts_of(1, seed=11, lo=22, hi=22)[0]
    params = SamplingParams(max_tokens=8, temperature=0)
    first, (a,) = run(eng, [shared + [7, 8]], params)
    assert eng.metrics()["prefix_cache_hit_tokens"] == 0
    used_before = eng.blocks.num_used
    second, (b, c) = run(eng, [shared + [7, 8], shared + [9]], params)
    # 24 and 23 tokens: 5 full blocks of the first prompt are reused by both
    assert eng.metrics()["prefix_cache_hit_tokens"] == 2 * 20
    assert second.tokens(b) == first.tokens(a)
    assert second.tokens(c) == reference(model, tokenizer, shared + [9], 8)
    assert used_before == eng.blocks.num_used == 0
    eng.blocks.check()


def test_more_requests_than_blocks_all_complete_with_preemption(tokenizer, engine_of):
    model = random_model("qwen3_moe", seed=4)
    prompts = prompts_of(10, seed=12, lo=10, hi=24)
    # each request needs up to 10 blocks of 4 tokens; 24 blocks cannot hold all 10 at once
    eng = engine_of(model, tokenizer, block_size=4, num_kv_blocks=24, max_batch_size=10,
                    prefill_chunk=16)
    col, rids = run(eng, prompts, SamplingParams(max_tokens=16, temperature=0))
    m = eng.metrics()
    assert m["preemptions_total"] > 0 and m["requests_finished_total"] == 10
    for p, rid in zip(prompts, rids):
        assert col.tokens(rid) == reference(model, tokenizer, p, 16)
    assert m["kv_blocks_used"] == 0
    eng.blocks.check()


def test_abort_frees_blocks_at_once(tokenizer, engine_of):
    model = random_model("llama", seed=5)
    eng = engine_of(model, tokenizer, block_size=4, num_kv_blocks=64)
    col = Collector()
    first_token = threading.Event()

    def on_event(ev):
        col(ev)
        first_token.set()

    rid = eng.submit(prompts_of(1, seed=13, lo=20, hi=20)[0],
                     SamplingParams(max_tokens=200, temperature=0), on_event)
    assert first_token.wait(TIMEOUT)
    assert eng.metrics()["kv_blocks_used"] > 0
    eng.abort(rid)
    col.wait([rid])
    assert col.done[rid].finish_reason == "abort"
    assert col.done[rid].completion_tokens < 200
    m = eng.metrics()
    assert m["kv_blocks_used"] == 0 and m["running"] == 0
    eng.abort(rid)  # aborting a finished request is harmless


def test_abort_of_a_waiting_request(tokenizer, engine_of):
    model = random_model("llama", seed=5)
    eng = engine_of(model, tokenizer, block_size=4, max_batch_size=1)
    col = Collector()
    p, q = prompts_of(2, seed=17)
    first = eng.submit(p, SamplingParams(max_tokens=8, temperature=0), col)
    waiting = eng.submit(q, SamplingParams(max_tokens=8, temperature=0), col)
    eng.abort(waiting)
    col.wait([first, waiting])
    assert col.done[waiting].finish_reason == "abort" and col.tokens(waiting) == []
    assert col.tokens(first) == reference(model, tokenizer, p, 8)
    assert eng.metrics()["queue_length"] == 0


@pytest.mark.parametrize("policy", ["fifo", "sjf"])
def test_scheduling_order(tokenizer, policy):
    model = random_model("llama", seed=6)
    eng = Engine(model, tokenizer, block_size=4, max_batch_size=1, scheduler=policy)
    col = Collector()
    sizes = [(20, 10), (3, 2), (10, 4), (2, 1)]  # (prompt length, max_tokens)
    prompts = prompts_of(4, seed=14, lo=20, hi=20)
    rids = [eng.submit(p[:n], SamplingParams(max_tokens=m, temperature=0), col)
            for p, (n, m) in zip(prompts, sizes)]
    eng.start()  # all four are waiting when the loop starts
    try:
        col.wait(rids)
    finally:
        eng.stop()
    expect = [0, 1, 2, 3] if policy == "fifo" else [3, 1, 2, 0]
    assert col.order == [rids[i] for i in expect]


def test_bad_requests_raise_value_error(tokenizer):
    model = random_model("llama")
    eng = Engine(model, tokenizer, max_model_len=64, block_size=4, num_kv_blocks=32)
    cb = Collector()
    assert eng.max_model_len == 64
    for prompt, sp, msg in [
        ([], SamplingParams(), "empty"),
        ([1] * 64, SamplingParams(max_tokens=1), "context"),
        ([1] * 10, SamplingParams(max_tokens=60), "exceeds"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(max_tokens=-5), "max_tokens"),
        ([100000], SamplingParams(max_tokens=4), "token ids"),
        ([1], SamplingParams(max_tokens=4, temperature=-1), "temperature"),
        ([1], SamplingParams(max_tokens=4, top_p=0), "top_p"),
        ([1], SamplingParams(max_tokens=4, stop="x"), "stop"),
        ([1], SamplingParams(max_tokens=4, temperature="hot"), "temperature"),
        ([1], SamplingParams(max_tokens=4, seed=1.5), "seed"),
        ([1], SamplingParams(max_tokens=True), "max_tokens"),
    ]:
        with pytest.raises(ValueError, match=msg):
            eng.submit(prompt, sp, cb)
    small = Engine(model, tokenizer, max_model_len=64, block_size=4, num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small.submit([1] * 10, SamplingParams(max_tokens=10), cb)
    with pytest.raises(ValueError, match="scheduler"):
        Engine(model, tokenizer, scheduler="lifo")


def test_stop_aborts_requests_in_flight(tokenizer):
    model = random_model("llama", seed=7)
    eng = Engine(model, tokenizer, block_size=4)
    eng.eos_ids = set()  # only the stop can end it early
    col = Collector()
    started = threading.Event()

    def on_event(ev):
        col(ev)
        started.set()

    running = eng.submit([5, 6, 7], SamplingParams(max_tokens=200, temperature=0), on_event)
    eng.start()
    assert started.wait(TIMEOUT)
    queued = eng.submit([8, 9], SamplingParams(max_tokens=5, temperature=0), col)
    eng.stop()
    col.wait([running, queued])
    assert col.done[running].finish_reason == "abort"
    assert col.done[running].completion_tokens < 200
    assert col.done[queued].finish_reason in ("abort", "length")


@pytest.mark.skipif(default_model_path() is None, reason="no bundled demo model in this build")
def test_demo_model_text_and_stop_strings(engine_of):
    model, tok = load(default_model_path())
    prompts = [tok.encode("The small boat left the harbour"), tok.encode("Once upon a time")]
    eng = engine_of(model, tok, block_size=8)
    col, rids = run(eng, prompts, SamplingParams(max_tokens=8, temperature=0))
    for p, rid in zip(prompts, rids):
        want = list(stream_generate(model, tok, p, max_tokens=8))
        assert col.tokens(rid) == [r.token for r in want]
        assert col.text(rid) == "".join(r.text for r in want)
    # a stop string taken from the greedy text: the engine cuts where generate cuts
    stop = col.text(rids[0]).strip().split()[1]
    col2, (r,) = run(eng, prompts[:1], SamplingParams(max_tokens=8, temperature=0, stop=[stop]))
    assert col2.done[r].finish_reason == "stop"
    assert col2.text(r) == generate(model, tok, prompts[0], max_tokens=8, stop=[stop])
    assert stop not in col2.text(r)


def test_metrics_shape(tokenizer, engine_of):
    eng = engine_of(random_model("llama"), tokenizer, block_size=4, num_kv_blocks=16)
    run(eng, prompts_of(2), SamplingParams(max_tokens=3, temperature=0))
    m = eng.metrics()
    assert set(m) == {"queue_length", "running", "kv_blocks_used", "kv_blocks_total",
                      "prefix_cache_hit_tokens", "preemptions_total", "requests_finished_total",
                      "generated_tokens_total", "tokens_per_second", "decode_steps_total",
                      "decode_rows_total", "prefill_seconds_total", "build_seconds_total",
                      "wait_seconds_total", "emit_seconds_total"}
    assert m["kv_blocks_total"] == 16 and m["generated_tokens_total"] <= 6
    assert m["queue_length"] == 0 and m["tokens_per_second"] > 0
    # each prompt's last token goes through a decode step; both requests are in every step
    assert 3 <= m["decode_steps_total"] <= 6
    assert m["decode_rows_total"] >= m["generated_tokens_total"]
    assert all(m[f"{p}_seconds_total"] > 0 for p in ("prefill", "build", "wait", "emit"))


def test_a_failing_step_ends_its_requests_and_the_engine_keeps_serving(tokenizer, engine_of):
    model = random_model("llama", seed=8)
    eng = engine_of(model, tokenizer, block_size=4)
    forward = eng.runner.forward
    calls = {"n": 0}

    def flaky(inputs, prev_tokens=None):  # the fifth model call fails (a decode step)
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return forward(inputs, prev_tokens)

    eng.runner.forward = flaky
    col, (rid,) = run(eng, prompts_of(1, seed=15), SamplingParams(max_tokens=20, temperature=0))
    assert col.done[rid].finish_reason == "error"
    assert "injected failure" in col.done[rid].error
    p = prompts_of(1, seed=16)[0]
    col2, (ok,) = run(eng, [p], SamplingParams(max_tokens=6, temperature=0))
    assert col2.tokens(ok) == reference(model, tokenizer, p, 6)
    assert eng.metrics()["kv_blocks_used"] == 0


def test_unpipelined_mode_gives_the_same_tokens(tokenizer):
    """engine.pipeline = False (each step read back before the next is built, as a distributed
    engine broadcasting token ids needs) changes nothing but timing."""
    model = random_model("qwen3_moe", seed=9)
    prompts = prompts_of(4, seed=18)
    eng = Engine(model, tokenizer, block_size=4)
    eng.pipeline = False
    seen = []
    forward = eng.runner.forward

    def watch(inputs, prev_tokens=None):
        seen.append(inputs.prev_rows)
        return forward(inputs, prev_tokens)

    eng.runner.forward = watch
    eng.start()
    try:
        col, rids = run(eng, prompts, SamplingParams(max_tokens=8, temperature=0))
    finally:
        eng.stop()
    assert seen and all(r is None for r in seen)
    for p, rid in zip(prompts, rids):
        assert col.tokens(rid) == reference(model, tokenizer, p, 8)


def test_prefill_split_over_forwards_gives_the_same_tokens(tokenizer, engine_of, monkeypatch):
    # a step's prefill rows go to several forwards when their gathered contexts would be large
    # (here: every row alone)
    from marlin_mlx.serving import paged_cache

    monkeypatch.setattr(paged_cache, "PREFILL_GATHER_TOKENS", 1)
    model = random_model("qwen3", seed=6)
    prompts = prompts_of(5, seed=12, lo=5, hi=30)
    eng = engine_of(model, tokenizer, block_size=4, prefill_chunk=64, max_waiting_time=0.05)
    col, rids = run(eng, prompts, SamplingParams(max_tokens=6, temperature=0))
    for p, rid in zip(prompts, rids):
        assert col.tokens(rid) == reference(model, tokenizer, p, 6)


@pytest.mark.parametrize("pad_prefill", [False, True])
def test_warmup_and_padded_batches_give_the_same_tokens(tokenizer, pad_prefill):
    # decode batches are padded to a power of two (here 3 -> 4, 5 -> 6 = max_batch_size) with
    # rows on the scratch block, and (a GPU's default) prefill rows to shape buckets; warmup
    # runs every bucket first. Neither may change a token, and the scratch block is never
    # handed to a request.
    model = random_model("llama", seed=4)
    eng = Engine(model, tokenizer, block_size=4, max_batch_size=6, max_waiting_time=0.01,
                 pad_prefill=pad_prefill)
    assert [eng.batch_bucket(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    eng.start(warmup=True)
    try:
        prompts = prompts_of(5, seed=9, lo=2, hi=20)
        col, rids = run(eng, prompts, SamplingParams(max_tokens=7, temperature=0))
        for p, rid in zip(prompts, rids):
            assert col.tokens(rid) == reference(model, tokenizer, p, 7)
        assert eng.metrics()["kv_blocks_used"] == 0
        assert eng.runner.pool.num_blocks == eng.num_kv_blocks + 1
    finally:
        eng.stop()
