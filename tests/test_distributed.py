"""Tensor parallelism (marlin_mlx.distributed): two processes on 127.0.0.1 with MLX's ring
backend, started by `mlx.launch`, against one process.

Tiny random checkpoints (Llama with biases, tied-embedding Qwen3 saved in bf16, Qwen3-MoE,
GLM-4.7-Flash; each also as a 4-bit affine checkpoint) must give the same prefill logits,
decode-step logits (within 1e-4, float32) and greedy tokens sharded over two ranks as loaded
whole. One launch runs every case (tests/distributed_worker.py), so the suite pays for the
process start-up once.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from marlin_mlx.kernels import quantize_modules
from marlin_mlx.loader import load_model
from parity import rel_err

HERE = Path(__file__).parent
PYTHON = sys.executable
LAUNCH = str(Path(PYTHON).parent / "mlx.launch")
TOL = 1e-4
# dense MLP widths that leave each of 2 ranks whole 32-wide quantization groups
QUANT_OVERRIDES = {"intermediate_size": 128}

pytestmark = pytest.mark.skipif(not Path(LAUNCH).is_file(), reason="mlx.launch not installed")


def _free_ports(n: int) -> int:
    """A base port with n free consecutive ports (the ring backend listens on base..base+n-1)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch(args: list, n: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n N` on 127.0.0.1; the whole process group dies on timeout."""
    cmd = [LAUNCH, "--backend", "ring", "-n", str(n), "-p", str(_free_ports(n)), "--", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=HERE.parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mlx.launch timed out after {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def quantized_copy(src: Path, dst: Path, group_size: int = 32, bits: int = 4) -> Path:
    """The checkpoint quantized (4-bit affine, every layer that fits) in mlx-lm's layout."""
    model, config = load_model(src)
    quantize_modules(model, group_size=group_size, bits=bits)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def build_hf(builder, out_dir: Path, **overrides) -> Path:
    builder(out_dir, **overrides)
    return out_dir


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint, tmp_path_factory):
    """name -> checkpoint folder, for the parity cases."""
    from test_glm4_moe_lite import build as build_glm
    from test_qwen3_moe import build as build_moe

    tmp = tmp_path_factory.mktemp("tp")
    ck = {
        "llama": make_checkpoint("llama", attention_bias=True, mlp_bias=True),
        "qwen3_tied_bf16": make_checkpoint("qwen3", save_dtype="bfloat16"),
        "qwen3_moe": build_hf(build_moe, tmp / "moe"),
        "glm": build_hf(build_glm, tmp / "glm"),
    }
    quant_src = {
        "llama": ck["llama"],
        "qwen3_tied_bf16": ck["qwen3_tied_bf16"],
        "qwen3_moe": build_hf(build_moe, tmp / "moe-q-src", **QUANT_OVERRIDES),
        "glm": build_hf(build_glm, tmp / "glm-q-src", moe_intermediate_size=64, **QUANT_OVERRIDES),
    }
    for name, src in quant_src.items():
        ck[f"{name}_4bit"] = quantized_copy(src, tmp / f"{name}-4bit")
    return ck


@pytest.fixture(scope="module")
def bad_checkpoints(make_checkpoint, tmp_path_factory):
    """name -> (folder, words the error must contain)."""
    from test_glm4_moe_lite import build as build_glm

    tmp = tmp_path_factory.mktemp("tp-bad")
    heads = make_checkpoint("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    # the shared expert's 32 hidden features: 16 per rank, not a whole 32-wide group
    glm = quantized_copy(build_hf(build_glm, tmp / "glm-src", **QUANT_OVERRIDES), tmp / "glm-q")
    return {"heads": (heads, ["3 attention heads", "2 ranks"]),
            "groups": (glm, ["shared_experts.down_proj", "quantization groups", "whole groups"])}


@pytest.fixture(scope="module")
def two_ranks(checkpoints, bad_checkpoints, tmp_path_factory):
    """Every case run once by two ranks; returns (outputs folder, launch result)."""
    out = tmp_path_factory.mktemp("tp-out")
    cases = [{"path": str(p), "out": str(out / f"{name}.npz")} for name, p in checkpoints.items()]
    cases += [{"path": str(checkpoints[name]), "out": str(out / f"{name}_in_memory.npz"),
               "in_memory": True} for name in IN_MEMORY]
    cases += [{"path": str(checkpoints[name]), "tokenizer": str(checkpoints["llama"]),
               "serve": str(out / f"{name}_serve.json")} for name in SERVE]
    cases += [{"path": str(p), "error": str(out / f"{name}.txt")}
              for name, (p, _) in bad_checkpoints.items()]
    (out / "cases.json").write_text(json.dumps(cases))
    result = launch([PYTHON, str(HERE / "distributed_worker.py"), str(out / "cases.json")])
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


CASES = ["llama", "qwen3_tied_bf16", "qwen3_moe", "glm", "llama_4bit", "qwen3_tied_bf16_4bit",
         "qwen3_moe_4bit", "glm_4bit"]
# also split after loading whole (distributed.shard_model) instead of while reading
IN_MEMORY = ["qwen3_tied_bf16_4bit", "glm_4bit"]
SERVE = ["llama", "glm_4bit"]  # paged KV cache and the paged latent (MLA) cache


@pytest.mark.parametrize("name", CASES + [f"{n}_in_memory" for n in IN_MEMORY])
def test_two_ranks_match_one_process(name, checkpoints, two_ranks):
    from distributed_worker import greedy_run

    out, _ = two_ranks
    got = np.load(out / f"{name}.npz")
    name = name.removesuffix("_in_memory")
    model, config = load_model(checkpoints[name])
    want = greedy_run(model, config["vocab_size"])
    assert got["prefill"].shape == want["prefill"].shape  # full vocabulary after the gather
    assert rel_err(got["prefill"], want["prefill"]) < TOL
    assert rel_err(got["steps"], want["steps"]) < TOL
    assert got["tokens"].tolist() == want["tokens"].tolist()


@pytest.mark.parametrize("name", SERVE)
def test_serving_engine_with_followers_matches_one_process(name, checkpoints, two_ranks):
    """Rank 0's engine broadcasts every step to rank 1 (distributed.follow): the same tokens
    as the engine in one process, for batched greedy requests and a seeded sample."""
    from distributed_worker import make_engine, serve_requests

    from marlin_mlx.loader import load_tokenizer

    out, _ = two_ranks
    got = json.loads((out / f"{name}_serve.json").read_text())
    model, config = load_model(checkpoints[name])
    engine = make_engine(model, load_tokenizer(checkpoints["llama"]))
    engine.start()
    try:
        want = serve_requests(engine, config["vocab_size"])
    finally:
        engine.stop()
    assert got == want
    assert all(len(t) > 1 for t in want)


def test_both_ranks_ran(two_ranks):
    _, result = two_ranks
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout


@pytest.mark.parametrize("name", ["heads", "groups"])
def test_bad_split_is_a_clear_error(name, bad_checkpoints, two_ranks):
    out, _ = two_ranks
    message = (out / f"{name}.txt").read_text()
    for words in bad_checkpoints[name][1]:
        assert words in message, message
    assert "\n" not in message


def test_shard_reads_only_the_ranks_part(checkpoints):
    """Each rank's tensors are its slices: 2 ranks hold about half the weights each, and the
    slices read from the file equal the slices of the whole tensor."""
    from marlin_mlx.loader import check_safetensors, read_tensor_slice

    path = checkpoints["llama_4bit"] / "model.safetensors"
    header, start = check_safetensors(path)
    whole = mx.load(str(path))
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.scales",
                 "model.layers.1.mlp.up_proj.biases", "lm_head.weight"):
        info = {**header[name], "__name__": name}
        for axis in range(len(info["shape"])):
            n = info["shape"][axis] // 2
            part = read_tensor_slice(path, info, start, (axis, n, 2 * n))
            index = [slice(None)] * len(info["shape"])
            index[axis] = slice(n, 2 * n)
            assert mx.array_equal(part, whole[name][tuple(index)]), (name, axis)


@pytest.mark.slow
def test_cli_generate_distributed_matches_single_process():
    """`marlin-mlx generate --distributed` under mlx.launch prints rank 0's text only, the same
    greedy text as one process (the bundled 4-bit demo model, tied embeddings)."""
    from marlin_mlx.bundled import default_model_path
    from marlin_mlx.generation import generate
    from marlin_mlx.loader import load, sampling_defaults

    path = default_model_path()
    if path is None:
        pytest.skip("no bundled model")
    cli = shutil.which("marlin-mlx", path=str(Path(PYTHON).parent))
    prompt = "Once upon a time"
    result = launch([cli, "generate", "-m", str(path), "-p", prompt, "-n", "12", "--temp", "0",
                     "--no-chat", "-q", "--distributed"])
    assert result.returncode == 0, result.stderr
    model, tok = load(path)
    # the CLI applies the checkpoint's recommended settings (a repetition penalty here)
    want = generate(model, tok, prompt, max_tokens=12, **{**sampling_defaults(path),
                                                          "temperature": 0.0})
    assert result.stdout.strip() == want.strip()  # printed once: rank 1 stays silent


@pytest.mark.slow
def test_cli_serve_distributed_matches_single_process():
    """`marlin-mlx serve --distributed` under mlx.launch: rank 0 serves over HTTP, rank 1 follows
    each engine step on its shard; greedy completions equal one process's generate."""
    import urllib.request

    from marlin_mlx.bundled import default_model_path
    from marlin_mlx.generation import generate
    from marlin_mlx.loader import load

    path = default_model_path()
    if path is None:
        pytest.skip("no bundled model")
    cli = shutil.which("marlin-mlx", path=str(Path(PYTHON).parent))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "-p", str(_free_ports(2)), "--", cli, "serve",
           str(path), "--port", str(port), "--distributed", "--max-model-len", "256",
           "--log-level", "warning", "--served-model-name", "demo"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=HERE.parent)

    def post(prompt):
        body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 10,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["choices"][0]["text"]

    try:
        import time

        deadline = time.time() + 150
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not come up:\n{proc.stdout.read()}")
                time.sleep(0.5)
        prompts = ["Once upon a time", "It is a truth universally acknowledged"]
        got = [post(p) for p in prompts]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    model, tok = load(path)
    assert got == [generate(model, tok, p, max_tokens=10, temperature=0.0) for p in prompts]
