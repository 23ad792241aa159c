"""The chat server: OpenAI shapes, parity with Engine, continuous batching, limits, errors, disconnects."""

import json
import socket
import threading
import time

import httpx
import jax.numpy as jnp
import pytest
import uvicorn
from fastapi.testclient import TestClient
from test_engine import SP, ByteTokenizer, _tool_chain, bigram_params, random_params

from nanochat_jax import engine
from nanochat_jax.config import GPTConfig
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax import scheduler as sched_mod
from serve.app import Limits, create_app
from nanochat_jax.scheduler import Engine, QueueFull, Request, Scheduler

F32 = jnp.float32


class ChatByteTokenizer(ByteTokenizer):
    """The byte tokenizer with the real chat template (Tokenizer's own methods)."""

    bos_token_id = SP["<|bos|>"]
    _special_ids = SP
    render_conversation = Tokenizer.render_conversation
    render_for_completion = Tokenizer.render_for_completion


TOK = ChatByteTokenizer()
CFG = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                window_pattern="L")
B = lambda s: TOK.encode(s)[0]  # noqa: E731
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def chain_engine(text, loop=False):
    """A scripted model whose greedy reply to any chat prompt is `text` (then <|assistant_end|>, or `text` again)."""
    ids = [SP["<|assistant_start|>"], *TOK.encode(text)]
    chain = dict(zip(ids[:-1], ids[1:]))
    chain[ids[-1]] = ids[1] if loop else SP["<|assistant_end|>"]
    return Engine(bigram_params(CFG, chain), CFG, TOK, dtype=F32)


@pytest.fixture(scope="module")
def rand_engine():
    return Engine(random_params(CFG, seed=3), CFG, TOK, dtype=F32)


@pytest.fixture(scope="module")
def rand_sched(rand_engine):
    s = Scheduler(rand_engine, slots=4)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(rand_sched):
    return TestClient(create_app(rand_sched, "tiny"))


def sse_events(lines):
    out = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert out[-1] == "[DONE]"
    return [json.loads(x) for x in out[:-1]]


def run_sync(sched, prompt, **kw):
    """Submit and wait: (texts per choice, finish reasons)."""
    done, events = threading.Event(), []
    req = Request(prompt, lambda ev: done.set() if ev is None else events.append(ev), **kw)
    sched.submit(req)
    assert done.wait(30)
    texts, reasons = [""] * req.n, [None] * req.n
    for ev in events:
        texts[ev.index] += ev.text
        reasons[ev.index] = ev.finish_reason or reasons[ev.index]
    return texts, reasons


# ---- HTTP shapes and parity ------------------------------------------------------------------

def test_non_streaming_shape_and_engine_parity(client, rand_engine):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 20,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    prompt = TOK.render_for_completion({"messages": MSGS})
    (want,) = rand_engine.complete(prompt, max_tokens=20, temperature=0.0)
    assert choice["message"] == {"role": "assistant", "content": TOK.decode(want.tokens)}
    assert choice["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(want.tokens),
                             "total_tokens": len(prompt) + len(want.tokens)}


