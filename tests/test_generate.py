"""Generation: greedy parity with transformers, EOS / stop strings / max tokens, seeds, cache."""

import copy
import subprocess
import sys

import mlx.core as mx
import pytest

from marlin_mlx.generation import (
    _StopMatcher,
    chat_prompt,
    encode_prompt,
    generate,
    stream_generate,
)
from marlin_mlx.loader import load

PROMPT = "The small boat left the harbour early in the morning, when the water"


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_path):
    return load(tiny_qwen3_path)


@pytest.fixture(scope="module")
def words(qwen3):
    """A logits processor limiting a random model to whole-word tokens, so that its output is
    readable text (unconstrained, it emits byte tokens that are not valid UTF-8)."""
    model, tokenizer = qwen3
    pieces = [tokenizer.decode([i]) if i < len(tokenizer) else "" for i in range(model.args.vocab_size)]
    ok = [p.isascii() and len(p.strip()) >= 2 and p.strip().isalpha() for p in pieces]
    bias = mx.array([0.0 if k else -float("inf") for k in ok])
    return [lambda tokens, logits: logits + bias]


def _hf_greedy(path, ids, n, **extra):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # never stop early: compare all n tokens
    config.do_sample = False
    config.max_new_tokens = n
    for k, v in extra.items():
        setattr(config, k, v)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config)
    return out[0, len(ids):].tolist()


def _tokens(model, tokenizer, prompt, n, **kw):
    return [r.token for r in stream_generate(model, tokenizer, prompt, n, eos_token_ids=[], **kw)]


@pytest.mark.parametrize(
    "arch,prefill_step_size", [("llama", 512), ("qwen3", 5)], ids=["llama", "qwen3-chunked"]
)
def test_greedy_matches_transformers(make_checkpoint, arch, prefill_step_size):
    path = make_checkpoint(arch)
    model, tokenizer = load(path)
    ids = encode_prompt(tokenizer, PROMPT)
    assert len(ids) > 2 * prefill_step_size or prefill_step_size > len(ids)
    ours = _tokens(model, tokenizer, ids, 32, prefill_step_size=prefill_step_size)
    assert ours == _hf_greedy(path, ids, 32)


def test_repetition_penalty_matches_transformers(tiny_qwen3_path, qwen3):
    model, tokenizer = qwen3
    ids = encode_prompt(tokenizer, PROMPT)
    # transformers penalizes every token in the context: context size None does the same
    ours = _tokens(model, tokenizer, ids, 24, repetition_penalty=1.8, repetition_context_size=None)
    assert ours == _hf_greedy(tiny_qwen3_path, ids, 24, repetition_penalty=1.8)
    assert ours != _tokens(model, tokenizer, ids, 24)  # the penalty changed something


def test_prompt_forms_agree(qwen3):
    model, tokenizer = qwen3
    ids = encode_prompt(tokenizer, PROMPT)
    a = _tokens(model, tokenizer, PROMPT, 8)
    assert a == _tokens(model, tokenizer, ids, 8) == _tokens(model, tokenizer, mx.array(ids), 8)


def test_text_and_statistics(qwen3, words):
    model, tokenizer = qwen3
    responses = list(
        stream_generate(model, tokenizer, PROMPT, 20, eos_token_ids=[], logits_processors=words,
                        repetition_penalty=2.0)
    )
    assert len(responses) == 20
    assert [r.finish_reason for r in responses] == [None] * 19 + ["length"]
    assert [r.generation_tokens for r in responses] == list(range(1, 21))
    text = "".join(r.text for r in responses)
    # the streaming detokenizer drops the first token's leading space, as in mlx-lm
    assert text == tokenizer.decode([r.token for r in responses]).lstrip(" ")
    assert len(set(text.split())) > 5
    assert sum(1 for r in responses if r.text) >= 10  # streamed as it goes, not all at the end
    last = responses[-1]
    assert last.prompt_tokens == len(encode_prompt(tokenizer, PROMPT))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert last.logprobs.shape == (model.args.vocab_size,)
    assert abs(mx.logsumexp(last.logprobs).item()) < 1e-4


def test_eos_stops_and_is_not_text(qwen3):
    model, tokenizer = qwen3
    free = _tokens(model, tokenizer, PROMPT, 16)
    k = 6
    eos = free[k]
    first = free.index(eos)  # the chosen id may already occur earlier
    responses = list(stream_generate(model, tokenizer, PROMPT, 16, eos_token_ids=[eos]))
    assert len(responses) == first + 1
    assert responses[-1].token == eos and responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == tokenizer.decode(free[:first])


