"""Which sequences run in the next step: admission, prefill chunks, decode batch, preemption.

A sequence's `tokens` are its prompt followed by what it has generated; `num_computed` of them
have their keys and values in the cache. A step computes `tokens[num_computed:]`:
- prefill: sequences with more than one token to compute get chunks, always leaving their last
  token out, run as the rows of one forward: up to `prefill_chunk // L` rows of at most L tokens,
  with the row length L (`prefill_chunk` or a power of two below it) that computes the most
  tokens (one long prompt: one row of `prefill_chunk`; many short ones: many short rows);
- decode: every running sequence with exactly one token to compute (its latest, or a prompt's
  last) is fed in one batched forward whose logits give its next token.

Blocks: a sequence is admitted only when blocks for all its tokens are available (after prefix
cache hits); a decoding sequence that needs a new block and finds none preempts the most
recently admitted running sequence (its blocks are released, it goes back to the waiting queue
and is recomputed later from its tokens, mostly from the prefix cache). Nothing is dropped.
Order: "fifo" admits by arrival; "sjf" by prompt + max_tokens (shortest first), then arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from .block_manager import ROOT_KEY, BlockManager

POLICIES = ("fifo", "sjf")
MIN_PREFILL_ROW = 16  # the shortest prefill row length tried


@dataclass
class Sequence:
    request_id: str
    prompt_len: int
    max_tokens: int
    tokens: List[int]
    order: int  # arrival number
    on_event: Callable = None
    state: Any = None  # the engine's per-request state (sampler, detokenizer, ...)
    num_computed: int = 0
    pending: int = 0  # sampled tokens not read back yet (at most the two steps in flight)
    pending_row: int = -1  # this sequence's row in the in-flight step's sampled tokens
    finished: bool = False
    block_table: List[int] = field(default_factory=list)
    block_keys: List[int] = field(default_factory=list)  # keys of the registered full blocks
    preemptions: int = 0

    @property
    def job_size(self) -> int:
        return self.prompt_len + self.max_tokens

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def length(self) -> int:
        """Tokens including a pending one."""
        return len(self.tokens) + self.pending

    @property
    def to_compute(self) -> int:
        return self.length - self.num_computed

    @property
    def decodes(self) -> bool:
        """Whether the next step feeds this sequence's last token to get its next one."""
        return self.to_compute == 1 and self.length - self.prompt_len < self.max_tokens


@dataclass
class Plan:
    prefill: List[Tuple[Sequence, int]]  # (sequence, number of tokens) chunks, in order
    decode: List[Sequence]
    preempted: List[Sequence]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_batch_size: int, prefill_chunk: int,
                 policy: str = "fifo"):
        if policy not in POLICIES:
            raise ValueError(f"scheduler must be one of {', '.join(POLICIES)}, got {policy!r}")
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.blocks, self.policy = blocks, policy
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.waiting: List[Sequence] = []
        self.running: List[Sequence] = []  # admission order: the last is preempted first
        self.prefix_hit_tokens = 0
        self.preemptions = 0

    def _priority(self, seq: Sequence):
        return (seq.job_size, seq.order) if self.policy == "sjf" else (seq.order,)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence, releasing its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_table, seq.block_keys, seq.num_computed = [], [], 0

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.blocks.block_size)

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.append(seq)
        plan.preempted.append(seq)

    def schedule(self) -> Plan:
        plan = Plan([], [], [])
        # 1. every running sequence that decodes gets a slot for its token, preempting if needed
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.decodes and not self._grow(seq, seq.length):
                # no block left: preempt from the back until one frees up (maybe seq itself)
                while not self._grow(seq, seq.length):
                    victim = self.running[-1]
                    self._preempt(victim, plan)
                    if victim is seq:
                        break
                if seq not in self.running:
                    break  # seq was the last one: nothing after it to schedule
            i += 1
        # 2. admit waiting sequences while blocks and batch slots allow (not after a preemption:
        # the freed blocks go to the sequences already running)
        if not plan.preempted:
            self.waiting.sort(key=self._priority)
            while self.waiting and len(self.running) < self.max_batch_size:
                if self.waiting[0].pending or not self._admit(self.waiting[0]):
                    break
                self.running.append(self.waiting.pop(0))
        # 3. prefill chunks (the rows of one forward), then the decode batch
        plan.prefill = self._prefill_rows([s for s in self.running if s.to_compute > 1])
        plan.decode = [s for s in self.running if s.decodes
                       or any(p is s and n == s.to_compute - 1 for p, n in plan.prefill)]
        return plan

    def _prefill_rows(self, ready: List[Sequence]) -> List[Tuple[Sequence, int]]:
        """The prefill chunks of one forward: rows of at most L tokens, at most
        prefill_chunk // L rows, in admission order, for the L that computes the most tokens
        (the longest on a tie: fewer rows)."""
        best: List[Tuple[Sequence, int]] = []
        L = self.prefill_chunk
        while ready and L >= 1:
            rows = [(s, min(L, s.to_compute - 1)) for s in ready[: self.prefill_chunk // L]]
            if sum(n for _, n in rows) > sum(n for _, n in best):
                best = rows
            L = 1 << ((L - 1).bit_length() - 1) if L > MIN_PREFILL_ROW else 0
        return best

    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        while len(seq.block_table) < self._blocks_for(n_tokens):
            b = self.blocks.allocate()
            if b is None:
                return False
            seq.block_table.append(b)
        return True

    def _admit(self, seq: Sequence) -> bool:
        """Take prefix-cache hits and blocks for all of `seq`'s tokens, or nothing."""
        bs = self.blocks.block_size
        # at least the last token is computed: its logits give the next token
        hits, keys = self.blocks.match_prefix(seq.tokens, (len(seq.tokens) - 1) // bs)
        need = self._blocks_for(len(seq.tokens)) - len(hits)
        if need > self.blocks.num_free:
            self.blocks.release(hits)
            return False
        seq.block_table, seq.block_keys = list(hits), list(keys)
        seq.num_computed = len(hits) * bs
        self.prefix_hit_tokens += seq.num_computed
        ok = self._grow(seq, len(seq.tokens))
        assert ok
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Key every newly completed full block of `seq` for the prefix cache."""
        bs = self.blocks.block_size
        while (len(seq.block_keys) + 1) * bs <= min(seq.num_computed, len(seq.tokens)):
            i = len(seq.block_keys)
            parent = seq.block_keys[-1] if seq.block_keys else ROOT_KEY
            tokens = seq.tokens[i * bs : (i + 1) * bs]
            key = self.blocks.register(seq.block_table[i], parent, tokens)
            seq.block_keys.append(key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Optional[Sequence]:
        for seq in self.running + self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
