"""`marlin-mlx serve`: a real server on 127.0.0.1 over the real Engine and the bundled demo model,
driven by the official `openai` client (and raw HTTP for what the client would refuse to send).

Two servers: `marlin-mlx serve` as a subprocess (the CLI end to end, with an API key), and one
in this process (uvicorn in a thread over `create_app`) with a KV pool far smaller than the
load, for the pressure test. Greedy references come from `marlin_mlx.generation` on the same
model, so every served token is checked, not just the shapes.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from marlin_mlx.bundled import default_model_path  # noqa: E402

KEY = "test-key-123"
NAME = "demo"
MAX_MODEL_LEN = 512
PROMPTS = [
    "Once upon a time", "It is a truth universally acknowledged", "Call me Ishmael.",
    "The weather was", "She said that", "In the morning", "Mr. Darcy", "The ship sailed",
    "Elizabeth", "My dear", "He looked at her and", "There was no possibility of",
    "The whale", "Captain Ahab", "Emma Woodhouse, handsome, clever, and rich,", "Dear sir,",
]

pytestmark = pytest.mark.skipif(default_model_path() is None, reason="no bundled demo model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path, key=KEY):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _post(port, path, body, key=KEY):
    """POST raw bytes (or a JSON-encoded object); returns (status, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics(port) -> dict:
    from marlin_mlx.serving.server import metrics_snapshot

    status, text = _get(port, "/metrics")
    assert status == 200
    return metrics_snapshot(text)


def _wait_healthy(port, proc=None, deadline=180.0, log=None):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read()[-2000:]}")
        try:
            if _get(port, "/health", key=None)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def _wait_for(pred, deadline=60.0):
    """Poll until pred() holds; a liveness bound, not a timing assertion."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture(scope="module")
def server(request):
    """`marlin-mlx serve` in a subprocess, with an API key; yields its port."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("MARLIN_MLX_API_KEY", None)
    cmd = [sys.executable, "-m", "marlin_mlx.cli", "serve", "--port", str(port),
           "--api-key", KEY, "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN),
           "--max-batch-size", "16", "--max-waiting-time", "0.01", "--log-level", "warning"]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        request.getfixturevalue("demo")  # load the in-process model while the server starts
        _wait_healthy(port, proc, log=log)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def demo():
    from marlin_mlx.loader import load

    return load(default_model_path())


@pytest.fixture(scope="module")
def reference(demo):
    """Greedy text of `ids` through marlin_mlx.generation (no penalty: the API has none)."""
    from marlin_mlx.generation import stream_generate

    model, tokenizer = demo
    memo = {}

    def run(ids, max_tokens):
        key = (tuple(ids), max_tokens)
        if key not in memo:
            text, finish = "", None
            for r in stream_generate(model, tokenizer, list(ids), max_tokens, temperature=0.0):
                text += r.text
                finish = r.finish_reason
            memo[key] = (text, finish)
        return memo[key]

    return run


def _client(port, key=KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                         timeout=120)


def _ids(demo, text):
    from marlin_mlx.generation import encode_prompt

    return encode_prompt(demo[1], text)


# ------------------------------------------------------------------------------ the API

def test_models_health_metrics(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    assert _get(server, "/health", key=None) == (200, '{"status":"ok"}')
    m = _metrics(server)
    for name in ("marlin_mlx_requests_waiting", "marlin_mlx_requests_running",
                 "marlin_mlx_kv_blocks_used", "marlin_mlx_kv_blocks_total",
                 "marlin_mlx_tokens_per_second", "marlin_mlx_decode_steps_total",
                 'marlin_mlx_engine_seconds_total{phase="wait"}'):
        assert name in m, name
    assert m["marlin_mlx_kv_blocks_total"] > 0


def test_completion_matches_generate(server, demo, reference):
    ids = _ids(demo, PROMPTS[0])
    r = _client(server).completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12,
                                           temperature=0)
    text, finish = reference(ids, 12)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    u = r.usage
    assert u.prompt_tokens == len(ids)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if finish == "length":
        assert u.completion_tokens == 12
    # token ids as the prompt give the same
    r2 = _client(server).completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert r2.choices[0].text == text and r2.usage.prompt_tokens == len(ids)


