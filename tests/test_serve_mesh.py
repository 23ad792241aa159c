"""Serving on a mesh (nanochat_jax/serving_mesh.py) over conftest's 8 fake CPU devices: tensor
parallel and slot replicas give one device's tokens, and the decode state stays split."""

import threading

import jax
import jax.numpy as jnp
import pytest
from fastapi.testclient import TestClient
from jax.sharding import NamedSharding, PartitionSpec as P
from test_engine import random_params
from test_serve import TOK

from nanochat_jax import serving_mesh
from nanochat_jax.config import GPTConfig
from nanochat_jax.scheduler import Engine, Request, Scheduler
from serve import app as app_mod

F32 = jnp.float32
CFG = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                window_pattern="L")
PARAMS = random_params(CFG, seed=3)
PROMPTS = [TOK.render_for_completion({"messages": [{"role": "user", "content": text}]})
           for text in ("hello there", "the cat sat", "a longer prompt than the others")]
SPECS = ["model=2", "data=2", "data=2,model=2"]


def run(engine, slots=4, steps_per_call=1):
    """Three greedy requests and one seeded sampled one, admitted together: (tokens per request, state)."""
    sched = Scheduler(engine, slots=slots, steps_per_call=steps_per_call, thread=False)
    got = [[] for _ in range(4)]
    kws = [dict(temperature=0.0)] * 3 + [dict(temperature=1.0, top_k=20, seed=7)]
    reqs = [sched.submit(Request(p, lambda ev: None, max_tokens=16, on_token=lambda *a, g=g: g.append(a[2]), **kw))
            for p, kw, g in zip(PROMPTS + PROMPTS[:1], kws, got)]
    while not all(ch.done for r in reqs for ch in r.choices):
        sched.run_once()
    return got, sched.state


@pytest.fixture(scope="module")
def solo():
    return run(Engine(PARAMS, CFG, TOK, dtype=F32))[0]


