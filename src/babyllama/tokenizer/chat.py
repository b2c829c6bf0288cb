"""The chat template, defined once: SFT, `chat`, generation (and later the server and the exported
tokenizer) all build conversations here.

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n

The markers are special-token *ids* inserted by this code, never parsed from text, so a prompt can
neither forge a turn boundary nor be confused with the end of a document (the original project's
`<eos>` / `<bos>` separator mix-up cannot happen). Labels cover every assistant turn's content and
its closing <|im_end|>; everything else is -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from babyllama.config import IGNORE_INDEX
from babyllama.tokenizer import IM_END, IM_START, Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")
IGNORE = IGNORE_INDEX  # the name this module and the tests use


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} (expected one of {', '.join(ROLES)})")


@dataclass
class Segment:
    """One message's ids in a prompt: header `<|im_start|>role\n`, content, closing `<|im_end|>\n`."""

    header: list[int]
    content: list[int]
    closing: list[int]

    def ids(self) -> list[int]:
        return self.header + self.content + self.closing

    def __len__(self) -> int:
        return len(self.header) + len(self.content) + len(self.closing)


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        specials = tokenizer.special_tokens
        if IM_START in specials and IM_END in specials:
            self.start_id, self.end_id = specials[IM_START], specials[IM_END]
        elif "sop" in specials and "eop" in specials:  # ChatGLM2: its own turn markers
            self.start_id, self.end_id = specials["sop"], specials["eop"]
        else:
            raise TokenizerError(f"{tokenizer.kind} tokenizer has no chat markers ({IM_START}/{IM_END}); "
                                 f"train one with `babyllama tokenizer train`, which reserves them")
        self._role_ids = {role: tokenizer.encode(role + "\n") for role in ROLES}
        self._newline = tokenizer.encode("\n")
        self.header_len = 1 + len(self._role_ids["assistant"])  # <|im_start|>assistant\n

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as (header, content, closing) ids per message: `<|im_start|>role\n`,
        the content, `<|im_end|>\n`. With add_generation_prompt, a last segment holds the assistant
        header alone. Joined, they are `encode(...)[0]`; a cut content leaves every marker in place."""
        contents = self.tok.encode_batch([m.content for m in messages]) if messages else []
        out = [Segment([self.start_id, *self._role_ids[m.role]], list(content), [self.end_id, *self._newline])
               for m, content in zip(messages, contents)]
        if add_generation_prompt:
            out.append(Segment([self.start_id, *self._role_ids["assistant"]], [], []))
        return out

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels (-100 outside assistant replies) of a whole conversation."""
        ids: list[int] = []
        labels: list[int] = []
        segments = self.segments(messages, add_generation_prompt)
        roles = [m.role for m in messages] + ["assistant header"] * add_generation_prompt
        for role, seg in zip(roles, segments):
            ids += seg.ids()
            if role == "assistant":  # its content and <|im_end|> are learned; the newline after is not
                body = seg.content + seg.closing[:1]
                labels += [IGNORE] * len(seg.header) + body + [IGNORE] * (len(seg.closing) - 1)
            else:
                labels += [IGNORE] * len(seg)
        return ids, labels

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """What the model sees before it writes the next assistant reply."""
        return self.encode(messages, add_generation_prompt=True)[0]

    @staticmethod
    def render(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The same conversation as text (for display and for tokenizers that export a template)."""
        text = "".join(f"{IM_START}{m.role}\n{m.content}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class PlainText:
    """No chat template: what a pretrained model continues. A prompt is its messages' text after an
    end-of-text token (how `generate` starts a completion); a reply is the continuation, closed by
    end-of-text. Prompt and reply are tokenized apart, as generation produces them. The same
    interface as ChatTemplate where preference pairs and RL rollouts use it (`--no-chat`)."""

    header_len = 1  # the end-of-text that starts every prompt is kept when a long prompt is cut

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.end_id = tokenizer.eos_id

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return [self.tok.eos_id] + self.tok.encode("\n".join(m.content for m in messages))

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """The prompt (every message but a final assistant one) and that reply, if any, with labels
        on the reply and its closing end-of-text."""
        if not messages or messages[-1].role != "assistant":
            ids = self.prompt_ids(messages)
            return ids, [IGNORE] * len(ids)
        prompt = self.prompt_ids(messages[:-1])
        reply = self.tok.encode(messages[-1].content) + [self.tok.eos_id]
        return prompt + reply, [IGNORE] * len(prompt) + reply