def test_completion_stream_with_usage(server, demo, reference):
    ids = _ids(demo, PROMPTS[1])
    text, finish = reference(ids, 10)
    chunks = list(_client(server).completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == text
    assert with_choices[-1].choices[0].finish_reason == finish
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == (10 if finish == "length" else
                                                  chunks[-1].usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_multi_turn_stream_and_not(server, demo, reference):
    from marlin_mlx.generation import chat_prompt

    tokenizer = demo[1]
    messages = [{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": "Tell me about the sea."},
                {"role": "assistant", "content": "The sea was grey and cold."},
                {"role": "user", "content": "And then?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer.encode(rendered, add_special_tokens=False))
    text, finish = reference(ids, 10)
    client = _client(server)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    # one user turn is what generation.chat_prompt renders
    one = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0,
                                         messages=[{"role": "user", "content": PROMPTS[2]}])
    assert one.choices[0].message.content == reference(chat_prompt(tokenizer, PROMPTS[2]), 6)[0]


def test_stop_string_and_seed(server, demo, reference):
    client = _client(server)
    ids = _ids(demo, PROMPTS[3])
    text, _ = reference(ids, 16)
    words = text.split()
    assert len(words) > 3, text
    stop = " " + words[2]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0,
                                  stop=[stop, "never-there"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    # sampling with a seed is reproducible
    runs = [client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=12,
                                      temperature=1.0, top_p=0.9, seed=1234).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_concurrent_greedy_equals_alone(server, demo, reference):
    """16 requests at once give exactly the tokens each gives alone (and the reference)."""
    client = _client(server)

    def one(p):
        r = client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    alone = [one(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(one, PROMPTS))
    assert together == alone
    # and alone is what generation gives (a few; the pressure test checks others)
    assert alone[:4] == [reference(_ids(demo, p), 6) for p in PROMPTS[:4]]


# ------------------------------------------------------------------------------ bad input

BAD = {
    "malformed JSON": ("/v1/completions", b'{"model": "demo", "prompt": ', 400),
    "not an object": ("/v1/completions", b"[1, 2]", 400),
    "max_tokens string": ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400),
    "max_tokens zero": ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    "max_tokens negative": ("/v1/completions", {"prompt": "a", "max_tokens": -5}, 400),
    "max_tokens huge": ("/v1/completions", {"prompt": "a", "max_tokens": 10**9}, 400),
    "max_tokens bool": ("/v1/completions", {"prompt": "a", "max_tokens": True}, 400),
    "temperature string": ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400),
    "top_p out of range": ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400),
    "prompt number": ("/v1/completions", {"prompt": 5}, 400),
    "prompt missing": ("/v1/completions", {"max_tokens": 3}, 400),
    "prompt empty": ("/v1/completions", {"prompt": ""}, 400),
    "prompt ids out of vocab": ("/v1/completions", {"prompt": [1, 2, 10**7]}, 400),
    "prompt too long": ("/v1/completions", {"prompt": [5] * (MAX_MODEL_LEN + 8),
                                            "max_tokens": 4}, 400),
    "stop wrong type": ("/v1/completions", {"prompt": "a", "stop": 3}, 400),
    "n=2": ("/v1/completions", {"prompt": "a", "n": 2}, 400),
    "echo": ("/v1/completions", {"prompt": "a", "echo": True}, 400),
    "logprobs": ("/v1/completions", {"prompt": "a", "logprobs": 2}, 400),
    "seed string": ("/v1/completions", {"prompt": "a", "seed": "x"}, 400),
    "stream not bool": ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400),
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404),
    "model missing": ("/v1/completions", {"model": None, "prompt": "a"}, 400),
    "messages string": ("/v1/chat/completions", {"messages": "hi"}, 400),
    "messages empty": ("/v1/chat/completions", {"messages": []}, 400),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    "chat n=3": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                          "n": 3}, 400),
    "chat too long": ("/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}]}, 400),
    "chat max_tokens huge": ("/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 10**6}, 400),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_openai_error(server, case):
    path, body, status = BAD[case]
    if isinstance(body, dict):
        body = {"model": NAME, **body}
        if body["model"] is None:
            del body["model"]
    got, err = _post(server, path, body)
    assert got == status, (got, err)
    assert set(err) == {"error"}
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert isinstance(err["error"]["message"], str) and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"


def test_api_key_and_unknown_route(server):
    body = {"model": NAME, "prompt": "a", "max_tokens": 2}
    for key in (None, "wrong-key"):
        status, err = _post(server, "/v1/completions", body, key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert _get(server, "/v1/models", key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong-key").models.list()
    status, text = _get(server, "/v1/nothing")
    assert status == 404 and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError, match="n=1"):
        _client(server).completions.create(model=NAME, prompt="a", n=2)
    with pytest.raises(openai.NotFoundError):
        _client(server).completions.create(model="nope", prompt="a")


def test_server_still_serves_after_errors(server, demo, reference):
    r = _client(server).completions.create(model=NAME, prompt=PROMPTS[5], max_tokens=5,
                                           temperature=0)
    assert r.choices[0].text == reference(_ids(demo, PROMPTS[5]), 5)[0]


def test_disconnect_mid_stream_frees_blocks(server):
    """A client that goes away mid-stream: its request is aborted and its blocks freed."""
    before = _metrics(server)
    max_tokens = 400
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("POST", "/v1/completions",
                 json.dumps({"model": NAME, "prompt": PROMPTS[6], "max_tokens": max_tokens,
                             "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = b""
    while seen.count(b"data: ") < 3:  # a few tokens have arrived: the request holds KV blocks
        chunk = resp.read1(4096)
        assert chunk, seen
        seen += chunk
    during = _metrics(server)
    assert during["marlin_mlx_kv_blocks_used"] > before["marlin_mlx_kv_blocks_used"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    def freed():
        m = _metrics(server)
        return (m["marlin_mlx_requests_running"] == 0
                and m["marlin_mlx_kv_blocks_used"] <= before["marlin_mlx_kv_blocks_used"])

    assert _wait_for(freed)
    after = _metrics(server)
    assert after["marlin_mlx_client_aborts_total"] == before["marlin_mlx_client_aborts_total"] + 1
    # aborted long before max_tokens: the engine stopped generating for it
    generated = (after["marlin_mlx_generation_tokens_total"]
                 - before["marlin_mlx_generation_tokens_total"])
    assert generated < max_tokens
    # and the server goes on serving
    r = _client(server).completions.create(model=NAME, prompt="a", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------ pressure

@pytest.fixture(scope="module")
def small_server(demo):
    """In-process uvicorn over an Engine whose KV pool (4 blocks of 8 tokens) holds far fewer
    tokens than the load."""
    from marlin_mlx.serving.engine import Engine
    from marlin_mlx.serving.server import create_app

    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch_size=8, num_kv_blocks=4, block_size=8,
                    max_model_len=64)
    app = create_app(engine, NAME)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    engine.start()
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        _wait_healthy(port)
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        engine.stop()


def test_pressure_more_requests_than_blocks(small_server, demo, reference):
    """8 requests of up to 13 + 6 tokens (2-3 blocks each) at once on a pool of 4 blocks:
    all complete, with the tokens each gives alone."""
    client = _client(small_server, key="unused")

    def one(p):
        r = client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    prompts = PROMPTS[:8]
    assert max(len(_ids(demo, p)) for p in prompts) <= 4 * 8 - 6
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    assert results == [reference(_ids(demo, p), 6) for p in prompts]
    assert _wait_for(lambda: _metrics(small_server)["marlin_mlx_requests_running"] == 0)
    m = _metrics(small_server)
    assert m["marlin_mlx_kv_blocks_total"] == 4
    assert m["marlin_mlx_kv_blocks_used"] == 0 and m["marlin_mlx_requests_waiting"] == 0
    assert m["marlin_mlx_requests_finished_total"] == len(prompts)
    # a request that can never fit the pool is refused in one line, not queued forever
    status, err = _post(small_server, "/v1/completions",
                        {"model": NAME, "prompt": [5] * 20, "max_tokens": 20}, key=None)
    assert status == 400 and "block" in err["error"]["message"], err
    # without max_tokens a chat request gets what fits the context and the pool (not a 400)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "length":
        assert r.usage.total_tokens == 4 * 8


# ------------------------------------------------------------------------------ protocol

def test_protocol_parsing_details(demo):
    """What the server tests do not reach: request forms OpenAI allows, and their checks."""
    from marlin_mlx.serving import protocol as P

    tok = demo[1]
    kw = dict(served_model=NAME, tokenizer=tok, max_model_len=64, vocab_size=8192)
    one = P.parse_completion({"model": NAME, "prompt": ["Call me"], "stop": "x"}, **kw)
    assert one.prompt_ids == _ids(demo, "Call me") and one.stop == ["x"]
    assert one.max_tokens == P.DEFAULT_COMPLETION_MAX_TOKENS and one.temperature == 1.0
    with pytest.raises(P.APIError, match="one prompt"):
        P.parse_completion({"model": NAME, "prompt": ["a", "b"]}, **kw)
    with pytest.raises(P.APIError, match="stream_options"):
        P.parse_completion({"model": NAME, "prompt": "a",
                            "stream_options": {"include_usage": True}}, **kw)
    # the developer role is the system role; content may be text parts
    parts = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]
    a = P.parse_chat({"model": NAME, "messages": [{"role": "developer", "content": parts},
                                                  {"role": "user", "content": "Hi"}]}, **kw)
    b = P.parse_chat({"model": NAME, "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}]}, **kw)
    assert a.prompt_ids == b.prompt_ids
    # no max_tokens: the rest of the context, or of the KV pool when that is smaller
    assert a.max_tokens == 64 - len(a.prompt_ids)
    c = P.parse_chat({"model": NAME, "messages": [{"role": "user", "content": "Hi"}]},
                     **kw, pool_tokens=32)
    assert c.max_tokens == 32 - len(c.prompt_ids)
    with pytest.raises(P.APIError, match="image|text parts"):
        P.parse_chat({"model": NAME, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            **kw)
    err = P.APIError(400, "m", param="p", code="c").body()
    assert err == {"error": {"message": "m", "type": "invalid_request_error", "param": "p",
                             "code": "c"}}


# ------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("args, message", [
    (["--scheduler", "lifo"], "--scheduler must be fifo or sjf"),
    (["--api-key", " "], "--api-key is empty"),
    (["/nonexistent/model-dir"], "/nonexistent/model-dir"),
])
def test_cli_bad_options_one_line(args, message):
    from typer.testing import CliRunner

    from marlin_mlx.cli.main import app

    r = CliRunner().invoke(app, ["serve", "--port", str(_free_port()), *args])
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.output


def test_cli_without_the_serve_extra(monkeypatch):
    from typer.testing import CliRunner

    from marlin_mlx.cli.main import app

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: import fails
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 1
    assert 'pip install "marlin-mlx[serve]"' in r.output
