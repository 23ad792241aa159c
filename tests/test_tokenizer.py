"""Tokenizer: training, round trips, specials, persistence (ours and upstream's pickle),
the chat template's ids and masks, malformed conversations, and the tok_train/tok_eval CLIs.
Everything is trained on a small corpus generated here; nothing touches the network."""

import importlib.util
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nanochat_jax.paths import tokenizer_dir
from nanochat_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, cap_documents
from train import tok_eval, tok_train

VOCAB = 512
REPO = Path(__file__).resolve().parents[1]

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not "
         "time people year way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government "
         "number night point home water room mother area money story fact month lot right study book "
         "eye job word business issue side kind head house service friend father power hour game line").split()
EXTRAS = ["café", "naïve", "Größe", "señor", "façade", "日本語", "中文字", "한국어", "안녕하세요", "🙂", "🚀", "Ωμέγα",
          "don't", "we'll", "it's", "3.14159", "2024", "x**2", "{'a': 1}", "\t", "\r\n"]
CODE = ["def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i)\n", "import numpy as np\n",
        "if a == b:\n    raise ValueError('bad')\n", "class Foo:\n    pass\n", "x = [1, 2, 3]\n"]


def make_docs(n_docs: int, seed: int) -> list[str]:
    """Deterministic mixed prose, numbers, non-Latin scripts and code (~500 chars a doc)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        while sum(map(len, parts)) < 500:
            r = rng.random()
            if r < 0.75:
                parts.append(rng.choice(WORDS) + rng.choice([" ", " ", " ", ", ", ". ", "\n"]))
            elif r < 0.9:
                parts.append(rng.choice(EXTRAS) + " ")
            elif r < 0.97:
                parts.append(str(rng.randrange(10 ** rng.randrange(1, 7))) + " ")
            else:
                parts.append(rng.choice(CODE))
        docs.append("".join(parts).capitalize())
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs(600, seed=0)


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train(docs, VOCAB)


# ---- training, specials, encode/decode --------------------------------------------------


def test_vocab_layout(tok):
    assert tok.vocab_size == VOCAB
    assert tok.encoding.name == "rustbpe"
    assert tok.encoding.__getstate__()["pat_str"] == SPLIT_PATTERN
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - 9, VOCAB))
    assert tok.bos_token_id == VOCAB - 9
    assert tok.token_bytes.dtype == np.int32 and tok.token_bytes.shape == (VOCAB,)
    assert not tok.token_bytes.flags.writeable
    assert (tok.token_bytes[:256] == 1).all() and (tok.token_bytes[-9:] == 0).all()
    assert (tok.token_bytes[256:-9] >= 2).all()


def test_special_text_is_plain_text(tok):
    for s in SPECIAL_TOKENS:
        ids = tok.encode(s)
        assert len(ids) > 1 and max(ids) < VOCAB - 9
        assert tok.decode(ids) == s
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("hello")


unicode_text = st.one_of(
    st.text(),
    st.text(st.characters(max_codepoint=0x7F)),
    st.text(st.sampled_from("aeiouàéïõüçñßøå ÀÉÎÕÜ")),
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)),
    st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)),
    st.text(st.characters(max_codepoint=0x1F)),
)


@settings(max_examples=300)
@given(unicode_text)
@example("Hello, world! 123456")
@example("café naïve 日本語 안녕하세요 🙂🚀 \x00\x07\r\n\t ")
def test_round_trip_and_token_bytes(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_prepend_append(tok):
    body = tok.encode("hello world")
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>", append=end) == [bos, *body, end]
    assert tok.encode("hello world", prepend=bos) == [bos, *body]
    assert tok.encode(["hello world", ""], prepend=bos, append="<|assistant_end|>") == [[bos, *body, end], [bos, end]]
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", prepend="hello")
    with pytest.raises(ValueError, match="outside the vocab"):
        tok.encode("x", append=VOCAB)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_batch_equals_single(tok, docs):
    batch = docs[:50] + ["", "<|bos|>"]
    assert tok.encode(batch, num_threads=4) == [tok.encode(t) for t in batch]


def test_cap_documents_stops_after_the_doc_that_crosses_the_limit():
    def docs():
        yield from ["a" * 100] * 3
        raise AssertionError("read past the document that crossed max_chars")

    assert list(cap_documents(docs(), doc_cap=50, max_chars=120)) == ["a" * 50] * 3
    assert list(cap_documents(["abc", "de"], doc_cap=10, max_chars=None)) == ["abc", "de"]
    assert list(cap_documents(["abc", "de"], doc_cap=10, max_chars=5)) == ["abc", "de"]


def test_train_errors(docs):
    with pytest.raises(ValueError, match="vocab_size 265 < 266"):
        Tokenizer.train(docs, 265)
    with pytest.raises(ValueError, match="merges but vocab_size"):
        Tokenizer.train(["ab ab ab cd"], 300)


# ---- persistence ----------------------------------------------------------------------


def test_save_load_identical(tok, docs, tmp_path):
    out = tok.save(tmp_path / "tok")
    torch_copy = ["token_bytes.pt"] if importlib.util.find_spec("torch") else []  # upstream's copy needs torch
    assert sorted(p.name for p in out.iterdir()) == ["token_bytes.npy", *torch_copy, "tokenizer.pkl"]
    back = Tokenizer.load(out)
    assert back.encoding.__getstate__() == tok.encoding.__getstate__()
    assert back.encode(docs[:20]) == tok.encode(docs[:20])
    np.testing.assert_array_equal(back.token_bytes, tok.token_bytes)
    assert back.token_bytes.dtype == np.int32

    # What upstream nanochat reads: a plain pickle of a tiktoken.Encoding, and an int32 tensor.
    with open(out / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding) and enc.name == "rustbpe"
    torch = pytest.importorskip("torch")
    tb = torch.load(out / "token_bytes.pt")
    assert tb.dtype == torch.int32
    np.testing.assert_array_equal(tb.numpy(), tok.token_bytes)


def test_load_upstream_pickle(tmp_path):
    """A tokenizer.pkl built the way upstream builds it: bytes, then merges, then the specials."""
    ranks = {bytes([i]): i for i in range(256)}
    for pair in (b"th", b"he", b"the", b" the", b"in"):
        ranks[pair] = len(ranks)
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)

    for path in (tmp_path, tmp_path / "tokenizer.pkl"):
        tok = Tokenizer.load(path)
        assert tok.vocab_size == 270 and tok.bos_token_id == 261
        assert tok.encode(" the then") == enc.encode_ordinary(" the then")
        assert tok.token_bytes[258] == 3 and tok.token_bytes[259] == 4 and (tok.token_bytes[-9:] == 0).all()


def test_load_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "nowhere")

    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="holds a dict, not a tiktoken.Encoding"):
        Tokenizer.load(tmp_path / "dict.pkl")

    marker = tmp_path / "pwned"
    evil = pickle.dumps(type("Evil", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})())
    (tmp_path / "evil.pkl").write_bytes(evil)
    with pytest.raises(ValueError, match="could not unpickle"):
        Tokenizer.load(tmp_path / "evil.pkl")
    assert not marker.exists()

    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps(tok.encoding)[:100])
    with pytest.raises(ValueError, match="could not unpickle"):
        Tokenizer.load(tmp_path / "trunc.pkl")

    plain = tiktoken.Encoding(name="x", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                              special_tokens={})
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(plain))
    with pytest.raises(ValueError, match="lacks nanochat special tokens"):
        Tokenizer.load(tmp_path / "plain.pkl")


def test_load_rejects_token_bytes_from_another_save(tok, tmp_path):
    """An interrupted re-save can leave one file old and one new; load must notice."""
    tok.save(tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))
    stale = tok.token_bytes.copy()
    stale[300] += 1
    np.save(tmp_path / "token_bytes.npy", stale)
    with pytest.raises(ValueError, match="does not match tokenizer.pkl"):
        Tokenizer.load(tmp_path)
    (tmp_path / "token_bytes.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        Tokenizer.load(tmp_path)
    (tmp_path / "token_bytes.npy").unlink()
    np.testing.assert_array_equal(Tokenizer.load(tmp_path).token_bytes, tok.token_bytes)


# ---- chat template --------------------------------------------------------------------


class Expected:
    """Builds the expected (ids, mask) by hand, one segment at a time."""

    def __init__(self, tok):
        self.tok, self.ids, self.mask = tok, [], []

    def special(self, name, m):
        return self.add([self.tok.encode_special(name)], m)

    def text(self, s, m):
        return self.add(self.tok.encode(s), m)

    def add(self, ids, m):
        self.ids += ids
        self.mask += [m] * len(ids)
        return self


CONV = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3*7? <|bos|>"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me check. "},
        {"type": "python", "text": "print(3*7)"},
        {"type": "python_output", "text": "21\n"},
        {"type": "text", "text": "It is 21."},
    ]},
]}


def expected_conv(tok):
    e = Expected(tok).special("<|bos|>", 0)
    e.special("<|user_start|>", 0).text("Be brief.\n\nWhat is 2+2?", 0).special("<|user_end|>", 0)
    e.special("<|assistant_start|>", 0).text("4", 1).special("<|assistant_end|>", 1)
    e.special("<|user_start|>", 0).text("And 3*7? <|bos|>", 0).special("<|user_end|>", 0)
    e.special("<|assistant_start|>", 0).text("Let me check. ", 1)
    e.special("<|python_start|>", 1).text("print(3*7)", 1).special("<|python_end|>", 1)
    e.special("<|output_start|>", 0).text("21\n", 0).special("<|output_end|>", 0)
    e.text("It is 21.", 1).special("<|assistant_end|>", 1)
    return e


def test_render_conversation_exact(tok):
    ids, mask = tok.render_conversation(CONV)
    e = expected_conv(tok)
    assert (ids, mask) == (e.ids, e.mask)
    supervised = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(supervised) == ("4<|assistant_end|>Let me check. <|python_start|>print(3*7)<|python_end|>"
                                      "It is 21.<|assistant_end|>")


def test_system_merge_equals_manual_prefix(tok):
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nWhat is 2+2?"}] + CONV["messages"][2:]}
    assert tok.render_conversation(CONV) == tok.render_conversation(merged)


def test_render_truncates(tok):
    full_ids, full_mask = tok.render_conversation(CONV, max_tokens=None)
    assert len(full_ids) > 32
    assert tok.render_conversation(CONV, max_tokens=32) == (full_ids[:32], full_mask[:32])
    long = {"messages": [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok"}]}
    ids, mask = tok.render_conversation(long)
    assert len(ids) == len(mask) == 2048


def test_render_for_completion(tok):
    ids = tok.render_for_completion(CONV)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    prompt = {"messages": CONV["messages"][:-1]}
    assert ids == tok.render_conversation(prompt, max_tokens=None)[0] + [ids[-1]]
    assert tok.render_for_completion(prompt) == ids  # a conversation ending with the user renders the same
    assert "It is 21." not in tok.decode(ids)
    assert len(CONV["messages"]) == 5  # the caller's conversation is left alone


BAD = [
    ({}, "a 'messages' list"),
    ({"messages": []}, "no messages"),
    ({"messages": ["hi"]}, "message 0: must be a dict"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "message 0: expected role 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "message 1: expected role 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]},
     "message 1: expected role 'user'"),
    ({"messages": [{"role": "system", "content": "s"}]}, "message 0: a system message must be followed"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]},
     "message 1: a system message is only allowed first"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "message 0: unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": ""}]}, "message 0: empty user content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}]},
     "message 1: empty assistant content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
     "message 0: user content must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
     "message 1: assistant content must be a string or a list"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     "message 1, part 0: unknown part type 'image'"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "python"}]}]},
     "message 1, part 1: 'text' must be a string"),
]


@pytest.mark.parametrize("conversation, error", BAD)
def test_malformed_conversations(tok, conversation, error):
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace("*", r"\*")):
        tok.render_conversation(conversation)


# ---- CLIs -----------------------------------------------------------------------------

VAL_MARK = "Ж"  # only in the val shard: it must never be merged into a token


def write_shards(data_dir: Path, docs: list[str]) -> None:
    data_dir.mkdir()
    val = [d + (" " + VAL_MARK * 4) * 20 for d in docs[:100]]
    for name, rows in (("shard_00000", docs[:300]), ("shard_00001", docs[300:]), ("shard_00002", val)):
        pq.write_table(pa.table({"text": rows}), data_dir / f"{name}.parquet", row_group_size=64)


def has_merge_with(tok, s: str) -> bool:
    needle = s.encode("utf-8")
    return any(needle in tok.encoding.decode_single_token_bytes(i) for i in range(256, tok.vocab_size - 9))


def test_tok_train_and_eval_cli(docs, tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "tok"
    write_shards(data, docs)
    tok_train.main(["--data-dir", str(data), "--out-dir", str(out), "--vocab-size", "400", "--doc-cap", "400"])
    printed = capsys.readouterr().out
    assert "600 docs" in printed and "round trip ok" in printed and "val shard shard_00002.parquet" in printed

    tok = Tokenizer.load(out)
    assert tok.vocab_size == 400
    assert not has_merge_with(tok, VAL_MARK)
    val_docs = pq.read_table(data / "shard_00002.parquet").column("text").to_pylist()
    assert has_merge_with(Tokenizer.train(val_docs, 400), VAL_MARK)  # so the check above has teeth

    def only_gpt2(name):  # stands in for a cached gpt2 file and an unreachable cl100k download
        if name == "gpt2":
            return tok.encoding
        raise ConnectionError(f"cannot fetch {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", only_gpt2)
    tok_eval.main(["--tokenizer-dir", str(out), "--data-dir", str(data)])
    printed = capsys.readouterr().out
    assert "cl100k_base: skipped (not available offline: ConnectionError)" in printed
    assert "gpt2 tok" in printed and "ours tok" in printed
    for label in ("news", "korean", "code", "math", "science", "train-rg0", "val-rg0"):
        assert label in printed


def test_tok_eval_subprocess_offline(tok, tmp_path):
    """The real download path fails fast through an unusable proxy: a report, not a traceback."""
    tok.save(tmp_path)
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "train.tok_eval", "--tokenizer-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "skipped (not available offline" in r.stdout and "ours" in r.stdout


def test_default_dir_follows_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path))
    assert tokenizer_dir() == tmp_path / "tokenizer"


def test_tok_train_needs_two_shards(tmp_path):
    pq.write_table(pa.table({"text": ["only one"]}), tmp_path / "shard_00000.parquet")
    with pytest.raises(SystemExit, match="need at least 2"):
        tok_train.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
