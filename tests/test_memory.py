"""`marlin-mlx memory`: the phase split adds up and the KV cache has the size its shapes give."""

import json

import pytest
import typer
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from marlin_mlx.loader import load_model
from marlin_mlx.memory import format_memory, profile_memory

CONTEXT, GEN, BATCH = 300, 12, 2


@pytest.mark.parametrize("runtime", ["marlin-mlx", "mlx-lm"])
def test_profile_fields_are_consistent(tiny_llama_path, runtime):
    r = json.loads(json.dumps(profile_memory(tiny_llama_path, context=CONTEXT, gen_tokens=GEN,
                                             batch_size=BATCH, prefill_step=128,
                                             runtime=runtime)))
    assert r["kind"] == "memory" and r["runtime"] == runtime
    model, config = load_model(tiny_llama_path)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    kv_heads = config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    tokens = CONTEXT + GEN
    # float32 keys and values, every layer, every sequence, every token
    kv_exact = config["num_hidden_layers"] * 2 * BATCH * kv_heads * head_dim * tokens * 4
    assert r["decode"]["kv_used_bytes"] == kv_exact
    assert r["decode"]["kv_bytes_per_token"] == kv_exact / (BATCH * tokens)
    assert r["kv_layers"] == config["num_hidden_layers"]

    base = r["baseline_bytes"]
    for phase in ("load", "prefill", "decode"):
        p = r[phase]
        assert p["weights_bytes"] == weights
        # the peak holds at least the weights and the cache ("other" is the remainder)
        assert p["other_bytes"] >= 0 and p["kv_cache_bytes"] >= 0
        assert p["peak_bytes"] <= r["peak_bytes"]
    assert r["load"]["kv_cache_bytes"] == 0
    # allocated cache: whole 256-token steps, at least what is used
    assert r["prefill"]["kv_cache_bytes"] >= kv_exact * CONTEXT // tokens
    assert r["decode"]["kv_cache_bytes"] >= kv_exact
    assert r["prefill"]["active_after_bytes"] <= r["prefill"]["peak_bytes"]
    assert r["prefill"]["active_after_bytes"] >= base + weights + r["prefill"]["kv_cache_bytes"]
    # prefill (logits and attention over 128-token chunks) needs more than one decode step
    assert r["prefill"]["other_bytes"] > r["decode"]["other_bytes"]
    text = format_memory(r)
    assert "KV cache" in text and "weights" in text and "peak usage" in text


def test_cli_memory_random_weights(tmp_path):
    from marlin_mlx.cli.bench import memory
    from marlin_mlx.random_weights import PRESETS

    app = typer.Typer()
    app.command("memory")(memory)
    app.command("noop")(lambda: None)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**PRESETS["qwen3-8b"], "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256}))
    out = tmp_path / "mem.json"
    r = CliRunner().invoke(app, ["memory", "--random-weights", str(cfg), "--context", "40",
                                 "--gen-tokens", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["model"] == f"random:{cfg}"
    # 2 layers x (k, v) x 2 kv heads x 32 x 44 tokens x 4 bytes
    assert report["decode"]["kv_used_bytes"] == 2 * 2 * 2 * 32 * 44 * 4
    r = CliRunner().invoke(app, ["memory", "--random-weights", str(cfg), "--context", "0"])
    assert r.exit_code == 1 and "error:" in r.output
