"""`marlin-mlx bench` and random-weight checkpoints: well-formed results, identical weights.

No timing thresholds: the checks are on structure, types, signs and on what must be equal.
"""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import typer
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from marlin_mlx.bench import BenchSettings, format_report, run_bench
from marlin_mlx.errors import MarlinError
from marlin_mlx.random_weights import (PRESETS, build_lazy_model, quantization_settings,
                                       resolve_config, save_random_checkpoint)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=384, max_position_embeddings=512)
SETTINGS = dict(prompt_tokens=[8, 24], gen_tokens=4, trials=2, warmup=1, batch_size=2)


def _positive_stat(stat):
    assert set(stat) >= {"median", "mean", "stdev", "min", "max", "values"}
    assert len(stat["values"]) == SETTINGS["trials"]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in stat["values"])
    assert stat["min"] <= stat["median"] <= stat["max"]
    assert stat["stdev"] >= 0


def _check_runtime(run, vocab):
    load = run["load"]
    assert load["load_time_s"] > 0
    assert isinstance(load["weight_bytes"], int) and load["weight_bytes"] > 0
    assert 0 < load["decode_read_bytes"] <= load["weight_bytes"]
    assert load["load_peak_memory_bytes"] >= load["weight_bytes"]
    assert len(run["results"]) == len(SETTINGS["prompt_tokens"])
    for row, P in zip(run["results"], SETTINGS["prompt_tokens"]):
        assert row["prompt_tokens"] == P and row["gen_tokens"] == SETTINGS["gen_tokens"]
        assert row["batch_size"] == SETTINGS["batch_size"]
        for key in ("prefill_tps", "decode_tps", "ttft_s"):
            _positive_stat(row[key])
        assert row["peak_memory_bytes"] >= load["weight_bytes"]
        assert row["kv_cache_bytes"] > 0
        assert row["weights_gbps"] > 0
        toks = row["tokens_first_trial"]  # (batch, 1 + gen_tokens) real greedy tokens
        assert len(toks) == SETTINGS["batch_size"]
        assert all(len(t) == SETTINGS["gen_tokens"] + 1 for t in toks)
        assert all(isinstance(x, int) and 0 <= x < vocab for t in toks for x in t)


def test_bench_compare_mlx_lm_json(tiny_qwen3_path, tmp_path):
    report = run_bench(model=str(tiny_qwen3_path), settings=BenchSettings(**SETTINGS),
                       compare_with="mlx-lm")
    report = json.loads(json.dumps(report))  # everything is JSON-serializable
    assert report["kind"] == "bench" and report["schema"].startswith("marlin-mlx/bench/")
    m = report["machine"]
    for key in ("device", "device_name", "mlx", "mlx_lm", "platform", "date"):
        assert m[key], key
    assert m["mlx"] == mx.__version__
    assert set(report["runtimes"]) == {"marlin-mlx", "mlx-lm"}
    vocab = report["config"]["vocab_size"]
    for run in report["runtimes"].values():
        _check_runtime(run, vocab)
    ours, theirs = report["runtimes"]["marlin-mlx"], report["runtimes"]["mlx-lm"]
    # the same float32 checkpoint: same bytes, and greedy decoding agrees token for token
    assert ours["load"]["weight_bytes"] == theirs["load"]["weight_bytes"]
    ratios = [r for r in report["ratios"] if "prompt_tokens" in r]
    assert [r["prompt_tokens"] for r in ratios] == SETTINGS["prompt_tokens"]
    for r, a, b in zip(ratios, ours["results"], theirs["results"]):
        expected = a["decode_tps"]["median"] / b["decode_tps"]["median"]
        assert r["decode_tps"] == pytest.approx(expected)
        for key in ("prefill_tps", "ttft_s", "peak_memory"):
            assert r[key] > 0
        assert r["greedy_prefix_agreement"] == 1.0
        assert a["tokens_first_trial"] == b["tokens_first_trial"]
    text = format_report(report)
    assert "decode tok/s" in text and "mlx-lm" in text and "ratio" in text


MOE_TINY = dict(moe_intermediate_size=32, num_experts_per_tok=2, vocab_size=384)
TINY_OF = {
    "qwen3-8b": (TINY, "model.layers.0.mlp.up_proj"),
    "qwen3-30b-a3b": ({**TINY, **MOE_TINY, "num_experts": 4},
                      "model.layers.1.mlp.switch_mlp.up_proj"),
    "glm-4.7-flash": ({**TINY, **MOE_TINY, "n_routed_experts": 4, "num_key_value_heads": 4,
                       "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 32,
                       "qk_rope_head_dim": 32, "v_head_dim": 32},
                      "model.layers.1.mlp.switch_mlp.up_proj"),
}


@pytest.mark.parametrize("preset", list(TINY_OF))
def test_random_weights_identical_for_both_runtimes(tmp_path, preset):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from marlin_mlx.loader import load_model

    overrides, quantized_layer = TINY_OF[preset]
    path = save_random_checkpoint(preset, tmp_path / "rw", bits=4, group_size=32,
                                  dtype=mx.float32, config_overrides=overrides)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert cfg["model_type"] == PRESETS[preset]["model_type"] and cfg["hidden_size"] == 64
    ours, _ = load_model(path)
    theirs, _ = mlx_lm_load_model(path)
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(theirs.parameters()))
    assert set(a) == set(b)
    assert f"{quantized_layer}.scales" in a  # quantized (stacked experts too), not dense
    assert a[f"{quantized_layer}.weight"].dtype == mx.uint32
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    ids = mx.array([[1, 5, 9, 200, 7]])
    la, lb = ours(ids), theirs(ids)
    assert mx.all(mx.isfinite(la)).item()
    np.testing.assert_allclose(np.array(la), np.array(lb), rtol=1e-4, atol=1e-4)