@pytest.mark.parametrize("spec", SPECS)
def test_mesh_tokens_match_one_device_and_state_stays_split(spec, solo):
    mesh = serving_mesh.serving_mesh(spec)
    got, state = run(Engine(PARAMS, CFG, TOK, dtype=F32, mesh=mesh), steps_per_call=2 if "data" in spec else 1)
    assert got == solo  # greedy and seeded sampling alike
    want = serving_mesh.state_shardings(state, mesh)
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.shape, leaf.sharding, sh)
    k = state.k_cache[0]
    assert k.sharding.spec == P("data", "model", None, None)
    assert len({d for s in k.addressable_shards for d in [s.device]}) == mesh.size
    assert k.addressable_shards[0].data.shape == (4 // mesh.shape["data"], 2 // mesh.shape["model"], 128, 16)


def test_engine_api_on_replicas_pads_its_slots(solo):
    eng = Engine(PARAMS, CFG, TOK, dtype=F32, mesh=serving_mesh.serving_mesh("data=2"))
    (one,) = eng.complete(PROMPTS[0], max_tokens=16, temperature=0.0)  # 1 sample on 2 replicas
    assert one.tokens == [t for t in solo[0] if t not in eng.stop_ids]


def test_params_follow_the_rules():
    eng = Engine(PARAMS, CFG, TOK, dtype=F32, mesh=serving_mesh.serving_mesh("model=2"))
    q = eng.params["h_0"]["attn"]["c_q"]["kernel"]
    assert q.sharding.is_equivalent_to(NamedSharding(eng.mesh, P(None, "model")), 2)  # columns (heads) split


@pytest.mark.parametrize("spec, slots, reason", [
    ("model=4", 4, "n_kv_head=2 is not divisible by model=4"),
    ("data=2", 3, "3 slots do not split over data=2"),
    ("fsdp=2", 4, "not fsdp"),
    ("tensor=2", 4, "bad mesh spec"),
    ("model=16", 4, "covers 16 devices but there are 8"),
])
def test_bad_mesh_fails_with_the_reason(spec, slots, reason):
    with pytest.raises(ValueError, match=reason):
        mesh = serving_mesh.serving_mesh(spec)
        Scheduler(Engine(PARAMS, CFG, TOK, dtype=F32, mesh=mesh), slots=slots, thread=False)


def test_server_main_with_mesh(monkeypatch, capsys, solo):
    """`--mesh` through main and the app factory: the server answers with one device's reply."""
    seen = {}

    def load(*a, mesh=None, **k):
        seen["mesh"] = mesh
        return Engine(PARAMS, CFG, TOK, dtype=F32, mesh=mesh)

    def serve(sched, app, *a):
        with TestClient(app) as c:
            seen["reply"] = c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16, "temperature": 0}).json()
        sched.close()
        return 0

    monkeypatch.setattr("nanochat_jax.checkpoint.load_engine", load)
    monkeypatch.setattr(app_mod, "serve", serve)
    with pytest.raises(SystemExit) as e:
        app_mod.main(["--checkpoint", "x", "--tokenizer-dir", "y", "--no-warmup", "--safety", "off",
                      "--slots", "2", "--mesh", "data=2,model=2"])
    assert e.value.code == 0 and dict(seen["mesh"].shape) == {"data": 2, "fsdp": 1, "model": 2}
    want = [t for t in solo[0] if t not in (TOK.encode_special("<|assistant_end|>"), TOK.encode_special("<|bos|>"))]
    assert seen["reply"]["choices"][0]["message"]["content"] == TOK.decode(want)

    started = threading.Event()
    monkeypatch.setattr("nanochat_jax.checkpoint.load_engine", lambda *a, **k: started.set())
    with pytest.raises(SystemExit) as e:
        app_mod.main(["--checkpoint", "x", "--tokenizer-dir", "y", "--slots", "3", "--mesh", "data=2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "3 slots do not split over data=2" in err and not started.is_set()


def test_prefix_reuse_on_a_mesh_matches_one_device():
    """A second turn that extends the first prompt is prefilled from the store and inserted into the
    split decode state: same tokens as one device without the store."""
    turn1 = PROMPTS[2]
    turn2 = turn1 + [TOK.encode_special("<|assistant_start|>")] + TOK.encode(" and then some more words")

    def two_turns(engine, store_bytes):
        sched = Scheduler(engine, slots=4, thread=False, prefix_cache_bytes=store_bytes)
        out = []
        for prompt in (turn1, turn2):
            got = []
            req = sched.submit(Request(prompt, lambda ev: None, max_tokens=8, temperature=0.0,
                                       on_token=lambda *a: got.append(a[2])))
            while not all(ch.done for ch in req.choices):
                sched.run_once()
            out.append(got)
        return out, sched.prefix_cache

    want, _ = two_turns(Engine(PARAMS, CFG, TOK, dtype=F32), 0)
    got, store = two_turns(Engine(PARAMS, CFG, TOK, dtype=F32, mesh=serving_mesh.serving_mesh("data=2,model=2")),
                           1 << 26)
    assert got == want
    assert store.stats()["hits"] == 1


@pytest.mark.parametrize("spec", [pytest.param("model=2", marks=pytest.mark.slow), "data=2,model=2"])  # 3.12 leg: one
def test_int8_on_a_mesh_matches_int8_on_one_device(spec, monkeypatch):
    """`--quantize int8 --mesh ...` through load_engine: the int8 values split like the kernel they
    replace, their per-column scales split along the same columns, and the tokens are one device's."""
    quantize = pytest.importorskip("nanochat_jax.quantize")
    from nanochat_jax import checkpoint
    from nanochat_jax.tokenizer import Tokenizer

    want = run(Engine(quantize.quantize_params(PARAMS, "int8"), CFG, TOK, dtype=F32))[0]
    monkeypatch.setattr(checkpoint, "load_params", lambda *a: (PARAMS, CFG, {}))
    monkeypatch.setattr(Tokenizer, "load", lambda *a: TOK)
    mesh = serving_mesh.serving_mesh(spec)
    eng = checkpoint.load_engine("x", False, "y", dtype=F32, mesh=mesh, quantize="int8")
    got = run(eng, steps_per_call=2)[0]
    assert got == want

    def split(a, spec):
        return a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim)

    q, proj = eng.params["h_0"]["attn"]["c_q"]["kernel"], eng.params["h_0"]["attn"]["c_proj"]["kernel"]
    assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (1, 64)
    assert split(q.qvalue, P(None, "model")) and split(q.scale, P(None, "model"))  # heads' columns, with their scales
    assert split(proj.qvalue, P("model", None)) and split(proj.scale, P())  # rows split, one full scale row
    assert q.qvalue.addressable_shards[0].data.shape == (64, 32)
    head = eng.params["lm_head"]["kernel"]
    assert split(head.qvalue, P(None, "model")) and split(head.scale, P(None, "model"))  # vocab columns
