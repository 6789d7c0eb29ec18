"""One rank of the tensor-parallel tests: run under `mlx.launch` (see tests/test_distributed.py).

    mlx.launch --backend ring -n 2 --python PYTHON tests/distributed_worker.py CASES.json

CASES.json lists `{"path": checkpoint, "out": file.npz}` (rank 0 writes the prefill logits,
every decode step's logits and the greedy tokens there; `"in_memory": true` loads the whole
model and then splits it with `distributed.shard_model`) or `{"path": ..., "tokenizer": folder,
"serve": file.json}` (rank 0 serves a few requests through the serving engine with
`distributed`'s broadcasting runner while the other ranks follow; rank 0 writes the tokens). or `{"path": ..., "error": file.txt}`
(loading must fail; rank 0 writes the message). Every rank runs every case, so the
collectives inside the forward pass line up.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

PROMPT_LEN, DECODE_STEPS = 40, 6


def prompt_ids(vocab: int) -> mx.array:
    return mx.array(np.random.RandomState(3).randint(0, vocab, PROMPT_LEN).astype(np.int32))


def greedy_run(model, vocab: int) -> dict:
    """Prefill the prompt (all positions' logits), then greedy decode through the cache."""
    cache = model.make_cache()
    logits = model(prompt_ids(vocab)[None], cache=cache)[0]
    mx.eval(logits)
    steps, tokens = [], []
    y = mx.argmax(logits[-1])
    for _ in range(DECODE_STEPS):
        tokens.append(y.item())
        step = model(y.reshape(1, 1), cache=cache)[0, -1]
        mx.eval(step)
        steps.append(step)
        y = mx.argmax(step)
    return {"prefill": np.array(logits), "steps": np.array(mx.stack(steps)),
            "tokens": np.array(tokens)}


def serve_requests(engine, vocab: int) -> list:
    """A few requests of different lengths through a started serving engine (greedy, and one
    seeded sample): their generated tokens, in submission order."""
    import threading

    from marlin_mlx.serving.engine import SamplingParams

    rng = np.random.RandomState(5)
    specs = [(12, 6, 0.0), (3, 9, 0.0), (20, 5, 0.8), (7, 8, 0.0)]
    done, tokens, lock = threading.Event(), {}, threading.Lock()

    def on_event(event):
        with lock:
            tokens.setdefault(event.request_id, []).extend(event.token_ids)
            if event.finish_reason is not None:
                tokens[event.request_id + ":end"] = event.finish_reason
                if sum(k.endswith(":end") for k in tokens) == len(specs):
                    done.set()

    ids = [engine.submit(rng.randint(0, vocab, n).tolist(),
                         SamplingParams(max_tokens=m, temperature=t, seed=1), on_event)
           for n, m, t in specs]
    assert done.wait(120), "the engine did not finish the requests"
    return [tokens.get(rid, []) for rid in ids]


def make_engine(model, tokenizer, runner_factory=None):
    from marlin_mlx.serving.engine import Engine

    return Engine(model, tokenizer, max_batch_size=4, num_kv_blocks=48, block_size=8,
                  max_waiting_time=0.02, max_model_len=64, runner_factory=runner_factory)


def serve_case(case: dict, group, distributed, load_model) -> None:
    from marlin_mlx.loader import load_tokenizer

    model, config = load_model(case["path"], group=group)
    if group.rank() > 0:
        distributed.follow(model, group)
        return
    engine = make_engine(model, load_tokenizer(Path(case["tokenizer"])),
                         distributed.runner_factory(group))
    engine.start()
    try:
        result = serve_requests(engine, config["vocab_size"])
    finally:
        engine.stop()
        engine.runner.close()
    Path(case["serve"]).write_text(json.dumps(result))


def main(cases_file: str) -> None:
    from marlin_mlx import distributed
    from marlin_mlx.errors import MarlinError
    from marlin_mlx.loader import load_model

    group = distributed.init()
    assert group.size() > 1, "start this script with mlx.launch"
    cases = json.loads(Path(cases_file).read_text())
    for case in cases:
        if "serve" in case:
            serve_case(case, group, distributed, load_model)
            continue
        if "error" in case:
            try:
                load_model(case["path"], group=group)
                message = "no error"
            except MarlinError as e:
                message = str(e)
            if group.rank() == 0:
                Path(case["error"]).write_text(message)
            continue
        if case.get("in_memory"):  # load whole, then split (distributed.shard_model)
            model, config = load_model(case["path"])
            distributed.shard_model(model, group)
        else:
            model, config = load_model(case["path"], group=group)
        result = greedy_run(model, config["vocab_size"])
        if group.rank() == 0:
            np.savez(case["out"], **result)
    print(f"rank {group.rank()} of {group.size()}: {len(cases)} cases done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
