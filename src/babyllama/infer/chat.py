"""Multi-turn chat: fitting a conversation into the context, and the terminal session (`repl`).
The reply itself is `Engine.reply` (infer/engine.py)."""

from __future__ import annotations

import io
import sys
import warnings
from typing import Callable

from babyllama.config import ConfigError
from babyllama.infer.generate import prompt_cut_warning, reply_room
from babyllama.infer.sampling import MAX_NEW_TOKENS, SamplingConfig, check_max_new_tokens
from babyllama.infer.text import check_encoding, user_text
from babyllama.tokenizer.chat import ChatTemplate, Message


def fit_history(template: ChatTemplate, messages: list[Message], budget: int) -> list[Message]:
    """Drop the oldest turns (never the system prompt, never the newest user turn) until the
    prompt fits `budget` tokens."""
    system = [m for m in messages[:1] if m.role == "system"]
    rest = messages[len(system):]
    while len(rest) > 1 and len(template.prompt_ids(system + rest)) > budget:
        rest = rest[2:] if len(rest) > 2 and rest[0].role == "user" else rest[1:]
    return system + rest


def fit_chat_prompt(template: ChatTemplate, messages: list[Message], limit: int, max_new_tokens: int) -> list[int]:
    """The prompt ids for the next reply, leaving reply_room() tokens of the `limit`-token context.

    First whole old turns go (`fit_history`); if the rest is still too long, the earliest tokens
    of the message contents go, the oldest non-system message first, the system prompt last, with
    a warning. Every `<|im_start|>role\\n`, every `<|im_end|>` and the final assistant header stay."""
    check_max_new_tokens(max_new_tokens)
    reserve = reply_room(limit, max_new_tokens)
    budget = limit - reserve
    messages = fit_history(template, messages, budget)
    segments = template.segments(messages, add_generation_prompt=True)
    total = sum(len(s) for s in segments)
    excess = total - budget
    if excess <= 0:
        return [i for s in segments for i in s.ids()]
    order = [i for i, m in enumerate(messages) if m.role != "system"] + \
            [i for i, m in enumerate(messages) if m.role == "system"]
    for i in order:
        cut = min(excess, len(segments[i].content))
        segments[i].content = segments[i].content[cut:]
        excess -= cut
    if excess > 0:
        markers = sum(len(s) for s in segments)
        raise ConfigError(f"the model's context of {limit} tokens, {reserve} of them kept for the reply, cannot "
                          f"hold even the {markers} tokens of this conversation's turn markers; "
                          f"lower --max-new-tokens or drop the system prompt")
    warnings.warn(prompt_cut_warning("chat prompt", total, limit, reserve, total - budget, " of message text")
                  + " (every turn's role header kept)", stacklevel=3)
    return [i for s in segments for i in s.ids()]


HELP = "commands: /reset (forget the conversation), /system TEXT (set a system prompt), /exit"


def tolerate_bad_bytes(stream=None) -> None:
    """Let a text stream (default sys.stdin) hand undecodable bytes over as surrogates
    (`user_text` then decodes or reports them) instead of raising UnicodeDecodeError."""
    stream = sys.stdin if stream is None else stream
    if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
        try:
            stream.reconfigure(errors="surrogateescape")
        except (ValueError, io.UnsupportedOperation):  # closed or detached: nothing to read from anyway
            pass


def repl(engine, sampling: SamplingConfig, max_new_tokens: int = MAX_NEW_TOKENS, system: str | None = None,
         read: Callable[[str], str] = input, write: Callable[[str], None] = sys.stdout.write,
         encoding: str | None = None) -> None:
    """Chat on the terminal. `encoding` names what the terminal sends when it is not UTF-8 (e.g.
    gb18030); a line that cannot be read is reported and the session goes on."""
    check_max_new_tokens(max_new_tokens)
    if encoding is not None:
        check_encoding(encoding)
    if read is input:
        tolerate_bad_bytes()
    system = user_text(system, encoding, "--system") if system else system
    history: list[Message] = [Message("system", system)] if system else []
    write(f"babyllama chat ({HELP})\n")
    while True:
        try:
            line = user_text(read("你> "), encoding, "that line").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        except (ConfigError, UnicodeDecodeError) as e:
            write(f"error: {e}\n")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = [m for m in history if m.role == "system"]
            write("(conversation cleared)\n")
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            history = ([Message("system", text)] if text else []) + [m for m in history if m.role != "system"]
            write(f"(system prompt {'set' if text else 'removed'})\n")
            continue
        if line.startswith("/"):
            write(f"unknown command; {HELP}\n")
            continue
        history.append(Message("user", line))
        write("助手> ")
        reply = engine.reply(history, max_new_tokens, sampling, on_text=lambda s: (write(s), sys.stdout.flush()))
        write("\n")
        history.append(Message("assistant", reply))
