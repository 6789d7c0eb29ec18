"""Train the demo models (demo-small, demo-base): Qwen3-architecture LMs on public-domain novels.

Steps (each reproducible; the GPU one runs on a machine with PyTorch + transformers only):

  # 1. here (CPU): corpus from Debian packages, byte-level BPE tokenizer, uint16 token arrays
  python benchmarks/train_demo.py prepare --data .demo
  # 2. on the GPU: train both models, held-out eval + early stopping, bf16 weights in <=14 MB shards
  python3 benchmarks/train_demo.py train --data .demo --out $OUT
  # 3. here: assemble HF checkpoints (config, safetensors, generation config, tokenizer)
  python benchmarks/train_demo.py export --shards <train-output> --out /work/demo_out
  # 4. here: the bundled default, demo-base in 4-bit affine (mlx-lm format)
  python benchmarks/train_demo.py bundle --model /work/demo_out/demo-base

The test split (every 5th chapter of each book, see demo_corpus.py) is never trained on; it gives
the held-out loss used for early stopping and the perplexities reported in benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

# benchmarks/ holds modules (e.g. kernels.py) that would shadow packages transformers probes for
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

VOCAB_SIZE = 8192
EOS = "<|endoftext|>"
SPECIAL = [EOS, "<|im_start|>", "<|im_end|>"]
# The demo models are base LMs (never chat-tuned), so their chat template is plain text: messages
# become paragraphs (one per line, as in the corpus); a one-message chat is exactly the raw
# prompt, which the model continues.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}{{ m['content'] }}"
    "{% endfor %}"
)
CONTEXT = 512
SHARD_BYTES = 14_000_000  # files back from the GPU machine are at most 16 MiB each

# Qwen3 shapes; parameter counts with tied embeddings: small ~6.2M, base ~23.1M
MODELS = {
    "demo-small": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       lr=2e-3, batch=32),
    "demo-base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                      lr=1e-3, batch=32),
}


# ---------------------------------------------------------------- prepare (CPU, here)
def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   chat_template=CHAT_TEMPLATE, model_max_length=CONTEXT * 4)
    save_tokenizer(fast, out)
    return fast


def encode_docs(tok, docs: list[str]) -> np.ndarray:
    eos = tok.convert_tokens_to_ids(EOS)
    ids = []
    for enc in tok(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)  # documents are separated (and ended) by EOS
    return np.asarray(ids, dtype=np.uint16)


def prepare(data: Path, debs: Path | None):
    sys.path.insert(0, str(_HERE))
    import demo_corpus

    meta = demo_corpus.build(data / "corpus", debs)
    load = lambda name: [json.loads(l) for l in (data / "corpus" / name).read_text().splitlines()]
    docs = {sp: load(f"{sp}.jsonl") for sp in ("train", "valid", "test")}
    tok = train_tokenizer(docs["train"], data / "tokenizer")  # never sees held-out text
    for sp, d in docs.items():
        ids = encode_docs(tok, d)
        np.save(data / f"{sp}.npy", ids)
        meta[f"{sp}_tokens"] = int(ids.size)
    meta.update(vocab_size=len(tok), eos_token_id=tok.convert_tokens_to_ids(EOS))
    (data / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta, indent=1))


# ---------------------------------------------------------------- train (GPU)
def qwen3_config(name: str, vocab_size: int, eos_id: int, tiny: bool = False):
    from transformers import Qwen3Config

    shape = {k: v for k, v in MODELS[name].items() if k not in ("lr", "batch")}
    if tiny:  # CPU smoke test of the loop
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return Qwen3Config(vocab_size=vocab_size, max_position_embeddings=CONTEXT * 4,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=eos_id,
                       eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True,
                       torch_dtype="bfloat16", **shape)


def eval_loss(model, test, device, batch=64) -> float:
    """Mean next-token loss over non-overlapping CONTEXT windows of the test tokens."""
    import torch

    n = (test.numel() - 1) // CONTEXT
    x = test[: n * CONTEXT].view(n, CONTEXT)
    y = test[1 : n * CONTEXT + 1].view(n, CONTEXT)
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        for i in range(0, n, batch):
            logits = model(input_ids=x[i : i + batch]).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y[i : i + batch].reshape(-1),
                reduction="sum").item()
    model.train()
    return total / (n * CONTEXT)


def add_dropout(model, p: float):
    """Residual dropout on every attention and MLP output (training only; the exported model has
    none). Attention-probability dropout comes from the config's attention_dropout."""
    import torch.nn.functional as F

    def hook(module, args, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, module.training),) + out[1:]
        return F.dropout(out, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def train_one(name, train, valid, test, meta, device, epochs, time_budget, eval_every, patience,
              seed, tiny=False, dropout=0.0):
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    hp = MODELS[name]
    cfg = qwen3_config(name, meta["vocab_size"], meta["eos_token_id"], tiny)
    cfg.attention_dropout = dropout
    model = Qwen3ForCausalLM(cfg).to(device)
    if dropout:
        add_dropout(model, dropout)
    model.config.use_cache = False
    params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = train.numel() // (hp["batch"] * CONTEXT)
    max_steps = max(1, int(epochs * steps_per_epoch))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.95), fused=device == "cuda")
    best_state = None
    warmup = min(100, max_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup))
                                              * 0.5 * (1 + math.cos(math.pi * min(s, max_steps)
                                                                    / max_steps)) * 0.95 + 0.05)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    curve, best, best_state, bad, t0 = [], float("inf"), None, 0, time.time()
    run_loss, run_n = 0.0, 0
    for step in range(1, max_steps + 1):
        # random windows: every epoch sees fresh offsets, which matters on a small corpus
        starts = torch.randint(0, train.numel() - CONTEXT - 1, (hp["batch"],), generator=gen)
        idx = starts[:, None] + torch.arange(CONTEXT + 1)[None]
        chunk = train[idx.to(device)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss += loss.item() if step % 10 == 0 or step == max_steps else 0.0
        run_n += 1 if step % 10 == 0 or step == max_steps else 0
        if step % eval_every == 0 or step == max_steps:
            held = eval_loss(model, valid, device)
            point = {"step": step, "tokens": step * hp["batch"] * CONTEXT,
                     "epoch": round(step / steps_per_epoch, 3), "train_loss": run_loss / max(1, run_n),
                     "valid_loss": held, "lr": sched.get_last_lr()[0],
                     "seconds": round(time.time() - t0, 1)}
            curve.append(point)
            print(name, json.dumps(point), flush=True)
            run_loss, run_n = 0.0, 0
            if held < best - 1e-3:
                best, bad = held, 0
                best_state = {k: v.detach().to("cpu", torch.bfloat16).clone()
                              for k, v in model.state_dict().items()}
            else:
                bad += 1
            if bad >= patience or time.time() - t0 > time_budget:
                break
    seconds = round(time.time() - t0, 1)
    model.load_state_dict(best_state)  # the exported (bf16-rounded) weights
    test_loss = eval_loss(model, test, device)
    cfg.attention_dropout = 0.0  # the exported model runs without dropout
    info = {"name": name, "params": params, "config": cfg.to_dict(), "epochs": epochs,
            "dropout": dropout,
            "best_valid_loss": best, "test_loss": test_loss, "test_ppl": math.exp(test_loss),
            "best_step": max(curve, key=lambda c: -c["valid_loss"])["step"], "steps_run": step, "max_steps": max_steps,
            "steps_per_epoch": steps_per_epoch, "batch": hp["batch"], "lr": hp["lr"],
            "context": CONTEXT, "train_seconds": seconds, "curve": curve,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    return best_state, info


def save_shards(state, prefix: Path):
    """bf16 state dict as safetensors files of at most SHARD_BYTES each (tied head dropped)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    for i, shard in enumerate(shards):
        save_file(shard, f"{prefix}-{i}.safetensors", metadata={"format": "pt"})
    return len(shards)


def train(args):
    """Each model trains once per run spec in --runs-*; the run with the lowest validation
    loss is kept (its weights come back as shards), every run's curve goes to train_log.json."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = json.loads((args.data / "meta.json").read_text())
    split = lambda sp, n=0: torch.from_numpy(
        np.load(args.data / f"{sp}.npy").astype(np.int64)[: n or None]).to(device)
    train_ids, valid_ids = split("train"), split("valid", args.max_eval_tokens)
    test_ids = split("test", args.max_eval_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    results, t_all = {"meta": meta}, time.time()
    for name in args.models:
        runs, best_state, best = [], None, None
        for spec in args.runs[name]:
            epochs, _, dropout = spec.partition(":")
            epochs, dropout = float(epochs), float(dropout or 0)
            left = args.total_budget * (args.models.index(name) + 1) / len(args.models) - (
                time.time() - t_all)  # each model gets its share of the machine's time
            if runs and left < 20:
                print(name, "skipping", epochs, "epochs: out of time", flush=True)
                continue
            state, info = train_one(name, train_ids, valid_ids, test_ids, meta, device, epochs,
                                    min(args.time_budget, max(left, 20)), args.eval_every,
                                    args.patience, args.seed, tiny=args.tiny, dropout=dropout)
            runs.append(info)
            if best is None or info["best_valid_loss"] < best["best_valid_loss"]:
                best, best_state = info, state
            print(name, "epochs", epochs, "dropout", dropout, "valid", info["best_valid_loss"], "test",
                  info["test_loss"], "ppl", info["test_ppl"], "params", info["params"],
                  "seconds", info["train_seconds"], flush=True)
        best = dict(best, shards=save_shards(best_state, args.out / name),
                    sweep=[{k: r[k] for k in ("epochs", "dropout", "best_valid_loss", "test_loss",
                                              "best_step", "steps_run", "train_seconds")}
                           for r in runs])
        results[name] = best
        results["total_seconds"] = round(time.time() - t_all, 1)
        (args.out / "train_log.json").write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------- export (here)
def export(args):
    import torch
    from safetensors.torch import load_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    log = json.loads((args.shards / "train_log.json").read_text())
    tok = PreTrainedTokenizerFast.from_pretrained(args.data / "tokenizer")
    for name, info in log.items():
        if not name.startswith("demo-"):
            continue
        state = {}
        for i in range(info["shards"]):
            state.update(load_file(args.shards / f"{name}-{i}.safetensors"))
        cfg = Qwen3Config.from_dict(info["config"])
        cfg.use_cache = True
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise SystemExit(f"{name}: state dict mismatch {missing} {unexpected}")
        model.tie_weights()
        # small LMs loop under plain greedy decoding; a repetition penalty keeps them fluent
        model.generation_config = GenerationConfig(
            bos_token_id=cfg.eos_token_id, eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.eos_token_id, do_sample=False, repetition_penalty=1.2,
            max_new_tokens=128)
        out = args.out / name
        model.save_pretrained(out)
        save_tokenizer(tok, out)
        print(name, "->", out)


def save_tokenizer(tok, out: Path):
    """HF tokenizer files; tokenizer_config.json also carries the chat template and a class name
    that transformers 4.x understands (5.x writes a 'TokenizersBackend' it alone knows)."""
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    for key in ("is_local", "local_files_only"):  # loading options that from_pretrained leaves
        cfg.pop(key, None)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def bundle(args):
    """demo-base quantized to 4-bit affine (group 64) in mlx-lm's format: the package's default."""
    import shutil

    from mlx_lm import convert

    if args.out.exists():
        shutil.rmtree(args.out)
    convert(str(args.model), str(args.out), quantize=True, q_group_size=args.group_size,
            q_bits=args.bits, q_mode="affine")
    # mlx-lm re-saves the tokenizer in its transformers' own dialect: ship the source files
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(args.model / name, args.out / name)
    (args.out / "README.md").unlink(missing_ok=True)  # mlx-lm's hub model card stub
    for f in args.out.iterdir():
        print(f.name, f.stat().st_size)


def plot(args):
    """Loss curves (train and validation, per model) of a train_log.json as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(args.log.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for (name, info), color in zip([kv for kv in log.items() if kv[0].startswith("demo-")],
                                   ("tab:blue", "tab:orange")):
        c = info["curve"]
        tokens = [p["tokens"] / 1e6 for p in c]
        label = f"{name} ({info['params'] / 1e6:.1f}M"
        ax.plot(tokens, [p["train_loss"] for p in c], "--", color=color, alpha=0.7,
                label=f"{label}) train")
        ax.plot(tokens, [p["valid_loss"] for p in c], "-", color=color,
                label=f"{label}) validation; test ppl {info['test_ppl']:.1f}")
        best = min(c, key=lambda p: p["valid_loss"])
        ax.plot([best["tokens"] / 1e6], [best["valid_loss"]], "o", color=color)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(3.0, 7.5)
    ax.grid(alpha=0.3)
    ax.set_title("demo models: Austen + Melville, 0.86M training tokens (dot: kept checkpoint)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out, args.out.stat().st_size, "bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", type=Path, default=Path(".demo"))
    p.add_argument("--debs", type=Path, default=None)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=Path(".demo"))
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--models", nargs="+", default=list(MODELS))
    t.add_argument("--runs-small", nargs="+", default=["16", "24:0.1"],
                   help="training runs to compare, each EPOCHS[:DROPOUT] (cosine length)")
    t.add_argument("--runs-base", nargs="+", default=["12", "24:0.1", "32:0.2"])
    t.add_argument("--time-budget", type=float, default=150, help="seconds per training run")
    t.add_argument("--total-budget", type=float, default=330, help="seconds for all runs")
    t.add_argument("--eval-every", type=int, default=40)
    t.add_argument("--patience", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-eval-tokens", type=int, default=0)
    t.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    e = sub.add_parser("export")
    e.add_argument("--data", type=Path, default=Path(".demo"))
    e.add_argument("--shards", type=Path, required=True)
    e.add_argument("--out", type=Path, default=Path("/work/demo_out"))
    b = sub.add_parser("bundle")
    b.add_argument("--model", type=Path, default=Path("/work/demo_out/demo-base"))
    b.add_argument("--out", type=Path, default=Path("marlin_mlx/demo_models/demo-base-4bit"))
    b.add_argument("--bits", type=int, default=4)
    b.add_argument("--group-size", type=int, default=64)
    pl = sub.add_parser("plot")
    pl.add_argument("--log", type=Path, required=True)
    pl.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_loss.png"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.data, a.debs)
    elif a.cmd == "train":
        a.runs = {"demo-small": a.runs_small, "demo-base": a.runs_base}
        train(a)
    elif a.cmd == "export":
        export(a)
    elif a.cmd == "plot":
        plot(a)
    else:
        bundle(a)


if __name__ == "__main__":
    main()