def test_streaming_shape(client):
    req = {"messages": MSGS, "max_tokens": 12, "temperature": 0, "stream": True,
           "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    full = client.post("/v1/chat/completions", json={**req, "stream": False}).json()
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    assert events[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == full["choices"][0]["message"]["content"]


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json()["status"] == "ok"


def test_n_samples_and_seed(client):
    req = {"messages": MSGS, "max_tokens": 16, "temperature": 1.0, "n": 2, "seed": 5}
    a = client.post("/v1/chat/completions", json=req).json()
    b = client.post("/v1/chat/completions", json=req).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert a["choices"] == b["choices"]  # same seed, same samples


# ---- scheduler: continuous batching, stop strings, UTF-8 ------------------------------------------

def test_concurrent_requests_match_solo(rand_engine, rand_sched):
    """B is admitted while A is mid-decode; both equal their solo runs."""
    pa = TOK.render_for_completion({"messages": [{"role": "user", "content": "the cat"}]})
    pb = TOK.render_for_completion({"messages": [{"role": "user", "content": "a longer prompt"}]})
    kw_a, kw_b = dict(max_tokens=40, temperature=1.0, top_k=40, top_p=0.9, seed=11), dict(max_tokens=30,
                                                                                          temperature=0.0)
    solo_a, solo_b = run_sync(rand_sched, pa, **kw_a), run_sync(rand_sched, pb, **kw_b)
    started, done_a, events_a, peak = threading.Event(), threading.Event(), [], [0]

    def on_a(ev):
        peak[0] = max(peak[0], rand_sched.busy_slots())
        if ev is None:
            return done_a.set()
        events_a.append(ev)
        started.set()

    rand_sched.submit(Request(pa, on_a, **kw_a))
    assert started.wait(30)
    got_b = run_sync(rand_sched, pb, **kw_b)
    assert done_a.wait(30)
    got_a = ("".join(e.text for e in events_a), [e.finish_reason for e in events_a if e.finish_reason])
    assert got_b == solo_b and (got_a[0], got_a[1]) == (solo_a[0][0], solo_a[1])
    assert peak[0] == 2  # B ran beside A


def test_stop_strings_http():
    with TestClient(create_app(Scheduler(chain_engine("abc def"), slots=2), "chain")) as c:
        base = {"messages": MSGS, "max_tokens": 30, "temperature": 0}
        full = c.post("/v1/chat/completions", json=base).json()["choices"][0]
        assert (full["message"]["content"], full["finish_reason"]) == ("abc def", "stop")
        cut = c.post("/v1/chat/completions", json={**base, "stop": ["zz", "de"]}).json()["choices"][0]
        assert (cut["message"]["content"], cut["finish_reason"]) == ("abc ", "stop")
        with c.stream("POST", "/v1/chat/completions", json={**base, "stop": "c d", "stream": True}) as r:
            events = sse_events(list(r.iter_lines()))
        pieces = [e["choices"][0]["delta"].get("content", "") for e in events]
        assert "".join(pieces) == "ab" and events[-1]["choices"][0]["finish_reason"] == "stop"
        short = c.post("/v1/chat/completions", json={**base, "max_tokens": 3}).json()["choices"][0]
        assert (short["message"]["content"], short["finish_reason"]) == ("abc", "length")


def test_streaming_never_splits_utf8():
    sched = Scheduler(chain_engine("£x"), slots=1)
    texts = []
    done = threading.Event()
    sched.submit(Request(TOK.render_for_completion({"messages": MSGS}),
                         lambda ev: done.set() if ev is None else texts.append(ev.text), max_tokens=10,
                         temperature=0.0))
    assert done.wait(30)
    sched.close()
    assert "".join(texts) == "£x" and all("\ufffd" not in t for t in texts)


def test_calculator_forcing_matches_engine():
    """The scheduler forces the tool's output like Engine: `2+3` then the forced `5`."""
    eng = Engine(bigram_params(CFG, _tool_chain("2+3")), CFG, TOK, dtype=F32)
    (want,) = eng.complete([SP["<|bos|>"]], max_tokens=20, temperature=0.0)
    sched = Scheduler(eng, slots=2)
    got = run_sync(sched, [SP["<|bos|>"]], max_tokens=20, temperature=0.0)
    sched.close()
    assert got == ([TOK.decode(want.tokens)], ["stop"]) and got[0][0] == "2+35"


def test_multi_step_scheduler_matches_single_step(rand_engine):
    """steps_per_call=3: the same texts (sampled, n=2, stop strings cut mid-call) and calculator forcing."""
    prompt = TOK.render_for_completion({"messages": MSGS})
    single, multi = Scheduler(rand_engine, slots=2), Scheduler(rand_engine, slots=2, steps_per_call=3)
    try:
        for kw in (dict(max_tokens=17, temperature=1.0, top_k=30, seed=4, n=2), dict(max_tokens=10, temperature=0.0)):
            assert run_sync(multi, prompt, **kw) == run_sync(single, prompt, **kw)
        text = run_sync(single, prompt, max_tokens=20, temperature=0.0)[0][0]
        stop = text[5:7]  # a stop string somewhere inside a 3-step call
        assert run_sync(multi, prompt, max_tokens=20, temperature=0.0, stop=(stop,)) == \
            run_sync(single, prompt, max_tokens=20, temperature=0.0, stop=(stop,))
    finally:
        single.close(), multi.close()
    tool = Scheduler(Engine(bigram_params(CFG, _tool_chain("2+3")), CFG, TOK, dtype=F32), slots=2,
                     steps_per_call=4)
    assert run_sync(tool, [SP["<|bos|>"]], max_tokens=20, temperature=0.0) == (["2+35"], ["stop"])
    tool.close()


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_warmup_leaves_nothing_to_compile(rand_engine):
    """After warmup, requests of every prompt bucket, n, sampler, seed, stop string and a
    cancel compile nothing (no XLA backend compile at all; jit caches unchanged)."""
    import jax

    sched = Scheduler(rand_engine, slots=3, steps_per_call=2)  # shapes no other test uses
    compiled = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw.get("fun_name"))

    try:
        assert sched.warmup() > 0 and sched.busy_slots() == 0
        jitted = (engine.prefill, engine.insert, engine.generate_steps)
        sizes = [f._cache_size() for f in jitted]
        jax.monitoring.register_event_duration_secs_listener(listen)
        requests = [(5, dict(temperature=0.0)), (20, dict(temperature=0.8, n=2, top_k=40, seed=3)),
                    (40, dict(temperature=1.0, top_p=0.5, stop=("a",))), (100, dict(temperature=1.2, seed=None))]
        for n, kw in requests:
            run_sync(sched, [SP["<|bos|>"]] + [B("a")] * (n - 1), max_tokens=6, **kw)
        started = threading.Event()
        req = Request([SP["<|bos|>"]] * 3, lambda ev: started.set(), max_tokens=50)
        sched.submit(req)
        assert started.wait(30)
        sched.cancel(req)
        run_sync(sched, [SP["<|bos|>"]], max_tokens=3)  # runs after the cancelled one is freed
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        sched.close()
    assert compiled == [] and [f._cache_size() for f in jitted] == sizes


def test_32_concurrent_streams_on_a_live_server(server, rand_engine):
    """32 clients stream at once into 8 slots (24 wait in the queue): every stream finishes
    with the right token count and the text of a solo run; then the scheduler is idle."""
    from concurrent.futures import ThreadPoolExecutor

    sched = Scheduler(rand_engine, slots=8, max_queue=32, steps_per_call=2)
    url = server(create_app(sched, "tiny"))
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    base = {"max_tokens": 10, "temperature": 0}
    solo = [httpx.post(f"{url}/v1/chat/completions", json={**base, "messages": p}, timeout=60).json()
            for p in prompts]

    def stream(i):
        body = {**base, "messages": prompts[i % 4], "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            events = sse_events(list(r.iter_lines()))
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1:]
        return text, reasons, events[-1]["usage"]

    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(stream, range(32)))
        for i, (text, reasons, usage) in enumerate(results):
            want = solo[i % 4]
            assert text == want["choices"][0]["message"]["content"]
            assert reasons == [want["choices"][0]["finish_reason"]] and usage == want["usage"]
            assert usage["completion_tokens"] == 10 or reasons == ["stop"]
        t0 = time.time()
        while (sched.busy_slots() or sched.queued()) and time.time() - t0 < 2:
            time.sleep(0.02)
        assert sched.busy_slots() == 0 and sched.queued() == 0 and (sched._finish == engine.FREE).all()
        assert httpx.get(f"{url}/health").json() | {"slots": 8} == {
            "status": "ok", "slots": 8, "busy_slots": 0, "queued": 0, "api_key_required": False, "safety": False}
    finally:
        sched.close()


