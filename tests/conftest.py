"""Shared fixtures: tiny random Llama / Qwen3 checkpoints saved by transformers, with a real
tokenizer.

`make_checkpoint(arch, *, old_spelling=False, max_shard_size=None, seed=0, save_dtype="float32",
**config_overrides)`
builds (once per argument set, per session) a folder with config.json, generation_config.json,
safetensors weights and a byte-level BPE tokenizer trained here on a few KB of English text.
"""

import json
import os
from pathlib import Path

import pytest

# Parity tests compare float32 results against references; MLX otherwise runs float32 matmuls
# in TF32 on GPUs that have it (about 1e-3 relative error), which would hide real mismatches.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

TEXT = """\
The small boat left the harbour early in the morning, when the water was still and grey.
Two fishermen sat at the back and talked about the weather, the price of fuel and their children.
A tokenizer splits text into pieces; a model reads those pieces and predicts the next one.
Numbers such as 1, 2, 3, 10, 42 and 2026 appear in text, and so do dates like the 5th of May.
She opened the window, looked at the garden and said that the roses needed water again.
Good software is tested against a reference, measured on real inputs, and explained in short words.
When the train arrived at the station, everybody stood up at once and reached for their bags.
The recipe asks for flour, sugar, butter, three eggs, a pinch of salt and some warm milk.
He wrote the letter slowly, crossing out words, and in the end he decided not to send it at all.
Questions? Answers! Quotes: "hello", 'world'. Brackets (like these) and [those] and {these}.
Every evening the old dog walked to the end of the road and waited for the bus from the city.
The library was quiet except for the sound of pages turning and a clock ticking on the wall.
Mountains, rivers, forests and deserts cover the land; oceans cover most of the planet.
If the cache is warm the second request is fast, otherwise the server reads the weights again.
Children played football in the park until it was too dark to see the ball in the long grass.
The meeting started late because nobody could find the key to the room on the third floor.
Learning a language takes time: you listen, you repeat, you make mistakes and you try again.
A cup of tea, a good book and a rainy afternoon are enough for a very pleasant day at home.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
TOKENIZER_VOCAB = 400
MODEL_VOCAB = 512  # >= the tokenizer's, as real checkpoints pad their embedding tables

BASE_CONFIGS = {
    "llama": dict(
        vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
    ),
    "qwen3": dict(
        vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.1,
    ),
}


def _train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _hf_classes(arch: str):
    import transformers as tf

    return {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[arch]


def _to_old_spelling(config_file: Path) -> None:
    """Rewrite a transformers-5 config.json to the hub's older top-level spelling."""
    cfg = json.loads(config_file.read_text())
    params = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", "default")
    if rope_type != "default":
        # hub Llama 3.1 configs say rope_type; older linear-scaled ones said type
        key = "type" if rope_type == "linear" else "rope_type"
        cfg["rope_scaling"] = {key: rope_type, **params}
    else:
        cfg["rope_scaling"] = None
    config_file.write_text(json.dumps(cfg, indent=2))


def build_checkpoint(out_dir: Path, arch: str, *, old_spelling: bool = False,
                     max_shard_size=None, seed: int = 0, save_dtype: str = "float32",
                     **overrides) -> Path:
    import torch

    config_class, model_class = _hf_classes(arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out_dir)
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids(EOS_TOKEN)
    fields = {**BASE_CONFIGS[arch], "eos_token_id": eos_id, "bos_token_id": None,
              "pad_token_id": 0, **overrides}
    config = config_class(**fields)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    with torch.no_grad():
        # HF initializes norms to one and biases to zero: randomize them so that a missing
        # norm or bias in our model shows up as a logit mismatch
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    if save_dtype != "float32":
        model = model.to(getattr(torch, save_dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if old_spelling:
        _to_old_spelling(out_dir / "config.json")
    return out_dir


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: `make_checkpoint(arch, **kw) -> Path`, cached per argument set for the session."""
    cache = {}

    def make(arch: str, **kw) -> Path:
        key = (arch, json.dumps(kw, sort_keys=True, default=str))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{arch}")
            cache[key] = build_checkpoint(out, arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_path(make_checkpoint) -> Path:
    return make_checkpoint("llama")


@pytest.fixture(scope="session")
def tiny_qwen3_path(make_checkpoint) -> Path:
    return make_checkpoint("qwen3")


@pytest.fixture
def poison():
    """Kernel outputs filled with NaN before every launch (an unwritten element shows)."""
    from marlin_mlx.kernels import launch

    launch.POISON_OUTPUTS = True
    yield
    launch.POISON_OUTPUTS = False

