"""Preference pairs: a prompt, a chosen and a rejected reply, in the layouts users bring.

    sharegpt  {"conversations": [{"from": "human", "value": ...}, ...], "chosen": ..., "rejected": ...}
    alpaca    {"instruction", "input", "output": [chosen, rejected], "history"?, "system"?}
    qa        {"question", "response_chosen", "response_rejected"}
    prompt    {"prompt", "chosen", "rejected"}: the prompt a string or a message list ({"role",
              "content"}), each reply a string, a message or a message list (TRL's layouts)

`auto` picks the layout from the first record's keys. JSON lines and JSON arrays both work. The
prompt goes through the SFT chat template with the assistant header after it; a reply is the tokens
the model writes after that header: its text and `<|im_end|>`. A record that cannot be read or
breaks a rule (no user turn last in the prompt, an empty reply, chosen equal to rejected) is counted
with file, line and reason, or stops the run with on_error='raise', as for SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from babyllama.config import IGNORE_INDEX
from babyllama.corpus.readers import DataError, ReadStats, check_readable, split_input_spec
from babyllama.data.batches import ShuffledBatches
from babyllama.data.sft import BadRecord, SFTStats, checked_records, fit_to_window, is_validation_conversation, \
    read_summary
from babyllama.tokenizer.chat import Message

PREFERENCE_LAYOUTS = ("auto", "sharegpt", "alpaca", "qa", "prompt")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bot": "assistant", "system": "system"}


@dataclass
class PreferencePair:
    prompt: list[Message]  # ends with a user turn
    chosen: str
    rejected: str


def detect_layout(record: Any) -> str:
    if not isinstance(record, dict):
        raise DataError("records are not JSON objects")
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "question" in record and "response_chosen" in record:
        return "qa"
    if "prompt" in record and "chosen" in record:
        return "prompt"
    raise DataError(f"cannot tell the preference layout from keys {sorted(record)}; pass --layout "
                    f"({', '.join(PREFERENCE_LAYOUTS[1:])})")


def _message(turn: Any) -> Message:
    if not isinstance(turn, dict):
        raise TypeError(f"a turn is a {type(turn).__name__}, not an object")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role not in _ROLES:
        raise BadRecord(f"unknown role {role!r}", "unknown role")
    return Message(_ROLES[role], _text(content))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def _reply(value: Any) -> str:
    """A reply given as text, as one assistant message, or as a list ending in one."""
    if isinstance(value, list):
        if not value:
            raise BadRecord("an empty reply", "empty reply")
        value = value[-1]
    if isinstance(value, dict):
        msg = _message(value)
        if msg.role != "assistant":
            raise BadRecord(f"a reply from the {msg.role}, not the assistant", "reply not from the assistant")
        return msg.content
    return _text(value)


def _prompt(value: Any) -> list[Message]:
    if isinstance(value, str):
        return [Message("user", value)]
    if isinstance(value, list):
        return [_message(turn) for turn in value]
    raise TypeError(f"the prompt is a {type(value).__name__}, not text or a list of messages")


def to_pair(record: dict, layout: str) -> PreferencePair:
    """One record -> a pair. Raises KeyError/TypeError/ValueError on a malformed record."""
    if layout == "sharegpt":
        prompt = _prompt(record["conversations"])
        chosen, rejected = _reply(record["chosen"]), _reply(record["rejected"])
    elif layout == "alpaca":
        prompt = [Message("system", _text(record["system"]))] if record.get("system") else []
        for turn in record.get("history") or []:
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise BadRecord("a history entry is not a [question, answer] pair", "bad history")
            prompt += [Message("user", _text(turn[0])), Message("assistant", _text(turn[1]))]
        text = _text(record["instruction"])
        if record.get("input"):
            text = f"{text}\n{_text(record['input'])}"
        prompt.append(Message("user", text))
        output = record["output"]
        if not isinstance(output, list) or len(output) < 2:
            raise BadRecord("output must be [chosen, rejected]", "output is not [chosen, rejected]")
        chosen, rejected = _text(output[0]), _text(output[1])
    elif layout == "qa":
        prompt = [Message("user", _text(record["question"]))]
        chosen, rejected = _text(record["response_chosen"]), _text(record["response_rejected"])
    elif layout == "prompt":
        prompt = _prompt(record["prompt"])
        chosen, rejected = _reply(record["chosen"]), _reply(record["rejected"])
    else:
        raise DataError(f"unknown preference layout '{layout}' (choose from {', '.join(PREFERENCE_LAYOUTS)})")
    return check_pair(PreferencePair(prompt, chosen, rejected))


def check_pair(pair: PreferencePair) -> PreferencePair:
    turns = [m for m in pair.prompt if not (m.role == "system" and not m.content.strip())]
    if not turns or turns[-1].role != "user":
        raise BadRecord("the prompt must end with a user turn", "prompt does not end with a user turn")
    if any(not m.content.strip() for m in turns):
        raise BadRecord("an empty turn in the prompt", "empty turn")
    if not pair.chosen.strip() or not pair.rejected.strip():
        raise BadRecord("an empty chosen or rejected reply", "empty reply")
    if pair.chosen == pair.rejected:
        raise BadRecord("chosen and rejected are the same text", "chosen equals rejected")
    return PreferencePair(turns, pair.chosen, pair.rejected)


def read_pairs(path: str | Path, layout: str = "auto", stats: ReadStats | None = None, on_error: str = "raise",
               encoding: str = "utf-8") -> Iterator[PreferencePair]:
    """The pairs of one file; bad records counted in `stats` with file, line and reason (on_error
    'skip') or a DataError naming them ('raise')."""
    path = Path(path)
    check_readable(path)
    if layout not in PREFERENCE_LAYOUTS:
        raise DataError(f"{path}: unknown preference layout '{layout}' (choose from {', '.join(PREFERENCE_LAYOUTS)})")
    stats = stats if stats is not None else ReadStats()
    fmt = layout

    def convert(rec: Any) -> PreferencePair:
        nonlocal fmt
        fmt = detect_layout(rec) if fmt == "auto" else fmt
        return to_pair(rec, fmt)

    for _, pair in checked_records(path, "auto", stats, on_error, encoding, convert):
        yield pair


# --- tokenized pairs and batches ---------------------------------------------------------------------

@dataclass
class PairSample:
    """Two sequences (ids, labels): the prompt then the chosen reply, the prompt then the rejected
    one; labels -100 everywhere but the reply. `ref` holds the reference model's log-probabilities
    of the two replies once computed (align/dpo.py)."""

    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]
    ref: tuple[float, float] | None = None


def tokenize_pair(pair: PreferencePair, template, max_len: int, stats: SFTStats) -> PairSample:
    prompt = template.prompt_ids(pair.prompt)
    sides = []
    for reply in (pair.chosen, pair.rejected):
        ids, labels = template.encode(pair.prompt + [Message("assistant", reply)])
        if ids[:len(prompt)] != prompt:  # the template renders the prompt the same with a reply after it
            raise DataError("the chat template renders the prompt differently before a reply")
        labels = [IGNORE_INDEX] * len(prompt) + labels[len(prompt):]  # earlier assistant turns are prompt
        sides.append(fit_to_window(ids, labels, max_len, stats, header=template.header_len))
    stats.conversations += 1
    return PairSample(sides[0], sides[1])


def build_pairs(files: list[str], template, max_len: int, layout: str = "auto", val_fraction: float = 0.05,
                on_error: str = "raise", encoding: str = "utf-8", verbose: bool = False):
    """(train samples, val samples, report) from preference files; the held-out split is a stable
    hash of the prompt and both replies."""
    read, cut = ReadStats(), SFTStats()
    train, val = [], []
    for spec in files:
        path, fmt = split_input_spec(spec, layout)
        for pair in read_pairs(path, fmt, read, on_error, encoding):
            held_out = is_validation_conversation(pair.prompt + [Message("assistant", pair.chosen),
                                                                 Message("assistant", pair.rejected)], val_fraction)
            (val if held_out else train).append(tokenize_pair(pair, template, max_len, cut))
    if verbose and read.skipped:
        print(read_summary(read))
    if not train:
        raise DataError(f"no usable preference pairs in {', '.join(files)}"
                        + (f" ({read.skipped} skipped; first: {read.skipped_where[0]})" if read.skipped else ""))
    report = {"pairs": read.documents, "skipped": read.skipped, "skipped_where": read.skipped_where[:20],
              "train": len(train), "val": len(val), "truncated_prompt": cut.truncated_prompt,
              "truncated_reply": cut.truncated_reply, "max_len": max_len}
    return train, val, report


def collate_pairs(samples: list[PairSample], pad_id: int):
    """(tokens, targets, ref): tokens and targets (pairs, 2, width) with the chosen sequence at
    [:, 0] and the rejected at [:, 1], so the row dimension stays the pair when ranks split a batch;
    ref (pairs, 2) float32, the reference's log-probs (zeros before they are computed)."""
    import torch

    width = max(len(ids) for s in samples for ids, _ in (s.chosen, s.rejected)) - 1
    x = torch.full((len(samples), 2, width), pad_id, dtype=torch.long)
    y = torch.full((len(samples), 2, width), IGNORE_INDEX, dtype=torch.long)
    ref = torch.zeros(len(samples), 2, dtype=torch.float32)
    for row, s in enumerate(samples):
        for side, (ids, labels) in enumerate((s.chosen, s.rejected)):
            n = len(ids) - 1
            x[row, side, :n] = torch.tensor(ids[:-1])
            y[row, side, :n] = torch.tensor(labels[1:])
        if s.ref is not None:
            ref[row] = torch.tensor(s.ref)
    return x, y, ref


class PairBatches(ShuffledBatches):
    """Shuffled, resumable micro-batches of pairs (rank r takes every world_size-th pair), made by
    `collate(samples, pad_id)`: DPO's `collate_pairs` by default, a reward model's its own."""

    def __init__(self, samples: list[PairSample], batch_size: int, pad_id: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, collate=None):
        if len(samples) < batch_size * world_size:
            raise DataError(f"{len(samples)} preference pairs are fewer than one batch ({batch_size * world_size})")
        self.samples, self.pad_id, self.num_items = samples, pad_id, len(samples)
        self.collate = collate or collate_pairs
        super().__init__(batch_size, seed, rank, world_size)

    def make_batch(self, indices):
        return self.collate([self.samples[int(i)] for i in indices], self.pad_id)