def test_random_weights_are_seeded(tmp_path):
    kw = dict(bits=4, dtype=mx.float32, config_overrides=TINY)
    p1 = save_random_checkpoint("qwen3-4b", tmp_path / "a", seed=3, **kw)
    p2 = save_random_checkpoint("qwen3-4b", tmp_path / "b", seed=3, **kw)
    p3 = save_random_checkpoint("qwen3-4b", tmp_path / "c", seed=4, **kw)
    w = [mx.load(str(next(p.glob("*.safetensors")))) for p in (p1, p2, p3)]
    k = "model.layers.1.self_attn.q_proj.weight"
    assert np.array_equal(np.array(w[0][k]), np.array(w[1][k]))
    assert not np.array_equal(np.array(w[0][k]), np.array(w[2][k]))
    assert "lm_head.weight" not in w[0]  # Qwen3-4B ties its embeddings


@pytest.mark.parametrize("preset,params", [("qwen3-8b", 8_190_735_360),
                                           ("qwen3-4b", 4_022_468_096),
                                           ("llama-3.1-8b", 8_030_261_248)])
def test_presets_have_the_real_parameter_counts(preset, params):
    # lazy: shapes only, nothing is allocated
    model = build_lazy_model(resolve_config(preset), None, mx.bfloat16)
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == params


def test_presets_and_config_path(tmp_path):
    assert set(PRESETS) == {"qwen3-8b", "qwen3-4b", "llama-3.1-8b", "glm-4.7-flash",
                            "qwen3-30b-a3b"}
    assert PRESETS["glm-4.7-flash"]["model_type"] == "glm4_moe_lite"
    assert PRESETS["qwen3-30b-a3b"]["model_type"] == "qwen3_moe"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**PRESETS["qwen3-8b"], "num_hidden_layers": 3}))
    assert resolve_config(cfg)["num_hidden_layers"] == 3
    assert resolve_config(tmp_path)["num_hidden_layers"] == 3  # a folder with config.json
    with pytest.raises(MarlinError, match="unknown random-weights preset"):
        resolve_config("qwen9-1t")


def test_unimplemented_architecture_is_named(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**PRESETS["qwen3-8b"], "model_type": "mamba9"}))
    with pytest.raises(MarlinError, match="'mamba9'"):
        save_random_checkpoint(cfg, tmp_path / "out")


def test_quantization_options():
    assert quantization_settings(16, None) is None
    assert quantization_settings(4, None) == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert quantization_settings(None, None, "mxfp4")["group_size"] == 32
    assert quantization_settings(4, None, "nvfp4")["group_size"] == 16
    for bad in [(7, 64, "affine"), (4, 48, "affine"), (4, 64, "mxfp4"), (4, None, "int3")]:
        with pytest.raises(MarlinError):
            quantization_settings(*bad)


def _app():
    from marlin_mlx.cli.bench import bench

    app = typer.Typer()
    app.command()(bench)
    app.command("noop")(lambda: None)  # two commands, so the command name is required
    return app


def test_cli_random_weights_compare(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**PRESETS["llama-3.1-8b"], **TINY}))
    out = tmp_path / "res" / "b.json"
    r = CliRunner().invoke(_app(), ["bench", "--random-weights", str(cfg), "--bits", "8",
                                    "--group-size", "32", "--prompt-tokens", "6", "--gen-tokens",
                                    "3", "--trials", "1", "--compare", "mlx-lm", "--json",
                                    str(out), "-q", "--interleave"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["random_weights"] == str(cfg)
    assert report["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert set(report["runtimes"]) == {"marlin-mlx", "mlx-lm"} and "ratios" in report
    assert report["config"]["model_type"] == "llama"
    assert report["settings"]["interleave"] is True


@pytest.mark.parametrize("args,message", [
    (["--prompt-tokens", "12,x"], "--prompt-tokens"),
    (["--trials", "0"], "--trials"),
    (["--compare", "vllm"], "only mlx-lm"),
    (["--random-weights", "qwen3-8b"], "exactly one of"),
])
def test_cli_errors_are_one_line(tiny_llama_path, args, message):
    r = CliRunner().invoke(_app(), ["bench", "-m", str(tiny_llama_path), *args])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.output


def test_report_tables_from_results(tiny_qwen3_path, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_report", Path(__file__).resolve().parents[1] / "benchmarks" / "report.py")
    report_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_mod)
    results = tmp_path / "results"
    results.mkdir()
    report = run_bench(model=str(tiny_qwen3_path), compare_with="mlx-lm",
                       settings=BenchSettings(prompt_tokens=[8], gen_tokens=2, trials=1))
    (results / "tiny.json").write_text(json.dumps(report))
    (results / "other.json").write_text(json.dumps({"something": 1}))
    text = report_mod.build(results, tmp_path / "RESULTS.md", plots=False)
    assert (tmp_path / "RESULTS.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 3  # one per runtime, one ratio row
    ratio = report["ratios"][0]["decode_tps"]
    assert f"{ratio:.2f}x" in rows[2]
    assert "- something: 1" in text.split("## Other results")[1]