# ---- validation, auth, back-pressure ----------------------------------------------------------------

@pytest.mark.parametrize("patch,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x" * 7000}] * 5}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 200}]}, "messages"),  # longer than the context
    ({"max_tokens": 129}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 201}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"n": 5}, "n"),  # more than the 4 slots
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_validation_errors(client, patch, param):
    r = client.post("/v1/chat/completions", json={"messages": MSGS, **patch})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]


@pytest.mark.parametrize("content,ctype,code", [
    (b'{"messages": [', "application/json", "invalid_json"),  # not parseable
    (b"\xff\xfe{}", "application/json", "invalid_json"),
    (b"[1, 2]", "application/json", "invalid_body"),  # JSON, but not an object
    (b'"hello"', "application/json", "invalid_body"),
    (b"", "application/json", "invalid_body"),
    (json.dumps({"messages": MSGS}).encode(), "text/plain", "invalid_body"),  # right body, wrong content-type
    (b"messages=hi", "application/x-www-form-urlencoded", "invalid_body"),
])
def test_malformed_bodies_are_4xx(client, content, ctype, code):
    r = client.post("/v1/chat/completions", content=content, headers={"content-type": ctype})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == code and err["message"]


def test_unknown_route_and_method_are_openai_shaped(client):
    for r in (client.get("/v1/nope"), client.get("/v1/chat/completions")):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/").headers["content-type"].startswith("text/html")  # the chat page


