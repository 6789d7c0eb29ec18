"""Sliding-window perplexity: window coverage, a model whose answer is known exactly, and parity
with transformers on the same checkpoint, text and windows."""

import json
import math
import shutil

import mlx.core as mx
import pytest
import typer
from typer.testing import CliRunner

from marlin_mlx.errors import MarlinError
from marlin_mlx.loader import load
from marlin_mlx.perplexity import evaluate_file, perplexity, sliding_windows

from conftest import MODEL_VOCAB, TEXT


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 2), (100, 16, 5), (64, 64, 64),
                                              (513, 512, 256), (1000, 512, 256), (7, 512, 256)])
def test_windows_score_every_target_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = []
    for i, w in enumerate(windows):
        assert 0 <= w.begin < w.score_from <= w.end <= n
        assert w.end - w.begin <= context
        assert w.begin == i * stride
        if i > 0:  # every scored target has at least context - stride tokens of history
            assert w.score_from - w.begin >= min(context - stride, w.score_from)
        scored.extend(range(w.score_from, w.end))
    assert scored == list(range(1, n))
    assert windows[-1].end == n


def test_window_errors():
    with pytest.raises(MarlinError, match="--stride"):
        sliding_windows(100, 16, 17)
    with pytest.raises(MarlinError, match="--stride"):
        sliding_windows(100, 16, 0)
    with pytest.raises(MarlinError, match="--context"):
        sliding_windows(100, 1, 1)
    with pytest.raises(MarlinError, match="at least 2 tokens"):
        sliding_windows(1, 16, 8)


def test_uniform_model_has_perplexity_equal_to_vocab(make_checkpoint, tmp_path):
    """lm_head = 0 makes every logit 0: each token costs log(V) nats, perplexity is exactly V."""
    src = make_checkpoint("llama")  # untied head
    dst = tmp_path / "uniform"
    shutil.copytree(src, dst)
    files = list(dst.glob("*.safetensors"))
    found = False
    for f in files:
        w = mx.load(str(f))
        if "lm_head.weight" in w:
            w["lm_head.weight"] = mx.zeros_like(w["lm_head.weight"])
            mx.save_safetensors(str(f), w, metadata={"format": "pt"})
            found = True
    assert found
    model, tok = load(dst)
    tokens = tok.encode(TEXT)
    res = perplexity(model, tokens, context=48, stride=20, progress=False)
    assert res.n_scored == len(tokens) - 1
    assert res.perplexity == pytest.approx(MODEL_VOCAB, rel=1e-5)
    # the unmodified model is far from uniform: the check cannot pass by accident
    model0, _ = load(src)
    assert abs(perplexity(model0, tokens, 48, 20, progress=False).perplexity - MODEL_VOCAB) > 1


def _transformers_ppl(path, tokens, context, stride):
    """Reference: transformers (PyTorch, float64) over the same windows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in sliding_windows(len(tokens), context, stride):
            ids = torch.tensor([tokens[w.begin:w.end]])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for p in range(w.score_from, w.end):
                total -= logp[p - w.begin - 1, tokens[p]].item()
                count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_matches_transformers(make_checkpoint, arch, tmp_path):
    path = make_checkpoint(arch)
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(path).encode(TEXT)
    assert len(tokens) > 200  # several windows
    ref, count = _transformers_ppl(path, tokens, context=64, stride=24)

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    res = evaluate_file(path, data, context=64, stride=24, progress=False)
    assert res["n_scored"] == count == len(tokens) - 1
    assert res["perplexity"] == pytest.approx(ref, rel=1e-3)
    assert res["n_windows"] == len(sliding_windows(len(tokens), 64, 24))

    # batching windows changes nothing; --max-tokens truncates before windowing
    model, _ = load(path)
    batched = perplexity(model, tokens, 64, 24, batch_size=3, progress=False)
    assert batched.perplexity == pytest.approx(res["perplexity"], rel=1e-5)
    short = perplexity(model, tokens, 64, 24, max_tokens=100, progress=False)
    assert short.n_scored == 99 and short.n_tokens == 100
    ref_short, _ = _transformers_ppl(path, tokens[:100], 64, 24)
    assert short.perplexity == pytest.approx(ref_short, rel=1e-3)


def test_cli_baseline_and_json(tiny_qwen3_path, tmp_path):
    from marlin_mlx.cli.bench import perplexity as perplexity_cmd

    app = typer.Typer()
    app.command("perplexity")(perplexity_cmd)
    app.command("noop")(lambda: None)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    out = tmp_path / "ppl.json"
    r = CliRunner().invoke(app, ["perplexity", "-m", str(tiny_qwen3_path), "--data", str(data),
                                 "--context", "64", "--stride", "32", "--max-tokens", "150",
                                 "--baseline", str(tiny_qwen3_path), "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["kind"] == "perplexity" and len(report["results"]) == 2
    assert report["results"][0]["n_scored"] == 149
    assert report["delta"]["perplexity"] == 0.0
    assert "delta vs baseline: +0.0000" in r.output

    r = CliRunner().invoke(app, ["perplexity", "-m", str(tiny_qwen3_path), "--data",
                                 str(tmp_path / "missing.txt")])
    assert r.exit_code == 1 and "error:" in r.output and "missing.txt" in r.output
