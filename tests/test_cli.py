"""The `marlin-mlx` CLI, in process (typer's CliRunner) and as a real subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marlin_mlx.cli.main import app

PROMPT = "The train arrived at the station"
runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def _api_text(path, prompt_ids_fn, **kw):
    from marlin_mlx.generation import generate
    from marlin_mlx.loader import load

    model, tokenizer = load(path)
    return generate(model, tokenizer, prompt_ids_fn(tokenizer), **kw)


# ------------------------------------------------------------------------ help and info


def test_help_explains_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for word in ("generate", "bench", "perplexity", "memory", "doctor", "version", "Examples"):
        assert word in r.stdout
    r = invoke("generate", "--help")
    assert r.exit_code == 0
    for opt in ("--model", "--prompt", "--max-tokens", "--temp", "--top-p", "--top-k", "--min-p",
                "--repetition-penalty", "--seed", "--chat", "--system", "--stop", "--quiet"):
        assert opt in r.stdout
    assert "Examples" in r.stdout
    assert "Traceback" not in r.output


def test_version():
    import marlin_mlx

    for args in (["version"], ["--version"]):
        r = invoke(*args)
        assert r.exit_code == 0
        assert r.stdout.startswith(f"marlin-mlx {marlin_mlx.__version__} (mlx ")


def test_doctor_without_kernel_report(monkeypatch):
    from marlin_mlx import kernels

    monkeypatch.delattr(kernels, "doctor_report", raising=False)
    r = invoke("doctor")
    assert r.exit_code == 0, r.output
    import mlx.core as mx

    assert f"mlx            {mx.__version__}" in r.stdout
    assert "backend" in r.stdout and "device" in r.stdout
    expected = "cpu" if mx.default_device() == mx.cpu else "gpu ("
    assert expected in r.stdout
    assert "no self-test report" in r.stdout


def test_doctor_with_the_real_kernel_report():
    r = invoke("doctor")
    assert r.exit_code in (0, 1), r.output  # 1 only when a kernel self-test failed
    assert "backend" in r.stdout and "Traceback" not in r.output
    if r.exit_code == 1:
        assert r.stderr.startswith("error: ") and "self-test" in r.stderr


def test_doctor_prints_the_kernel_table(monkeypatch):
    from marlin_mlx import kernels

    rows = [dict(op="qmv", format="affine-4", self_test="pass", chosen_path="custom",
                 detail="1.6x vs builtin")]
    monkeypatch.setattr(kernels, "doctor_report", lambda: rows, raising=False)
    r = invoke("doctor")
    assert r.exit_code == 0
    header = next(line for line in r.stdout.splitlines() if line.startswith("op"))
    assert header.split() == ["op", "format", "self_test", "chosen_path", "detail"]
    assert any(line.split()[:4] == ["qmv", "affine-4", "pass", "custom"]
               for line in r.stdout.splitlines())

    rows.append(dict(op="qmm", format="mxfp4", self_test="fail", chosen_path="reference",
                     detail="max err 3e-1"))
    r = invoke("doctor")
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: 1 kernel self-test(s) failed"


# ------------------------------------------------------------------------ generate


def test_generate_quiet_matches_the_api(tiny_qwen3_path):
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", PROMPT, "--no-chat", "-n", "12", "-q")
    assert r.exit_code == 0, r.output
    from marlin_mlx.generation import encode_prompt

    expected = _api_text(tiny_qwen3_path, lambda t: encode_prompt(t, PROMPT), max_tokens=12)
    assert r.stdout == expected + "\n"
    assert r.stderr == ""


def test_generate_verbose_statistics(tiny_llama_path):
    r = invoke("generate", "--model", str(tiny_llama_path), "--prompt", PROMPT, "--no-chat",
               "--max-tokens", "7")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "=" * 10
    assert lines[-4] == "=" * 10
    assert lines[-3].startswith("Prompt: ") and "tokens-per-sec" in lines[-3]
    assert lines[-2].startswith("Generation: ") and "tokens-per-sec" in lines[-2]
    assert lines[-1].startswith("Peak memory: ") and lines[-1].endswith(" GB")


def test_generate_chat_by_default_with_system(tiny_qwen3_path):
    from marlin_mlx.generation import chat_prompt

    expected = _api_text(tiny_qwen3_path, lambda t: chat_prompt(t, PROMPT, "Be brief."),
                         max_tokens=10)
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", PROMPT, "--system", "Be brief.",
               "-n", "10", "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout == expected + "\n"
    plain = invoke("generate", "-m", str(tiny_qwen3_path), "-p", PROMPT, "--no-chat", "-n", "10",
                   "-q")
    assert plain.stdout != r.stdout


def test_generate_sampling_options_and_stdin(tiny_qwen3_path):
    from marlin_mlx.generation import encode_prompt

    opts = ["--temp", "0.9", "--top-p", "0.9", "--top-k", "50", "--min-p", "0.01",
            "--repetition-penalty", "1.3", "--seed", "5"]
    expected = _api_text(tiny_qwen3_path, lambda t: encode_prompt(t, PROMPT), max_tokens=16,
                         temperature=0.9, top_p=0.9, top_k=50, min_p=0.01,
                         repetition_penalty=1.3, seed=5)
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", "-", "--no-chat", "-n", "16", "-q",
               *opts, input=PROMPT + "\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == expected + "\n"


def test_bundled_default_model(monkeypatch, tiny_llama_path):
    import marlin_mlx.bundled

    monkeypatch.setattr(marlin_mlx.bundled, "default_model_path", lambda: None)
    r = invoke("generate", "-p", PROMPT)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: no bundled default model") and "--model" in r.stderr
    monkeypatch.setattr(marlin_mlx.bundled, "default_model_path", lambda: Path(tiny_llama_path))
    r = invoke("generate", "-p", PROMPT, "-n", "3", "-q")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args",
    [["--top-p", "0"], ["--top-p", "1.5"], ["--temp", "-1"], ["--min-p", "1"], ["--top-k", "-2"],
     ["--max-tokens", "0"], ["--repetition-penalty", "0"], ["--dtype", "int8"], ["--bogus"]],
)
def test_usage_errors_exit_2(tiny_qwen3_path, args):
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", PROMPT, *args)
    assert r.exit_code == 2
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------ bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def _bad_input(kind: str, good: Path, tmp: Path):
    """(model argument, a word the error line must contain) for each kind of bad input."""
    if kind == "missing":
        return str(tmp / "no-such-model"), "no-such-model"
    if kind == "file":
        return str(good / "config.json"), "config.json"
    if kind == "not-a-model":
        (tmp / "empty").mkdir()
        return str(tmp / "empty"), "empty"
    path = _copy(good, tmp / kind)
    weights = path / "model.safetensors"
    if kind == "unknown-type":
        _edit_config(path, model_type="gpt9000")
        return str(path), "gpt9000"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return str(path), "model.safetensors"
    if kind == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file" * 10)
        return str(path), "model.safetensors"
    if kind == "shape-mismatch":
        _edit_config(path, intermediate_size=96)
        return str(path), "shape"
    if kind == "bad-json":
        (path / "config.json").write_text("{ not json")
        return str(path), "config.json"
    if kind == "no-chat-template":
        (path / "chat_template.jinja").unlink(missing_ok=True)
        return str(path), "chat template"
    raise AssertionError(kind)


BAD = ["missing", "file", "not-a-model", "unknown-type", "truncated", "garbage",
       "shape-mismatch", "bad-json", "no-chat-template"]


def _assert_one_error_line(stderr: str, word: str):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert word in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_in_process(tiny_qwen3_path, tmp_path, kind):
    model, word = _bad_input(kind, tiny_qwen3_path, tmp_path)
    r = invoke("generate", "-m", model, "-p", PROMPT, "--chat", "-n", "2")
    assert r.exit_code == 1, r.output
    _assert_one_error_line(r.stderr, word)
    assert r.stdout == ""


def test_other_user_errors(tiny_qwen3_path):
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", "   ")
    assert r.exit_code == 1 and r.stderr == "error: the prompt is empty\n"
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", PROMPT, "--no-chat", "--system", "x")
    assert r.exit_code == 1 and r.stderr.startswith("error: --system")


def test_unexpected_error_is_one_line_unless_debugging(monkeypatch, tiny_qwen3_path):
    import marlin_mlx.loader

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(marlin_mlx.loader, "load", broken)
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", PROMPT)
    assert r.exit_code == 1
    assert r.stderr == ("error: RuntimeError: disk on fire second line "
                        "(set MARLIN_MLX_DEBUG=1 for a traceback)\n")
    monkeypatch.setenv("MARLIN_MLX_DEBUG", "1")
    r = invoke("generate", "-m", str(tiny_qwen3_path), "-p", PROMPT)
    assert isinstance(r.exception, RuntimeError)


# ------------------------------------------------------------------------ subprocess


def _entry_points():
    script = Path(sys.executable).parent / "marlin-mlx"
    points = [[sys.executable, "-m", "marlin_mlx.cli.main"]]
    if script.exists():
        points.append([str(script)])
    return points


def _run(cmd, *args, input=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MARLIN_MLX_DEBUG", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=input, env=env,
                          timeout=120)


@pytest.mark.parametrize("cmd", _entry_points(), ids=lambda c: Path(c[-1]).name)
def test_subprocess_help_and_generate(cmd, tiny_qwen3_path):
    r = _run(cmd, "--help")
    assert r.returncode == 0 and "generate" in r.stdout and "marlin-mlx" in r.stdout
    r = _run(cmd, "generate", "-m", str(tiny_qwen3_path), "-p", "-", "--no-chat", "-n", "6",
             input=PROMPT)
    assert r.returncode == 0, r.stderr
    assert "Generation: 6 tokens" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_subprocess(tiny_qwen3_path, tmp_path, kind):
    model, word = _bad_input(kind, tiny_qwen3_path, tmp_path)
    r = _run(_entry_points()[-1], "generate", "-m", model, "-p", PROMPT, "--chat", "-n", "2")
    assert r.returncode == 1, r.stderr
    _assert_one_error_line(r.stderr, word)


def test_subprocess_usage_error_exit_2():
    r = _run(_entry_points()[-1], "generate", "--top-k", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
