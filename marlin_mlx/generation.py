"""Text generation: chunked prefill, a pipelined decode loop, streaming text and statistics.

The decode loop keeps the accelerator busy: the graph for token n+1 (model, logits processors,
sampler) is built from the still-lazy token n and handed to `mx.async_eval` before token n is
read back on the host, so the host work of step n (detokenizing, stop strings, yielding)
overlaps the computation of step n+1. Inside a step nothing synchronizes with the host.

Public API: `stream_generate(...)` yields a `GenerationResponse` per generated token;
`generate(...)` returns the whole text (and with `verbose=True` prints it as it streams, then
the statistics, the way `mlx_lm.generate` does).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .sampling import LogitsProcessor, Sampler, make_logits_processors, make_sampler

Prompt = Union[str, Sequence[int], mx.array]

__all__ = ["GenerationResponse", "stream_generate", "generate", "generate_step", "encode_prompt",
           "chat_prompt", "has_chat_template", "format_stats", "decode_forward", "compile_enabled"]


def compile_enabled() -> bool:
    """MARLIN_MLX_COMPILE=0 turns the compiled decode step off (default on)."""
    return os.environ.get("MARLIN_MLX_COMPILE", "1").strip().lower() not in ("0", "false", "no")


def decode_forward(model, compile: Optional[bool] = None) -> Callable:
    """The callable a decode loop should run `(inputs, cache=...) -> logits` through.

    With compilation on (argument, else MARLIN_MLX_COMPILE) and a model that offers
    `compiled_decoder()` (Llama, Qwen3), its q/k/v projections are fused into one (a one-time,
    in-place change of the model; `__call__` keeps working) and the single-token steps replay
    compiled graphs (`models.base.CompiledDecoder`); anything else is the model itself.
    MARLIN_MLX_FUSE_QKV=0/1 overrides the q/k/v fusion (default: on with compilation).
    """
    compile = compile_enabled() if compile is None else compile
    fuse = os.environ.get("MARLIN_MLX_FUSE_QKV", "").strip()
    if (fuse == "1" or (compile and fuse != "0")) and hasattr(model, "fuse_projections"):
        model.fuse_projections()
    if compile and hasattr(model, "compiled_decoder"):
        dec = model.compiled_decoder()
        if dec is not None:
            return dec
    return model


@dataclass
class GenerationResponse:
    """One generated token and the statistics so far.

    text: the new printable text (may be empty while a character or a possible stop string
      is incomplete); token: the generated id; logprobs: log-probabilities over the vocabulary
      for this step (after logits processors, before sampling filters); finish_reason: None,
      "stop" (EOS token or stop string) or "length" (max_tokens reached); prompt_tps: prompt
      tokens per second up to the first generated token; generation_tps: tokens per second of
      the decode loop after the first token; peak_memory: MLX's peak memory in GB.
    """

    text: str
    token: int
    logprobs: Optional[mx.array]
    finish_reason: Optional[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float


def _wrap_tokenizer(tokenizer) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def encode_prompt(tokenizer, prompt: Prompt) -> List[int]:
    """Token ids of `prompt` (a string, a list of ids or a 1-D array). A string gets the
    tokenizer's special tokens (BOS) unless it already starts with BOS, as a rendered chat
    template does."""
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).tolist()
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special))
    return [int(t) for t in prompt]


def chat_prompt(tokenizer, user: str, system: Optional[str] = None) -> List[int]:
    """Token ids of a one-turn conversation rendered with the tokenizer's chat template,
    ending with the assistant's turn opened (`add_generation_prompt`)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The rendered template already carries any BOS it wants.
    return list(tokenizer.encode(text, add_special_tokens=False))


