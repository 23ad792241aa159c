"""Chat with a trained model in the terminal.

    python -m serve.cli --checkpoint out/base_checkpoints/d4/checkpoints --tokenizer-dir out/tokenizer
    python -m serve.cli ... -p "Why is the sky blue?"          # one answer, then exit

Interactive commands: /clear starts a new conversation, /exit (or Ctrl-D) quits. Tokens
stream as they are sampled; a partial multi-byte character is held until it is complete.
"""

from __future__ import annotations

import argparse
import sys

from serve.app import load_engine


def answer(engine, conversation: dict, *, temperature: float, top_k: int | None, max_tokens: int, seed: int,
           out=None) -> str:
    """Stream the assistant's reply to `out` (default stdout) and return its text."""
    out = out or sys.stdout
    prompt = engine.tokenizer.render_for_completion(conversation)
    stop = set(engine.stop_ids)
    ids, shown = [], ""
    for column, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed):
        tok = column[0]
        if tok in stop:
            break
        ids.append(tok)
        text = engine.tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = engine.tokenizer.decode(ids)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text


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
    args = ap.parse_args(argv)
    engine = load_engine(args.checkpoint, args.nanochat, args.tokenizer_dir, args.dtype)
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, max_tokens=args.max_tokens)
    if args.prompt is not None:
        answer(engine, {"messages": base + [{"role": "user", "content": args.prompt}]}, seed=args.seed, **kw)
        return
    print("nanochat-jax chat — /clear for a new conversation, /exit or Ctrl-D to quit")
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
        messages.append({"role": "user", "content": line})
        print("Assistant: ", end="", flush=True)
        reply = answer(engine, {"messages": messages}, seed=args.seed + turn, **kw)
        messages.append({"role": "assistant", "content": reply or " "})
        turn += 1


if __name__ == "__main__":
    main()
