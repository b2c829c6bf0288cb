"""Multi-turn chat on top of generation: the one chat template, history kept within the window."""

from __future__ import annotations

import sys
from typing import Callable

import torch

from babyllama.infer.generate import stream_text
from babyllama.infer.sampling import SamplingConfig
from babyllama.tokenizer.chat import ChatTemplate, Message


def fit_history(template: ChatTemplate, messages: list[Message], budget: int) -> list[Message]:
    """Drop the oldest turns (never the system prompt, never the newest user turn) until the
    prompt fits `budget` tokens."""
    system = [m for m in messages[:1] if m.role == "system"]
    rest = messages[len(system):]
    while len(rest) > 1 and len(template.prompt_ids(system + rest)) > budget:
        rest = rest[2:] if len(rest) > 2 and rest[0].role == "user" else rest[1:]
    return system + rest


@torch.no_grad()
def chat_reply(model, tokenizer, template: ChatTemplate, messages: list[Message], max_new_tokens: int = 256,
               sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """Generate the assistant's next reply to `messages`, stopping at <|im_end|>."""
    limit = model.config.max_seq_len
    max_new_tokens = min(max_new_tokens, limit // 2)
    messages = fit_history(template, messages, limit - max_new_tokens)
    prompt = template.prompt_ids(messages)[-(limit - max_new_tokens):]
    return stream_text(model, tokenizer, prompt, max_new_tokens, sampling, (template.end_id, tokenizer.eos_id), on_text)


HELP = "commands: /reset (forget the conversation), /system TEXT (set a system prompt), /exit"


def repl(model, tokenizer, sampling: SamplingConfig, max_new_tokens: int = 256, system: str | None = None,
         read: Callable[[str], str] = input, write: Callable[[str], None] = sys.stdout.write) -> None:
    template = ChatTemplate(tokenizer)
    history: list[Message] = [Message("system", system)] if system else []
    write(f"babyllama chat ({HELP})\n")
    while True:
        try:
            line = read("你> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
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
        reply = chat_reply(model, tokenizer, template, history, max_new_tokens, sampling,
                           on_text=lambda s: (write(s), sys.stdout.flush()))
        write("\n")
        history.append(Message("assistant", reply))