def test_api_key(rand_sched):
    c = TestClient(create_app(rand_sched, "tiny", api_key="sekret"))
    body = {"messages": MSGS, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = c.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models").status_code == 401 and c.get("/health").status_code == 200
    assert c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_queue_full_is_429(rand_engine):
    sched = Scheduler(rand_engine, slots=1, max_queue=0)
    with pytest.raises(QueueFull):
        sched.submit(Request([SP["<|bos|>"]], print, max_tokens=1))
    r = TestClient(create_app(sched, "tiny", limits=Limits(retry_after_s=3))).post(
        "/v1/chat/completions", json={"messages": MSGS})
    sched.close()
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full"


# ---- a real server: disconnects and the official client ----------------------------------------------

@pytest.fixture
def server():
    """Start uvicorn on a free 127.0.0.1 port in a thread; yields a function app -> base URL."""
    servers = []

    def start(app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        servers.append((srv, thread))
        deadline = time.time() + 10
        while not srv.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(10)


def test_disconnect_frees_slot(server, monkeypatch):
    real_step = engine.generate_step

    def slow_step(*a, **kw):  # long enough that only the disconnect can end the request early
        time.sleep(0.03)
        return real_step(*a, **kw)

    monkeypatch.setattr(sched_mod.E, "generate_step", slow_step)
    sched = Scheduler(chain_engine("ab", loop=True), slots=2)
    run_sync(sched, [SP["<|assistant_start|>"]], max_tokens=3)  # compile first: a compile would stall the stream
    url = server(create_app(sched, "loop"))
    req = {"messages": MSGS, "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=10) as r:
        for line in r.iter_lines():
            if '"content": "a' in line or '"content": "b' in line:
                break
        assert sched.busy_slots() == 1
    t0 = time.time()
    while sched.busy_slots() and time.time() - t0 < 1:
        time.sleep(0.02)
    assert sched.busy_slots() == 0  # the rest of the run would take about 3 s
    assert httpx.get(f"{url}/health").json()["busy_slots"] == 0
    sched.close()


def test_concurrent_http_and_openai_client(server, rand_sched):
    openai = pytest.importorskip("openai")
    url = server(create_app(rand_sched, "tiny", api_key="k"))
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    kw = dict(model="tiny", messages=MSGS, max_tokens=24, temperature=0)
    full = c.chat.completions.create(**kw)
    streamed = "".join(ev.choices[0].delta.content or "" for ev in c.chat.completions.create(**kw, stream=True)
                       if ev.choices)
    assert full.object == "chat.completion" and streamed == full.choices[0].message.content
    assert [m.id for m in c.models.list()] == ["tiny"]

    prompts = [[{"role": "user", "content": f"prompt number {i}"}] for i in range(3)]
    solo = [c.chat.completions.create(**{**kw, "messages": p}).choices[0].message.content for p in prompts]
    out = [None] * 3

    def go(i):
        out[i] = c.chat.completions.create(**{**kw, "messages": prompts[i]}).choices[0].message.content

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == solo
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).chat.completions.create(**kw)


def test_load_orbax_params(tmp_path):
    """The server reads only the params of a training checkpoint (no optimizer to rebuild)."""
    import jax
    import numpy as np

    from nanochat_jax import checkpoint, optim, sharding, train_step

    tx = optim.make_optimizer(CFG, num_iterations=10)
    state = train_step.init_train_state(CFG, tx, sharding.make_mesh("data=8"), jax.random.key(0))
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, state, meta={"step": 3, "model_config": CFG.to_dict()})
    params, config, meta = checkpoint.load_params(tmp_path)
    assert config == CFG and meta["step"] == 3
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- robustness: nothing a request carries can stop the loop ----------------------------------------

def _wild():
    from hypothesis import strategies as st

    edge_ints = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63 - 1,
                                 10**30, -10**30])
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), edge_ints,
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
    return st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=4), scalar, max_size=2))


