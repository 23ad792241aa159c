"""The terminal chat: one-shot and interactive modes stream the scripted model's reply."""

import io

import serve.cli as cli
from test_serve import MSGS, chain_engine


def test_answer_streams_until_assistant_end():
    eng = chain_engine("£x")  # a 2-byte character must arrive whole (ids distinct mod n_embd: a bigram chain)
    out = io.StringIO()
    assert cli.answer(eng, {"messages": MSGS}, temperature=0.0, top_k=None, max_tokens=40, seed=0, out=out) == "£x"
    assert out.getvalue() == "£x\n"


def test_one_shot_and_interactive(monkeypatch, capsys):
    eng = chain_engine("hi!")
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: eng)
    cli.main(["--checkpoint", "x", "--tokenizer-dir", "y", "-p", "hello", "--temperature", "0"])
    assert capsys.readouterr().out == "hi!\n"

    lines = iter(["hello", "", "/clear", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = cli.answer
    monkeypatch.setattr(cli, "answer", lambda e, conv, **kw: seen.append([m["role"] for m in conv["messages"]])
                        or real(e, conv, **kw))
    cli.main(["--checkpoint", "x", "--tokenizer-dir", "y", "--temperature", "0", "--system", "be brief"])
    out = capsys.readouterr().out
    assert out.count("Assistant: hi!") == 2
    assert seen == [["system", "user"], ["system", "user"]]  # /clear dropped the first exchange