def test_default_eos_comes_from_the_tokenizer(qwen3):
    _, tokenizer = qwen3
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids


def test_stop_string_cuts_text_and_generation(qwen3, words):
    model, tokenizer = qwen3
    kw = dict(eos_token_ids=[], logits_processors=words, repetition_penalty=2.0)
    full = "".join(r.text for r in stream_generate(model, tokenizer, PROMPT, 32, **kw))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.isascii() and len(stop.strip()) > 0
    cut = full.index(stop)
    responses = list(stream_generate(model, tokenizer, PROMPT, 32, stop=[stop], **kw))
    text = "".join(r.text for r in responses)
    assert text == full[:cut]
    assert responses[-1].finish_reason == "stop"
    assert len(responses) < 32
    assert all(r.finish_reason is None for r in responses[:-1])
    # two stop strings: the earlier occurrence wins
    later = full[cut + 4 : cut + 8]
    text2 = "".join(r.text for r in stream_generate(
        model, tokenizer, PROMPT, 32, stop=[later, stop], **kw))
    assert text2 == full[: min(cut, full.index(later))]


def test_stop_matcher_holds_back_possible_prefixes():
    m = _StopMatcher(["</end>", "STOP"])
    assert m.feed("hello <", final=False) == ("hello ", False)  # "<" may start "</end>"
    assert m.feed("hello </e", final=False) == ("", False)
    assert m.feed("hello </ex", final=False) == ("</ex", False)  # not a stop after all
    assert m.feed("hello </ex ST", final=False) == (" ", False)
    assert m.feed("hello </ex STOP and more", final=False) == ("", True)
    m = _StopMatcher(["ab"])
    assert m.feed("xa", final=False) == ("x", False)
    assert m.feed("xa", final=True) == ("a", False)  # the end releases what was held
    assert _StopMatcher([]).feed("anything", final=False) == ("anything", False)


def test_seeded_sampling_is_reproducible(qwen3):
    model, tokenizer = qwen3
    kw = dict(temperature=1.0, top_p=0.95)
    a = _tokens(model, tokenizer, PROMPT, 24, seed=3, **kw)
    assert a == _tokens(model, tokenizer, PROMPT, 24, seed=3, **kw)
    assert a != _tokens(model, tokenizer, PROMPT, 24, seed=4, **kw)
    assert _tokens(model, tokenizer, PROMPT, 8, temp=0.0) == _tokens(model, tokenizer, PROMPT, 8)


def test_prompt_cache_after_early_stop(qwen3):
    model, tokenizer = qwen3
    ids = encode_prompt(tokenizer, PROMPT)
    cache = model.make_cache()
    seen = []
    for r in stream_generate(model, tokenizer, ids, 32, eos_token_ids=[], prompt_cache=cache):
        seen.append(r.token)
        if len(seen) == 5:
            break
    # prompt + all yielded tokens but the last, as after a natural end
    assert all(c.offset == len(ids) + 4 for c in cache)
    # continuing from the cache with the last token gives the uninterrupted greedy sequence
    rest = _tokens(model, tokenizer, [seen[-1]], 5, prompt_cache=cache)
    assert seen + rest == _tokens(model, tokenizer, ids, 10)


def test_generate_returns_text_and_prints_statistics(qwen3, capsys):
    model, tokenizer = qwen3
    text = generate(model, tokenizer, PROMPT, verbose=True, max_tokens=10, eos_token_ids=[])
    out = capsys.readouterr().out
    assert text and text in out
    for line in ("Prompt: ", "Generation: 10 tokens", "Peak memory: "):
        assert line in out


def test_chat_prompt_uses_template(qwen3):
    _, tokenizer = qwen3
    ids = chat_prompt(tokenizer, "Hello there", system="Be brief.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "kwargs", [dict(max_tokens=0), dict(temperature=-0.5), dict(top_p=0.0), dict(prompt="")]
)
def test_bad_arguments(qwen3, kwargs):
    model, tokenizer = qwen3
    args = {"prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(ValueError):
        next(stream_generate(model, tokenizer, args.pop("prompt"), **args))


def test_package_exports():
    import marlin_mlx

    from marlin_mlx.generation import generate

    assert marlin_mlx.stream_generate is stream_generate
    assert marlin_mlx.generate is generate


def test_package_exports_in_a_fresh_interpreter():
    # the lazy package attributes must work before marlin_mlx.generation was ever imported
    code = ("import marlin_mlx; assert callable(marlin_mlx.stream_generate); "
            "assert callable(marlin_mlx.generate); "
            "from marlin_mlx import generate, stream_generate; assert callable(generate)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-300:]