def _request_strategy():
    """Request bodies whose every field may hold an extreme or wrongly typed value."""
    from hypothesis import strategies as st

    wild = _wild()
    part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                     st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text", "input_audio"])},
                                           optional={"text": wild, "image_url": wild}))
    message = st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), wild),
         "content": st.one_of(st.text(max_size=40), st.lists(part, max_size=3), wild)},
        optional={"name": wild, "tool_calls": wild})
    messages = st.one_of(st.just(MSGS), st.just(MSGS[1:]), st.lists(message, max_size=3), wild)
    bias = st.dictionaries(st.one_of(st.sampled_from(["0", "264", "265", "-1", "99999999999999999999", "²", " 7"]),
                                     st.text(max_size=4)),
                           st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6)),
                           max_size=3)
    fields = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
              "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
              "response_format", "user", "tools", "unknown_field"]
    return st.fixed_dictionaries({"messages": messages},
                                 optional={**{f: wild for f in fields}, "logit_bias": st.one_of(bias, wild),
                                           "max_tokens": st.one_of(st.integers(1, 12), wild),
                                           "stream": st.booleans()})


def test_no_request_field_value_makes_a_5xx_or_stops_the_server(server, rand_engine):
    """A hypothesis strategy over the request schema (every field extreme or wrongly typed, JSON
    with NaN/Infinity, 64-bit+ integers) against a live server: never a 5xx, always an
    OpenAI-shaped error, and afterwards the loop is alive and answers."""
    from hypothesis import HealthCheck, given, settings

    sched = Scheduler(rand_engine, slots=4, steps_per_call=1)
    url = server(create_app(sched, "tiny"))
    statuses = []

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_request_strategy())
    def check(body):
        data = json.dumps(body, allow_nan=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", content=data, timeout=60,
                          headers={"content-type": "application/json"}) as r:
            raw = r.read().decode()
        statuses.append(r.status_code)
        assert r.status_code in (200, 400), (r.status_code, raw, data)
        if r.status_code == 400:
            err = json.loads(raw)["error"]
            assert err["message"] and err["type"] == "invalid_request_error"
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert raw.rstrip().endswith("data: [DONE]") and '"error"' not in raw
        else:
            assert json.loads(raw)["object"] == "chat.completion"

    try:
        check()
        assert sched.alive and httpx.get(f"{url}/health").json()["status"] == "ok"
        ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200
        assert 200 in statuses and 400 in statuses  # both kinds of bodies were generated
    finally:
        sched.close()


def test_scheduler_checks_ranges_and_fails_one_request_only(rand_engine):
    """Out-of-range values raise at submit; a request whose host-side handling fails (here its
    output filter) ends alone with an error while the loop serves the next one."""
    sched = Scheduler(rand_engine, slots=2)
    prompt = TOK.render_for_completion({"messages": MSGS})
    try:
        for bad in (dict(seed=2**64), dict(seed=-2**63 - 1), dict(temperature=float("nan")), dict(top_k=10**9),
                    dict(n=3), dict(max_tokens=0), dict(top_p=0.0), dict(logit_bias={10**6: 1.0}),
                    dict(logit_bias={5: float("inf")}), dict(presence_penalty=3.0), dict(top_logprobs=21),
                    dict(max_tokens=True)):
            with pytest.raises(ValueError):
                sched.submit(Request(prompt, print, **{"max_tokens": 4, **bad}))
        with pytest.raises(ValueError):
            sched.submit(Request([10**9], print, max_tokens=4))

        class Broken:
            def feed(self, text, final=False):
                raise RuntimeError("filter bug")

        done, req = threading.Event(), Request(prompt, lambda ev: ev is None and done.set(), max_tokens=8,
                                               output_guard=Broken)
        sched.submit(req)
        assert done.wait(30) and "filter bug" in req.error
        assert sched.alive and run_sync(sched, prompt, max_tokens=4, temperature=0.0)[1] == ["length"]
        assert sched.busy_slots() == 0
    finally:
        sched.close()


def test_64_bit_seeds_are_honoured(rand_sched):
    """Seeds that differ only above bit 32 sample differently; the same seed repeats."""
    prompt = TOK.render_for_completion({"messages": MSGS})
    kw = dict(max_tokens=24, temperature=1.0)
    lo, hi, top = (run_sync(rand_sched, prompt, seed=s, **kw) for s in (7, 7 + 2**40, 2**64 - 1))
    assert lo != hi and run_sync(rand_sched, prompt, seed=7 + 2**40, **kw) == hi
    assert run_sync(rand_sched, prompt, seed=-1, **kw) == top  # negative seeds wrap like two's complement
    assert run_sync(rand_sched, prompt, seed=7, **kw) == run_sync(rand_sched, prompt, seed=7, **kw)


