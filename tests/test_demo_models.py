"""The trained demo models: bf16 HF checkpoints agree with transformers, the bundled default runs.

benchmarks/demo_models/demo-{small,base} are the bf16 HF checkpoints (trained by
benchmarks/train_demo.py); marlin_mlx/demo_models/demo-base-4bit is the bundled 4-bit default.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "benchmarks" / "demo_models"
PROMPT = "Once upon a time, in a quiet village by the sea, there lived"
N_GREEDY = 32


def _checkpoint(name):
    path = DEMO / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module", params=["demo-small", "demo-base"])
def pair(request):
    """(marlin model, marlin tokenizer, transformers model) for one bf16 checkpoint, in float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from marlin_mlx.loader import load

    path = _checkpoint(request.param)
    model, tokenizer = load(path, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer, hf


def test_logits_match_transformers(pair):
    import mlx.core as mx
    import torch

    model, tokenizer, hf = pair
    ids = tokenizer.encode(PROMPT)
    # a second row checks batching; it is the first shifted, so no padding is needed
    batch = [ids, ids[1:] + ids[:1]]
    ours = np.array(model(mx.array(batch, dtype=mx.int32)).astype(mx.float32))
    with torch.no_grad():
        ref = hf(torch.tensor(batch)).logits.float().numpy()
    assert ours.shape == ref.shape
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_greedy_tokens_match_transformers(pair):
    import torch
    from marlin_mlx.generation import generate_step

    import mlx.core as mx

    model, tokenizer, hf = pair
    ids = tokenizer.encode(PROMPT)
    ours = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=N_GREEDY)]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY,
                          do_sample=False, repetition_penalty=1.0,  # plain greedy
                          pad_token_id=hf.config.eos_token_id)
    ref = out[0, len(ids):].tolist()
    assert ours == ref, f"\nours: {tokenizer.decode(ours)!r}\nref:  {tokenizer.decode(ref)!r}"
    # a trained model continues in words, not noise: most generated tokens are alphabetic text
    text = tokenizer.decode(ours)
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text)


def test_bundled_default_generates_offline(tmp_path):
    from marlin_mlx.bundled import default_model_path

    path = default_model_path()
    if path is None:
        pytest.skip("this build ships no bundled default")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))  # an empty cache: nothing may come from the hub
    code = (
        "import json\n"
        "from marlin_mlx.bundled import default_model_path\n"
        "from marlin_mlx.loader import load\n"
        "from marlin_mlx.generation import generate\n"
        "model, tok = load(default_model_path())\n"
        "q = json.load(open(default_model_path() / 'config.json'))['quantization']\n"
        "text = generate(model, tok, 'Once upon a time', max_tokens=24)\n"
        "print(q['bits'], q['group_size'], repr(text))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    bits, group, text = out.stdout.strip().split(" ", 2)
    assert (bits, group) == ("4", "64")
    text = eval(text)  # the repr printed above
    assert len(text.split()) >= 5, text