def has_chat_template(tokenizer) -> bool:
    if isinstance(tokenizer, TokenizerWrapper):
        return bool(tokenizer.has_chat_template)
    return getattr(tokenizer, "chat_template", None) is not None


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 512,
    compile: Optional[bool] = None,
) -> Iterator[Tuple[int, mx.array]]:
    """Yield `(token_id, logprobs)` for each generated token; `max_tokens < 0` never stops.

    The prompt (1-D int array) is fed in chunks of `prefill_step_size` tokens, all but its
    last token without computing logits; the last one starts decoding. When the caller stops
    early, the cache is left holding the prompt and every yielded token but the last (the
    state a natural end at `max_tokens` leaves), so it can be reused for a continuation.
    compile: run the single-token steps through `decode_forward(model, compile)` (None: the
    MARLIN_MLX_COMPILE switch, default on); the outputs are the same either way.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("the prompt must be a non-empty 1-D sequence of token ids")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    prompt = prompt.astype(mx.int32)
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    processors = list(logits_processors or [])
    history = prompt  # token ids seen so far, only needed by logits processors
    forward = decode_forward(model, compile)

    def step(tokens: mx.array) -> Tuple[mx.array, mx.array]:
        nonlocal history
        logits = forward(tokens[None], cache=cache)[:, -1, :].astype(mx.float32)
        for proc in processors:
            logits = proc(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = sampler(logprobs)
        if processors:
            history = mx.concatenate([history, y.astype(history.dtype)])
        return y, logprobs.squeeze(0)

    # Prefill: only the cache is evaluated, so the unused logits of these chunks are never
    # computed (the graph is lazy).
    done = 0
    while prompt.size - done > 1:
        n = min(prefill_step_size, prompt.size - done - 1)
        model(prompt[done : done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        mx.clear_cache()  # keep peak memory at one chunk's activations

    y, logprobs = step(prompt[done:])
    mx.async_eval(y, logprobs)
    ahead = False  # whether the last yielded token was already fed to the model
    n = 0
    try:
        while True:
            n += 1
            ahead = max_tokens < 0 or n < max_tokens
            if ahead:
                next_y, next_logprobs = step(y)
                mx.async_eval(next_y, next_logprobs)
            yield y.item(), logprobs
            if not ahead:
                return
            y, logprobs = next_y, next_logprobs
            if n % 256 == 0:
                mx.clear_cache()
    finally:
        if ahead:
            for c in cache:
                if hasattr(c, "trim"):
                    c.trim(1)


class _StopMatcher:
    """Cuts streamed text at the first stop string, never emitting any part of it.

    Text that could be the beginning of a stop string is held back until the next tokens
    decide; everything else is released at once.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.emitted = 0  # characters of the full text already released

    def feed(self, text: str, final: bool) -> Tuple[str, bool]:
        """Given the full text so far, return (newly releasable text, stop string hit)."""
        start = self.emitted
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final or not self.stops:
            end, stopped = len(text), False
        else:
            end, stopped = self._hold_point(text), False
        segment = text[start:end]
        self.emitted = end
        return segment, stopped

    def _hold_point(self, text: str) -> int:
        # Smallest j >= emitted such that text[j:] may still grow into a stop string.
        longest = max(len(s) for s in self.stops)
        for j in range(max(self.emitted, len(text) - longest + 1), len(text)):
            tail = text[j:]
            if any(s.startswith(tail) for s in self.stops):
                return j
        return len(text)


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    temperature: Optional[float] = None,
    temp: Optional[float] = None,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = 20,
    seed: Optional[int] = None,
    stop: Optional[Union[str, Sequence[str]]] = None,
    prefill_step_size: int = 512,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prompt_cache: Optional[List[Any]] = None,
    eos_token_ids: Optional[Iterable[int]] = None,
    compile: Optional[bool] = None,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt`, yielding a `GenerationResponse` per token.

    prompt: a string (tokenized here, BOS added unless present) or token ids.
    max_tokens: the most tokens to generate (-1: until EOS or a stop string).
    temperature (alias temp; default 0 = greedy), top_p, top_k (0 = off), min_p (0 = off),
    seed: see `marlin_mlx.sampling.make_sampler`; or pass your own `sampler`.
    repetition_penalty / repetition_context_size: penalize the last tokens (prompt included).
    stop: string(s) that end generation; neither they nor anything after them is emitted.
    eos_token_ids: ids ending generation (default: the tokenizer's; pass [] to ignore EOS).
    prompt_cache: a cache from `model.make_cache()` to fill (and reuse) instead of a new one.
    compile: the compiled decode step (None: MARLIN_MLX_COMPILE, default on); see
      `decode_forward`. The tokens and log-probabilities are the same either way.
    """
    if max_tokens == 0 or max_tokens < -1:
        raise ValueError(f"max_tokens must be >= 1 (or -1 for no limit), got {max_tokens}")
    if temperature is not None and temp is not None and temperature != temp:
        raise ValueError("pass either temperature or temp, not both")
    tokenizer = _wrap_tokenizer(tokenizer)
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if sampler is None:
        t = temperature if temperature is not None else (temp if temp is not None else 0.0)
        sampler = make_sampler(t, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    processors = list(logits_processors or [])
    processors += make_logits_processors(repetition_penalty, repetition_context_size)
    eos = set(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    stops = _StopMatcher([stop] if isinstance(stop, str) else (stop or []))
    detokenizer = tokenizer.detokenizer
    prompt_tokens = len(ids)

    tokens = generate_step(
        mx.array(ids, mx.int32),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size,
        compile=compile,
    )
    start = time.perf_counter()
    first = None  # when the first token was ready: prompt time ends, decode time begins
    prompt_tps = 0.0
    try:
        for n, (token, logprobs) in enumerate(tokens, 1):
            now = time.perf_counter()
            if first is None:
                first = now
                prompt_tps = prompt_tokens / max(now - start, 1e-9)
            finish = None
            if token in eos:
                finish = "stop"  # the EOS token itself is not text
            else:
                detokenizer.add_token(token)
                if n == max_tokens:
                    finish = "length"
            if finish is not None:
                detokenizer.finalize()
            text, hit_stop = stops.feed(detokenizer.text, final=finish is not None)
            if hit_stop:
                finish = "stop"
            yield GenerationResponse(
                text=text,
                token=token,
                logprobs=logprobs,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
            )
            if finish is not None:
                break
    finally:
        tokens.close()  # leaves a reusable prompt_cache consistent


def format_stats(response: GenerationResponse) -> str:
    """The statistics lines `mlx_lm.generate` prints, for the last response of a run."""
    return (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {response.peak_memory:.3f} GB"
    )


def generate(
    model,
    tokenizer,
    prompt: Prompt,
    verbose: bool = False,
    *,
    on_text: Optional[Callable[[str], None]] = None,
    **kwargs,
) -> str:
    """Generate and return the whole text. Options as in `stream_generate`.

    verbose: print a separator, the text as it streams, a separator and the statistics.
    on_text: called with each new text segment (for custom streaming).
    """
    if verbose:
        print("=" * 10)
    pieces = []
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(response.text)
        if on_text is not None and response.text:
            on_text(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    text = "".join(pieces)
    if verbose:
        print()
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        if response is not None:
            print(format_stats(response))
    return text