SERVE_SCRIPT = """
import os, sys, time
sys.path.insert(0, "tests")
from test_serve import chain_engine
from nanochat_jax import scheduler as S
from serve import app as A
real, calls, fail_after = S.E.generate_step, [0], int(os.environ.get("FAIL_AFTER", "0"))
def step(*a, **k):
    time.sleep(0.02)
    calls[0] += 1
    if fail_after and calls[0] >= fail_after:
        raise RuntimeError("simulated device failure")
    return real(*a, **k)
S.E.generate_step = step
sched = S.Scheduler(chain_engine("ab", loop=True), slots=2)
sys.exit(A.serve(sched, A.create_app(sched, "loop"), "127.0.0.1", int(sys.argv[1]),
                 drain_s=float(os.environ.get("DRAIN", "5")), exit_delay_s=1.0))
"""


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent XLA cache for the server subprocesses: the second one skips the compiles."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _spawn(env):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(port)], cwd=root,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not start"
        time.sleep(0.2)


@pytest.mark.slow  # the 3.12 leg deselects it: a server process end to end, ~15 s
def test_dead_loop_gives_503_and_the_process_exits_nonzero(compile_cache):
    """Greedy, so the scripted reply cannot end by chance before the fifth decode call fails
    (sampled at temperature 1 it picks <|assistant_end|> about once in 270 tokens)."""
    proc, url = _spawn({"FAIL_AFTER": "5", **compile_cache})
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 50, "temperature": 0},
                       timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert "simulated device failure" in r.json()["error"]["message"]
        h = httpx.get(f"{url}/health", timeout=5)
        assert h.status_code == 503 and h.json()["error"]["type"] == "server_error"
        again = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSGS}, timeout=5)
        assert again.status_code == 503 and again.headers["content-type"] == "application/json"
        assert proc.wait(timeout=20) == 1
        assert "decode loop died" in proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_drains_then_exits(compile_cache):
    """SIGTERM: a stream that fits in the drain time finishes; a longer one is cut at the drain
    limit; the process exits 0 within a few seconds instead of hanging."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    proc, url = _spawn({"DRAIN": "1.5", **compile_cache})

    def stream(max_tokens, started):
        body = {"messages": MSGS, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if sum('"content": "a' in x or '"content": "b' in x for x in lines) >= 3:
                        started.set()  # decode steps run: compiling is over
        except httpx.HTTPError:
            pass
        return lines

    try:
        with ThreadPoolExecutor(2) as pool:
            events = [threading.Event(), threading.Event()]
            short, long = pool.submit(stream, 20, events[0]), pool.submit(stream, 100, events[1])
            assert events[0].wait(60) and events[1].wait(60)
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            took = time.time() - t0
            short, long = short.result(), long.result()
        assert took < 6, took
        assert short[-2:] == ["data: [DONE]", ""] or short[-1] == "data: [DONE]"
        assert "data: [DONE]" not in long  # ~2 s of tokens left when the 1.5 s drain ran out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_non_streaming_disconnect_frees_slot(server, monkeypatch):
    """A non-streaming client that gives up mid-answer frees its slot at once, not when the answer ends."""
    real_step = engine.generate_step

    def slow_step(*a, **kw):
        time.sleep(0.03)
        return real_step(*a, **kw)

    monkeypatch.setattr(sched_mod.E, "generate_step", slow_step)
    sched = Scheduler(chain_engine("ab", loop=True), slots=2)
    run_sync(sched, TOK.render_for_completion({"messages": MSGS}), max_tokens=3)  # compile this prompt's bucket
    url = server(create_app(sched, "loop"))
    timed_out = []

    def client():  # gives up (closes the connection) after 1 s of a ~3 s answer
        try:
            httpx.post(f"{url}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 100, "temperature": 0},
                       timeout=httpx.Timeout(10, read=1.0))
        except httpx.ReadTimeout:
            timed_out.append(True)

    try:
        thread = threading.Thread(target=client)
        thread.start()
        t0 = time.time()
        while not sched.busy_slots() and time.time() - t0 < 5:
            time.sleep(0.01)
        assert sched.busy_slots() == 1  # decoding
        thread.join(10)
        assert timed_out == [True]
        t0 = time.time()
        while sched.busy_slots() and time.time() - t0 < 1:
            time.sleep(0.01)
        assert sched.busy_slots() == 0 and time.time() - t0 < 0.3  # ~2 s of the answer were left
    finally:
        sched.close()


def test_first_request_after_warmup_is_not_slower(server, rand_engine):
    """After warm-up, the first HTTP request takes at most 2x the median of later ones."""
    import statistics

    from serve.app import warm_up

    # shapes no other test compiles (1 slot, 3 steps per call), so only the warm-up can have compiled
    # them and a missed compile shows in the first request's time
    sched = Scheduler(rand_engine, slots=1, steps_per_call=3)
    app = create_app(sched, "tiny")
    warm_up(sched, app)  # what `python -m serve.app` does before it serves
    url = server(app)
    body = {"messages": [{"role": "user", "content": "what is the time?"}], "max_tokens": 64, "temperature": 0.7,
            "top_k": 20, "logprobs": True, "top_logprobs": 2,  # 64 tokens: long enough that jitter is small
            "logit_bias": {str(SP["<|assistant_end|>"]): -100, str(SP["<|bos|>"]): -100}}
    try:
        times = []
        with httpx.Client(timeout=60) as client:
            assert client.get(f"{url}/health").status_code == 200  # the client's own first-use cost, not timed
            for _ in range(5):
                t0 = time.perf_counter()
                assert client.post(f"{url}/v1/chat/completions", json=body).status_code == 200
                times.append(time.perf_counter() - t0)
        assert times[0] <= 2 * statistics.median(times[1:]), times
    finally:
        sched.close()


# ---- OpenAI's contract -----------------------------------------------------------------------------

def test_openai_contract(server, rand_sched):
    """Text content parts, the developer role, 400s naming unsupported parameters,
    GET /v1/models/{id}, logprobs and logit_bias, all through the official client."""
    openai = pytest.importorskip("openai")
    url = server(create_app(rand_sched, "tiny"))
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    kw = dict(model="tiny", max_tokens=12, temperature=0)
    plain = c.chat.completions.create(messages=MSGS, **kw).choices[0].message.content
    parts = c.chat.completions.create(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}], **kw)
    assert parts.choices[0].message.content == plain  # developer = system; parts joined

    def bad(param, **extra):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**{"messages": MSGS, **kw, **extra})
        assert e.value.body["param"] == param and param.split(".")[0] in e.value.body["message"], e.value.body
        return e.value.body

    bad("tools", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    bad("tool_choice", tool_choice="none")
    bad("response_format", response_format={"type": "json_object"})
    bad("made_up", extra_body={"made_up": 1})
    bad("top_logprobs", top_logprobs=2)  # without logprobs
    bad("logit_bias", logit_bias={"99999": 5})
    bad("messages.0.content.0.type", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert c.chat.completions.create(messages=MSGS, response_format={"type": "text"}, **kw).choices
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")

    r = c.chat.completions.create(messages=MSGS, logprobs=True, top_logprobs=3, **kw)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens > 0
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
        assert e.logprob <= 0 and [t.logprob for t in e.top_logprobs] == sorted(
            [t.logprob for t in e.top_logprobs], reverse=True)
    streamed = [lp for ev in c.chat.completions.create(messages=MSGS, logprobs=True, top_logprobs=3, stream=True,
                                                          **kw)
                if ev.choices and ev.choices[0].logprobs for lp in ev.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]

    z = c.chat.completions.create(messages=MSGS, model="tiny", max_tokens=8, temperature=1.0, seed=2**63 + 5,
                                  logit_bias={str(B("z")): 100})
    assert z.choices[0].message.content == "z" * 8 and z.choices[0].finish_reason == "length"


def test_penalties_bias_and_logprobs_match_a_numpy_reference(rand_engine, rand_sched):
    """The device's logit_bias, presence/frequency penalties and logprobs against numpy over
    the full (uncached) forward: every greedy token, its logprob and the top 5."""
    import numpy as np
    from test_engine import full_forward

    prompt = TOK.render_for_completion({"messages": MSGS})
    bias = {B("e"): 2.0, B("t"): -3.0, B("a"): 1.5}
    kw = dict(max_tokens=20, temperature=0.0, logprobs=True, top_logprobs=5, logit_bias=bias,
              presence_penalty=0.8, frequency_penalty=1.1)

    def entries(**kw):
        done, out = threading.Event(), []
        rand_sched.submit(Request(prompt, lambda ev: done.set() if ev is None else out.extend(ev.logprobs or []),
                                  **kw))
        assert done.wait(30)
        return out

    got = entries(**kw)
    assert len(got) == 20
    tokens = [t for t, _, _ in got]
    logits = np.asarray(full_forward(rand_engine.params, jnp.asarray([prompt + tokens]), config=CFG,
                                     dtype=jnp.float32))[0].astype(np.float64)
    bias_V = np.zeros(CFG.vocab_size)
    for k, v in bias.items():
        bias_V[k] = v
    counts = np.zeros(CFG.vocab_size)
    for t, (tok, lp, top) in enumerate(got):
        row = logits[len(prompt) - 1 + t] + bias_V - 0.8 * (counts > 0) - 1.1 * counts
        lsm = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        assert tok == int(np.argmax(row))
        assert lp == pytest.approx(lsm[tok], abs=2e-4)
        assert [i for i, _ in top] == list(np.argsort(-lsm, kind="stable")[:5])
        np.testing.assert_allclose([v for _, v in top], np.sort(lsm)[::-1][:5], atol=2e-4)
        counts[tok] += 1
    plain = [t for t, _, _ in entries(max_tokens=20, temperature=0.0, logprobs=True)]
    assert plain != tokens  # the processing changed the reply, so the comparison above has teeth


def test_openapi_document_matches_the_server(rand_sched):
    """schemathesis, bounded, with all its checks, positive and negative data, over every
    operation. Chat completions may also answer a schema-valid body with 400: JSON Schema
    cannot state the token context or the message order the chat template needs."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.config import SchemathesisConfig

    from nanochat_jax.safety import Policy

    app = create_app(rand_sched, "tiny", safety=Policy.load())
    doc = app.openapi()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "401", "429", "503"}
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert not any("422" in op["responses"] for path in doc["paths"].values() for op in path.values())
    cfg = SchemathesisConfig.from_str('[[operations]]\ninclude-path = "/v1/chat/completions"\n'
                                      'checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]\n')
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=cfg)
    ran = []
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if op.method == "post":  # a body to break (a free-form path string has no invalid form)
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(op.as_strategy(generation_mode=mode))
            def check(case):
                case.call_and_validate()

            check()
            ran.append((op.path, mode.value))
    assert ("/v1/chat/completions", "negative") in ran and ("/v1/moderations", "positive") in ran


