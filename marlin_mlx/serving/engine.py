"""Iteration-level continuous batching over a paged KV cache.

One background thread owns all MLX work and runs the step loop: take new requests and aborts,
let the scheduler pick this step's prefill chunks and decode batch (preempting when blocks run
out), run them through `ModelRunner.forward` (the single model entry point, see paged_cache.py),
sample every decoding sequence's next token and start evaluating the step; then read back the
PREVIOUS step's tokens, detokenize, apply stop strings / EOS / max_tokens and call each request's
`on_event`. Step n + 1 is built from step n's still-lazy tokens, so the host work overlaps the
accelerator's; a sequence that turns out to have finished in step n just drops its token of
step n + 1.

Usage (see /work/notes/engine_api.md):
    engine = Engine(model, tokenizer, max_batch_size=32)
    engine.start()
    rid = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0), on_event)
    ...
    engine.stop()
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..generation import _StopMatcher
from ..sampling import make_sampler
from .block_manager import BlockManager
from .paged_cache import (DECODE, PREFILL_CONTEXT_BUCKET, KVPool, ModelRunner, StepInputs,
                          cache_spec, pack_prefill, prefill_groups)
from .scheduler import MIN_PREFILL_ROW, Scheduler, Sequence

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096  # cap of the default taken from max_position_embeddings
CPU_KV_BUDGET = 512 << 20  # bytes of KV pool by default on the CPU backend
GPU_KV_FRACTION = 0.5  # of the memory left after the weights, by default on a GPU
TPS_WINDOW_S = 10.0
CLEAR_CACHE_EVERY = 256  # steps between releases of MLX's buffer cache


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)


@dataclass
class Event:
    request_id: str
    text: str  # new text since the previous event (may be "")
    token_ids: List[int]  # tokens generated since the previous event
    finish_reason: Optional[str]  # None, "stop", "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


class _RequestState:
    """Host-side state of a request: sampler, detokenizer, stop strings."""

    def __init__(self, params: SamplingParams, tokenizer: TokenizerWrapper):
        self.params = params
        self.greedy = params.temperature == 0
        # any integer seed works (OpenAI's may be negative): taken modulo 2**64
        seed = params.seed % (1 << 64) if params.seed is not None else random.getrandbits(63)
        self.sampler = None if self.greedy else make_sampler(params.temperature, params.top_p,
                                                             seed=seed)
        self.detokenizer = tokenizer.detokenizer
        self.stops = _StopMatcher(params.stop)


def _default_max_model_len(model) -> int:
    return min(int(getattr(model.args, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN)),
               DEFAULT_MAX_MODEL_LEN)


def _default_num_blocks(model, block_size: int, max_batch_size: int, max_model_len: int) -> int:
    """Enough for max_batch_size full-length sequences, capped by the memory budget."""
    wanted = max_batch_size * -(-max_model_len // block_size)
    per_block = cache_spec(model).bytes_per_block(block_size)
    if mx.default_device() == mx.cpu:
        budget = CPU_KV_BUDGET
    else:
        info = mx.device_info()
        total = info.get("memory_size") or info.get("total_memory") or 0
        budget = int(GPU_KV_FRACTION * max(total - mx.get_active_memory(), 0)) or CPU_KV_BUDGET
    floor = -(-max_model_len // block_size)  # one full-length sequence always fits
    return max(floor, min(wanted, budget // per_block))


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 32,
                 num_kv_blocks: Optional[int] = None, block_size: int = 16,
                 max_waiting_time: float = 0.05, scheduler: str = "fifo",
                 max_model_len: Optional[int] = None, prefill_chunk: int = 512,
                 enable_prefix_cache: bool = True, runner_factory=None,
                 pad_prefill: Optional[bool] = None):
        # runner_factory(model, num_blocks, block_size) builds the model runner; a tensor-parallel
        # rank 0 passes distributed.runner_factory(group) so each step reaches the other ranks
        if block_size < 1 or max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("block_size, max_batch_size and prefill_chunk must be >= 1")
        if max_waiting_time < 0:
            raise ValueError(f"max_waiting_time must be >= 0, got {max_waiting_time}")
        self.model = model
        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len or _default_max_model_len(model))
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if num_kv_blocks is None:
            num_kv_blocks = _default_num_blocks(model, block_size, max_batch_size,
                                                self.max_model_len)
        self.block_size, self.num_kv_blocks = block_size, int(num_kv_blocks)
        self.max_waiting_time = max_waiting_time
        self.vocab_size = int(model.args.vocab_size)
        self.eos_ids = set(self.tokenizer.eos_token_ids or [])
        self.blocks = BlockManager(self.num_kv_blocks, block_size, enable_prefix_cache)
        self.scheduler = Scheduler(self.blocks, max_batch_size=max_batch_size,
                                   prefill_chunk=prefill_chunk, policy=scheduler)
        # one block past the managed ones is scratch: the padding rows of a decode batch write
        # their (unused) keys and values there
        self.scratch_block = self.num_kv_blocks
        self.max_batch_size = max_batch_size
        self.runner = (runner_factory or ModelRunner)(model, self.num_kv_blocks + 1, block_size)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: List[Sequence] = []
        self._aborts: set = set()
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._finished = 0
        self._generated = 0
        self._recent = deque()  # (time, tokens) of recent steps, for tokens_per_second
        self._snapshot = {"running": 0, "kv_blocks_used": 0, "waiting": 0}
        self._last_sampled = None  # the in-flight decode step's sampled tokens (lazy)
        self.pipeline = True  # build step n + 1 before reading back step n
        self._building: List[Sequence] = []  # the sequences of the step being launched
        self._steps = 0
        self._launched = False
        # prefill shapes from a few buckets (see pack_prefill): on a GPU a new shape costs
        # kernels and an attention plan; on the CPU the padding would cost compute
        self.pad_prefill = (mx.default_device().type == mx.DeviceType.gpu
                            if pad_prefill is None else pad_prefill)
        # engine-thread seconds by phase, and decode steps / rows: where a step's time goes
        self._phase_s = {"prefill": 0.0, "build": 0.0, "wait": 0.0, "emit": 0.0}
        self._decode_steps = 0
        self._decode_rows = 0

    # --- public API (any thread) ---
    def start(self, warmup: Optional[bool] = None) -> None:
        """Start the step loop. `warmup` (default: on a GPU) first runs a decode step of every
        batch bucket and a short prefill, so kernel compilation and first-use kernel selection
        happen before the first request rather than during it."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        if warmup if warmup is not None else mx.default_device().type == mx.DeviceType.gpu:
            self.warmup()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="marlin-engine", daemon=True)
        self._thread.start()

    def batch_bucket(self, n: int) -> int:
        """Decode batches are padded to a power of two (at most max_batch_size): a kernel is
        compiled per batch size on a GPU, and a few sizes are compiled once, not one per size."""
        return min(1 << max(n - 1, 0).bit_length(), max(self.max_batch_size, n))

    def warmup(self) -> None:
        """Run each decode batch bucket and prefill shape bucket on the scratch block only."""
        sizes = sorted({self.batch_bucket(n) for n in range(1, self.max_batch_size + 1)})
        n = min(self.block_size, self.max_model_len - 1)
        scratch = [self.scratch_block] * (-(-self.max_model_len // self.block_size))
        prefills = [[([0] * n, 0, n, scratch)]]
        if self.pad_prefill:  # every (row length, row count) bucket, at the first two contexts
            budget = self.scheduler.prefill_chunk
            for ctx in (PREFILL_CONTEXT_BUCKET, 2 * PREFILL_CONTEXT_BUCKET):
                L = min(MIN_PREFILL_ROW, budget)
                while L <= min(budget, ctx) and ctx <= self.max_model_len:
                    S = 1
                    while S * L <= budget:
                        prefills.append([([0] * ctx, ctx - L, L, scratch)] * S)
                        S *= 2
                    L = budget if L < budget < 2 * L else 2 * L
        for rows in prefills:
            self.runner.forward(pack_prefill(rows, self.block_size, self.scratch_block,
                                             self.scheduler.prefill_chunk
                                             if self.pad_prefill else None))
            mx.eval(self.runner.pool.arrays())
        for B in sizes:
            empty = StepInputs(kind=DECODE, token_ids=np.zeros((0, 1), np.int32),
                               positions=np.zeros(0, np.int32),
                               block_tables=np.zeros((0, 1), np.int32),
                               slot_mapping=np.zeros(0, np.int32),
                               context_lens=np.zeros(0, np.int32))
            mx.eval(self.runner.forward(self._pad_inputs(empty, B)), self.runner.pool.arrays())

    def _pad_inputs(self, inputs: StepInputs, rows: int) -> StepInputs:
        """Decode inputs grown to `rows` rows by rows that attend to one token of the scratch
        block (their logits are dropped)."""
        B = inputs.token_ids.shape[0]
        if inputs.kind != DECODE or rows <= B:
            return inputs
        pad = rows - B
        tables = np.zeros((rows, max(inputs.block_tables.shape[1], 1)), np.int32)
        tables[:B, : inputs.block_tables.shape[1]] = inputs.block_tables
        tables[B:, 0] = self.scratch_block
        cat = np.concatenate
        prev = inputs.prev_rows
        return StepInputs(
            kind=DECODE, token_ids=cat([inputs.token_ids, np.zeros((pad, 1), np.int32)]),
            positions=cat([inputs.positions, np.zeros(pad, np.int32)]), block_tables=tables,
            slot_mapping=cat([inputs.slot_mapping,
                              np.full(pad, self.scratch_block * self.block_size, np.int32)]),
            context_lens=cat([inputs.context_lens, np.ones(pad, np.int32)]),
            prev_rows=None if prev is None else cat([prev, np.full(pad, -1, np.int32)]))

    def stop(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason "abort"."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, prompt_ids, params: SamplingParams, on_event: Callable[[Event], None]) -> str:
        ids = [int(t) for t in prompt_ids]
        self._validate(ids, params)
        rid = f"req-{next(self._ids)}"
        seq = Sequence(request_id=rid, prompt_len=len(ids), max_tokens=params.max_tokens,
                       tokens=ids, order=0, on_event=on_event)
        seq.state = params  # becomes a _RequestState on the engine thread (it makes MLX arrays)
        with self._wake:
            seq.order = next(self._ids)
            self._inbox.append(seq)
            self._wake.notify_all()
        return rid

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify_all()

    def metrics(self) -> dict:
        now = time.monotonic()
        with self._lock:
            snap = dict(self._snapshot)
            inbox = len(self._inbox)
            recent = [(t, n) for t, n in self._recent if now - t <= TPS_WINDOW_S]
        tokens = sum(n for _, n in recent)
        span = (now - recent[0][0]) if recent else 0.0
        return {
            "queue_length": snap["waiting"] + inbox,
            "running": snap["running"],
            "kv_blocks_used": snap["kv_blocks_used"],
            "kv_blocks_total": self.num_kv_blocks,
            "prefix_cache_hit_tokens": self.scheduler.prefix_hit_tokens,
            "preemptions_total": self.scheduler.preemptions,
            "requests_finished_total": self._finished,
            "generated_tokens_total": self._generated,
            "tokens_per_second": tokens / span if span > 0 else 0.0,
            "decode_steps_total": self._decode_steps,
            "decode_rows_total": self._decode_rows,
            **{f"{k}_seconds_total": v for k, v in self._phase_s.items()},
        }

    def _validate(self, ids: List[int], p: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not isinstance(p.max_tokens, int) or isinstance(p.max_tokens, bool) or p.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is "
                             f"{self.max_model_len} (prompt + max_tokens must fit)")
        if len(ids) + p.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds "
                             f"the context of {self.max_model_len} tokens")
        need = -(-(len(ids) + p.max_tokens) // self.block_size)
        if need > self.num_kv_blocks:
            raise ValueError(f"prompt + max_tokens needs {need} KV blocks; the pool has "
                             f"{self.num_kv_blocks}")
        for name in ("temperature", "top_p"):
            v = getattr(p, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise ValueError(f"{name} must be a number, got {v!r}")
        if p.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {p.temperature}")
        if not 0.0 < p.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
        if not isinstance(p.stop, (list, tuple)) or not all(isinstance(s, str) for s in p.stop):
            raise ValueError("stop must be a list of strings")
        if p.seed is not None and (not isinstance(p.seed, int) or isinstance(p.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {p.seed!r}")

    # --- the engine thread ---
    def _loop(self) -> None:
        flight = None  # the step launched last, whose tokens are not read back yet
        while True:
            with self._wake:
                if not self._stopping and flight is None and not self._inbox \
                        and not self._aborts and not self.scheduler.has_work():
                    self._wake.wait()
                    if self.max_waiting_time > 0 and self._inbox and not self._stopping:
                        # idle until now: give simultaneous arrivals a moment to join the step
                        self._wake.wait_for(lambda: self._stopping, self.max_waiting_time)
                if self._stopping:
                    break
                arrivals, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
            for seq in arrivals:
                seq.state = _RequestState(seq.state, self.tokenizer)
                self.scheduler.add(seq)
            for rid in aborts:
                seq = self.scheduler.find(rid)
                if seq is not None:
                    self._finish(seq, "abort")
            flight = self._advance(flight)
            self._update_snapshot()
            if flight is None and self.scheduler.has_work() and not self._launched:
                with self._wake:  # nothing could be scheduled (should not happen): do not spin
                    self._wake.wait(0.01)
        if flight is not None:
            self._advance(flight, launch=False)
        # stopping: everything still pending ends as aborted
        with self._lock:
            pending, self._inbox = self._inbox, []
        for seq in pending:
            self.scheduler.add(seq)
        for seq in list(self.scheduler.running + self.scheduler.waiting):
            self._finish(seq, "abort")
        self._update_snapshot()

    def _advance(self, flight, launch: bool = True):
        """Build the next step while the previous one computes, read back and emit the
        previous one, then start the next: the host's graph building overlaps the accelerator.

        The next step starts only after the previous one finished: a KV pool that an in-flight
        step still reads cannot be updated in place, so starting earlier would make every
        layer's cache write copy its whole pool (measured: 3.8 ms a step at 32 sequences)."""
        nxt = None
        self._building = []
        self._launched = False
        pending = [flight]

        def settle():
            if pending[0] is not None:
                self._complete(pending[0])
                pending[0] = None  # after: a step whose read-back fails ends its requests

        try:
            if not self.pipeline:
                settle()
            if launch and self.scheduler.has_work():
                nxt = self._launch(settle)
                self._launched = bool(self._building)
            settle()
        except Exception as e:  # a failed step ends its requests, never the engine
            log.exception("engine step failed")
            failed = list(self._building)
            if pending[0] is not None:
                failed += pending[0][0] + pending[0][1]
            self._reset_cache()  # first: the pools and block bookkeeping may be inconsistent
            for seq in {id(s): s for s in failed}.values():
                if not seq.finished:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            return None
        return nxt

    def _update_snapshot(self) -> None:
        with self._lock:
            self._snapshot = {"running": len(self.scheduler.running),
                              "waiting": len(self.scheduler.waiting),
                              "kv_blocks_used": self.blocks.num_used}

    def _reset_cache(self) -> None:
        """Start from empty pools and send every request back to be recomputed from its known
        tokens (after a failed step the pools may hold a broken graph)."""
        sched = self.scheduler
        for seq in list(sched.running):
            sched.running.remove(seq)
            sched.waiting.append(seq)
        for seq in sched.waiting:
            seq.block_table, seq.block_keys, seq.num_computed, seq.pending = [], [], 0, 0
        self.blocks = sched.blocks = BlockManager(self.num_kv_blocks, self.block_size,
                                                  self.blocks.enable_prefix_cache)
        self.runner.pool = KVPool(self.runner.spec, self.num_kv_blocks + 1, self.block_size)
        self._last_sampled = None

    def _launch(self, settle):
        """Schedule and build one step and start computing it once `settle()` has read back the
        previous one. Returns (sequences, sampled tokens) for the decode rows, or None when
        nothing was scheduled."""
        plan = self.scheduler.schedule()
        if not plan.prefill and not plan.decode:
            return None
        if plan.prefill:
            settle()  # prefill chunks are evaluated right away (see below)
        t0 = time.perf_counter()
        self._building = [seq for seq, _ in plan.prefill] + plan.decode
        self._steps += 1
        if self._steps % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()  # buffers of past shapes (prefill chunks, batch sizes) pile up
        bs = self.block_size
        rows = [(seq.tokens, seq.num_computed, n, seq.block_table) for seq, n in plan.prefill]
        for group in prefill_groups(rows):
            self.runner.forward(pack_prefill(
                group, bs, self.scratch_block,
                self.scheduler.prefill_chunk if self.pad_prefill else None))
            # A prefill reads the pool it writes (its context); evaluated now, the next write to
            # the pool updates it in place instead of copying it (MLX donates an input buffer
            # only when no pending op still reads it).
            mx.eval(self.runner.pool.arrays())
        for seq, n in plan.prefill:
            seq.num_computed += n
        members = [seq for seq, _ in plan.prefill]
        t1 = time.perf_counter()
        self._phase_s["prefill"] += t1 - t0
        if not plan.decode:
            return members, [], None
        B = len(plan.decode)
        width = max(len(s.block_table) for s in plan.decode)
        tables = np.zeros((B, width), np.int32)
        positions = np.zeros(B, np.int32)
        tokens = np.zeros((B, 1), np.int32)
        prev_rows = np.full(B, -1, np.int32)
        for i, s in enumerate(plan.decode):
            tables[i, : len(s.block_table)] = s.block_table
            positions[i] = s.num_computed
            if s.pending:
                prev_rows[i] = s.pending_row  # its token is still being computed
            else:
                tokens[i, 0] = s.tokens[-1]
        inputs = StepInputs(
            kind=DECODE, token_ids=tokens, positions=positions, block_tables=tables,
            slot_mapping=(tables[np.arange(B), positions // bs] * bs
                          + positions % bs).astype(np.int32),
            context_lens=positions + 1,
            prev_rows=prev_rows if (prev_rows >= 0).any() else None)
        logits = self.runner.forward(self._pad_inputs(inputs, self.batch_bucket(B)),
                                     prev_tokens=self._last_sampled)
        sampled = self._sample(plan.decode, logits[:B])
        self._phase_s["build"] += time.perf_counter() - t1
        self._decode_steps += 1
        self._decode_rows += B
        settle()
        t2 = time.perf_counter()
        mx.async_eval(sampled, self.runner.pool.arrays())
        self._phase_s["build"] += time.perf_counter() - t2  # MLX encodes the graph here
        self._last_sampled = sampled
        for i, s in enumerate(plan.decode):
            s.num_computed += 1
            s.pending += 1
            s.pending_row = i  # the newest pending token; older ones are read back first
        return members, plan.decode, sampled

    def _complete(self, flight) -> None:
        """Read back a launched step's tokens and emit them."""
        members, decode, sampled = flight
        t0 = time.perf_counter()
        if sampled is None:
            mx.eval(self.runner.pool.arrays())
            tokens = []
        else:
            tokens = sampled.tolist()
        t1 = time.perf_counter()
        self._phase_s["wait"] += t1 - t0
        for seq, tok in zip(decode, tokens):
            if seq.finished:  # aborted (or failed) while the step was in flight
                continue
            seq.pending -= 1
            if seq.pending == 0:
                seq.pending_row = -1
            self._emit_token(seq, tok)
        for seq in members + decode:
            if not seq.finished and seq.block_table:
                self.scheduler.register_full_blocks(seq)
        self._phase_s["emit"] += time.perf_counter() - t1

    def _sample(self, seqs: List[Sequence], logits: mx.array) -> mx.array:
        greedy = mx.argmax(logits, axis=-1)
        if all(s.state.greedy for s in seqs):
            return greedy
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        rows = [greedy[i : i + 1] if s.state.greedy else s.state.sampler(logprobs[i : i + 1])
                for i, s in enumerate(seqs)]
        return mx.concatenate([r.astype(mx.uint32) for r in rows])

    def _emit_token(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        st = seq.state
        finish = None
        if token in self.eos_ids:
            finish = "stop"  # EOS is not text
        else:
            st.detokenizer.add_token(token)
            if seq.generated >= seq.max_tokens:
                finish = "length"
        if finish is not None:
            st.detokenizer.finalize()
        text, hit = st.stops.feed(st.detokenizer.text, final=finish is not None)
        if hit:
            finish = "stop"
        self._generated += 1
        now = time.monotonic()
        with self._lock:
            if self._recent and self._recent[-1][0] == now:
                self._recent[-1] = (now, self._recent[-1][1] + 1)
            else:
                self._recent.append((now, 1))
            while self._recent and now - self._recent[0][0] > TPS_WINDOW_S:
                self._recent.popleft()
        if finish is not None:
            seq.finished = True
            self.scheduler.remove(seq)
            self._finished += 1
            self._update_snapshot()  # metrics show the freed blocks once the final event is out
        self._call(seq, Event(seq.request_id, text, [token], finish, seq.prompt_len,
                              seq.generated))

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        seq.finished = True
        self.scheduler.remove(seq)
        self._finished += 1
        self._update_snapshot()
        self._call(seq, Event(seq.request_id, "", [], reason, seq.prompt_len, seq.generated, error))

    def _call(self, seq: Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a broken callback must not stop the other requests
            log.exception("on_event of %s failed", seq.request_id)
