"""Chat with a trained model in the terminal.

    python -m serve.cli --checkpoint out/base_checkpoints/d4/checkpoints --tokenizer-dir out/tokenizer
    python -m serve.cli ... -p "Why is the sky blue?"          # one answer, then exit

Interactive commands: /clear starts a new conversation, /exit (or Ctrl-D) quits. Tokens
stream as they are sampled; a partial multi-byte character is held until it is complete.
Ctrl-C while an answer streams stops it and keeps the conversation (with the partial
answer); Ctrl-C at the prompt quits. A conversation that outgrows the model's context
loses its oldest turns, with a note (the server's --truncate rule); a single message too
long for the context is refused.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from serve.app import engine_from_args, truncate_messages


class _StopOnInterrupt:
    """While active, Ctrl-C (SIGINT) sets a flag instead of raising inside a device call."""

    def __init__(self):
        self.stopped = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.stopped = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def answer(engine, conversation: dict, *, temperature: float, top_k: int | None, max_tokens: int, seed: int,
           out=None) -> str:
    """Stream the assistant's reply to `out` (default stdout) and return its text (partial if Ctrl-C stopped it)."""
    out = out or sys.stdout
    prompt = engine.tokenizer.render_for_completion(conversation)
    max_tokens = max(1, min(max_tokens, engine.config.sequence_len - len(prompt)))
    stop = set(engine.stop_ids)
    ids, shown = [], ""
    with _StopOnInterrupt() as guard:
        gen = engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
        try:
            for column, _ in gen:
                tok = column[0]
                if tok in stop:
                    break
                ids.append(tok)
                text = engine.tokenizer.decode(ids)
                if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                    out.write(text[len(shown):])
                    out.flush()
                    shown = text
                if guard.stopped:
                    break
        finally:
            gen.close()
    text = engine.tokenizer.decode(ids)
    out.write(text[len(shown):] + (" [stopped]" if guard.stopped else "") + "\n")
    out.flush()
    return text


def fit_context(engine, messages: list[dict], max_tokens: int) -> tuple[list[dict], int]:
    """The server's --truncate rule: drop the oldest turns until the prompt leaves room for
    min(max_tokens, context / 4) reply tokens. ValueError if the last message alone is too long."""
    context = engine.config.sequence_len
    room = min(max_tokens, context // 4)
    size = lambda ms: len(engine.tokenizer.render_for_completion({"messages": ms}))  # noqa: E731
    kept, dropped = truncate_messages(messages, lambda ms: size(ms) + room <= context)
    if size(kept) + room > context:
        raise ValueError(f"message too long: {size(kept)} tokens with the system prompt, and the model's context "
                         f"is {context} tokens ({room} kept for the answer)")
    return kept, dropped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Orbax checkpoint dir (or nanochat .pt dir with --nanochat)")
    ap.add_argument("--nanochat", action="store_true")
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    ap.add_argument("--system", default=None, help="a system prompt for the conversation")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--mesh", default=None, metavar="SPEC", help="model=N: split the model over N devices")
    ap.add_argument("--quantize", default=None, metavar="int8", help="weight-only int8 matmul kernels (off by default)")
    args = ap.parse_args(argv)
    if args.max_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        ap.error("--max-tokens must be >= 1, --temperature and --top-k >= 0")
    engine = engine_from_args(ap, args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, max_tokens=args.max_tokens)
    if args.prompt is not None:
        try:
            conv, _ = fit_context(engine, base + [{"role": "user", "content": args.prompt}], args.max_tokens)
        except ValueError as e:
            ap.exit(1, f"error: {e}\n")
        answer(engine, {"messages": conv}, seed=args.seed, **kw)
        return
    print("nanochat-jax chat — /clear for a new conversation, /exit or Ctrl-D to quit, Ctrl-C stops an answer")
    turn = 0
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            messages = list(base)
            continue
        if not line:
            continue
        try:
            messages, dropped = fit_context(engine, messages + [{"role": "user", "content": line}], args.max_tokens)
        except ValueError as e:
            print(f"({e}; not sent)")
            continue
        if dropped:
            print(f"({dropped} earlier message{'s were' if dropped > 1 else ' was'} left out to fit the "
                  f"model's context)")
        print("Assistant: ", end="", flush=True)
        reply = answer(engine, {"messages": messages}, seed=args.seed + turn, **kw)
        messages.append({"role": "assistant", "content": reply or " "})
        turn += 1


if __name__ == "__main__":
    main()