def test_truncate_drops_the_oldest_turns(rand_sched):
    """--truncate (or the X-Nanochat-Truncate header) drops the oldest user+assistant turns
    until the prompt leaves room for the reply; the system message and the last turn stay."""
    long = [{"role": "system", "content": "be brief"}]
    for i in range(4):
        long += [{"role": "user", "content": f"question {i} of a long conversation"},
                 {"role": "assistant", "content": f"answer {i}, which is also quite long"}]
    long.append({"role": "user", "content": "and the last one?"})
    body = {"messages": long, "max_tokens": 8, "temperature": 0}
    plain = TestClient(create_app(rand_sched, "tiny"))
    r = plain.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "X-Nanochat-Truncate" in r.json()["error"]["message"]
    for client, headers in ((TestClient(create_app(rand_sched, "tiny", truncate=True)), {}),
                            (plain, {"X-Nanochat-Truncate": "1"})):
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        dropped = int(r.headers["x-truncated-messages"])
        assert dropped % 2 == 0 and 2 <= dropped < 8
        kept = [long[0]] + long[1 + dropped:]
        prompt = TOK.render_for_completion({"messages": kept})
        assert r.json()["usage"]["prompt_tokens"] == len(prompt) and len(prompt) + 8 <= 128
        shorter = TOK.render_for_completion({"messages": [long[0]] + long[dropped - 1:]})
        assert len(shorter) + 8 > 128  # it dropped no more than it had to
    short = plain.post("/v1/chat/completions", json={**body, "messages": MSGS}, headers={"X-Nanochat-Truncate": "1"})
    assert short.status_code == 200 and "x-truncated-messages" not in short.headers


def test_main_reports_load_errors_in_one_line(tmp_path, capsys):
    from serve import app as app_mod

    with pytest.raises(SystemExit) as e:
        app_mod.main(["--checkpoint", str(tmp_path / "missing"), "--tokenizer-dir", str(tmp_path), "--no-warmup"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: could not load the model") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        app_mod.main(["--checkpoint", "x", "--tokenizer-dir", "y", "--safety", str(tmp_path / "none.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "safety policy" in err and "\n" not in err
