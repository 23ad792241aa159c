"""The terminal chat: one-shot and interactive modes stream the scripted model's reply."""

import io

import pytest

import serve.cli as cli
from test_serve import MSGS, TOK, chain_engine


def test_answer_streams_until_assistant_end():
    eng = chain_engine("£x")  # a 2-byte character must arrive whole (ids distinct mod n_embd: a bigram chain)
    out = io.StringIO()
    assert cli.answer(eng, {"messages": MSGS}, temperature=0.0, top_k=None, max_tokens=40, seed=0, out=out) == "£x"
    assert out.getvalue() == "£x\n"


def test_one_shot_and_interactive(monkeypatch, capsys):
    eng = chain_engine("hi!")
    monkeypatch.setattr("nanochat_jax.checkpoint.load_engine", lambda *a, **k: eng)
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


def test_context_is_enforced_like_the_server(monkeypatch, capsys):
    """A message too long for the 128-token context is refused and not kept; a conversation
    that outgrows it loses its oldest turns with a note, and every prompt sent fits."""
    eng = chain_engine("ok")
    monkeypatch.setattr("nanochat_jax.checkpoint.load_engine", lambda *a, **k: eng)
    lines = iter(["x" * 300, "first question here, of some length", "second question, also long-ish",
                  "third question, which overflows", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sent = []
    real = cli.answer
    monkeypatch.setattr(cli, "answer", lambda e, conv, **kw: sent.append(list(conv["messages"])) or real(e, conv, **kw))
    cli.main(["--checkpoint", "x", "--tokenizer-dir", "y", "--temperature", "0", "--max-tokens", "40"])
    out = capsys.readouterr().out
    assert "message too long" in out and "not sent" in out
    assert all("x" * 300 != m["content"] for conv in sent for m in conv)
    assert "left out to fit the model's context" in out
    assert len(sent) == 3 and sent[-1][-1]["content"] == "third question, which overflows"
    assert sent[-1][0]["content"] != "first question here, of some length"  # the oldest turn went
    for conv in sent:
        assert len(TOK.render_for_completion({"messages": conv})) + 32 <= 128  # room for min(40, 128 / 4)
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", "x", "--tokenizer-dir", "y", "-p", "y" * 300])
    assert "message too long" in capsys.readouterr().err


PTY_SCRIPT = """
import fcntl, sys, termios, time
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal: ^C is SIGINT
sys.path.insert(0, "tests")
import serve.cli as cli
from nanochat_jax import checkpoint, engine as E
from test_serve import chain_engine
real = E.generate_step
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
E.generate_step = slow
eng = chain_engine("ab", loop=True)
checkpoint.load_engine = lambda *a, **k: eng
orig = cli.answer
def answer(e, conv, **kw):
    print("[turns: " + ",".join(m["role"] for m in conv["messages"]) + "]", flush=True)
    return orig(e, conv, **kw)
cli.answer = answer
cli.main(["--checkpoint", "x", "--tokenizer-dir", "y", "--temperature", "0", "--max-tokens", "90"])
print("[clean exit]", flush=True)
"""


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_ctrl_c_stops_the_answer_and_keeps_the_conversation():
    """Under a pseudo-terminal: Ctrl-C while the answer streams stops it (no traceback), the
    partial answer stays in the conversation, the next turn works, /exit exits cleanly."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time
    from pathlib import Path

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", PTY_SCRIPT], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    os.close(slave)
    out, pos = b"", 0

    def read_until(needle, timeout=120):
        """Output up to the first `needle` after the previous match."""
        nonlocal out, pos
        deadline = time.time() + timeout
        while (at := out.find(needle.encode(), pos)) < 0:
            assert time.time() < deadline, f"waited for {needle!r}; got {out.decode(errors='replace')[-2000:]}"
            if select.select([master], [], [], 0.1)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    break
        start, pos = pos, at + len(needle)
        return out[start:pos].decode(errors="replace")

    try:
        read_until("User: ")
        os.write(master, b"hello\n")
        read_until("[turns: user]")
        read_until("abab")
        os.write(master, b"\x03")  # Ctrl-C
        read_until(" [stopped]")
        line = out[:pos].decode(errors="replace").splitlines()[-1]  # the answer's line, with the tty's ^C echo
        partial = line[:-len(" [stopped]")].replace("^C", "")
        assert partial.startswith("abab") and len(partial) < 80  # stopped well before its 90 tokens
        read_until("User: ")
        os.write(master, b"again\n")
        read_until("[turns: user,assistant,user]")  # the stopped answer is part of the conversation
        read_until("abab")
        os.write(master, b"\x03")
        read_until(" [stopped]")
        read_until("User: ")
        os.write(master, b"/exit\n")
        read_until("[clean exit]")
        assert proc.wait(timeout=30) == 0
        text = out.decode(errors="replace")
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
