"""Supervised fine-tuning records: the layouts users bring, turned into conversations.

    alpaca    {"instruction", "input", "output", "history": [[q, a], ...], "system"}
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
    openai    {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
    qa        {"question", "response"} (and the answer / query variants medical sets use)
    csv       prompt,answer columns (the original project's format)

`auto` picks the layout from the first record's keys. JSON lines and JSON arrays both work.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from babyllama.data.readers import DataError, ReadStats, check_readable, container_of
from babyllama.tokenizer.chat import Message

SFT_LAYOUTS = ("auto", "alpaca", "sharegpt", "openai", "qa", "csv")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bot": "assistant", "system": "system"}
_QA_KEYS = (("question", "response"), ("question", "answer"), ("query", "response"), ("prompt", "response"),
            ("prompt", "answer"), ("input", "output"))


def detect_layout(record: Any) -> str:
    if not isinstance(record, dict):
        raise DataError("records are not JSON objects")
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if any(q in record and a in record for q, a in _QA_KEYS):
        return "qa"
    raise DataError(f"cannot tell the SFT layout from keys {sorted(record)}; pass --format "
                    f"({', '.join(SFT_LAYOUTS[1:])})")


def to_messages(record: dict, layout: str) -> list[Message]:
    """One record -> a conversation. Raises KeyError/TypeError/ValueError on a malformed record."""
    if layout == "alpaca":
        msgs = [Message("system", record["system"])] if record.get("system") else []
        for turn in record.get("history") or []:
            q, a = turn
            msgs += [Message("user", q), Message("assistant", a)]
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        return msgs + [Message("user", prompt), Message("assistant", record["output"])]
    if layout == "sharegpt":
        msgs = [Message("system", record["system"])] if record.get("system") else []
        for turn in record["conversations"]:
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise ValueError(f"unknown speaker {turn['from']!r}")
            msgs.append(Message(role, turn["value"]))
        return msgs
    if layout == "openai":
        return [Message(m["role"], m["content"]) for m in record["messages"]]
    if layout == "qa":
        for q, a in _QA_KEYS:
            if q in record and a in record:
                return [Message("user", record[q]), Message("assistant", record[a])]
        raise KeyError("question/response")
    raise DataError(f"unknown SFT layout '{layout}' (choose from {', '.join(SFT_LAYOUTS)})")


def check_conversation(msgs: list[Message]) -> None:
    if not any(m.role == "assistant" for m in msgs):
        raise ValueError("no assistant reply to learn from")
    for m in msgs:
        if not isinstance(m.content, str):
            raise ValueError(f"{m.role} content is {type(m.content).__name__}, not text")
    if not any(m.content.strip() for m in msgs if m.role == "assistant"):
        raise ValueError("assistant reply is empty")


def _records(path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line or record number, record, unit) from JSON lines, a JSON array or CSV."""
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for i, row in enumerate(reader, start=2):  # line 1 is the header
                yield i, row, "line"
        return
    container = container_of(path)
    if container == "json":
        import ijson

        with open(path, "rb") as f:
            n = 0
            try:
                for n, rec in enumerate(ijson.items(f, "item", use_float=True), start=1):
                    yield n, rec, "record"
            except ijson.common.IncompleteJSONError as e:
                raise DataError(f"{path}: record {n + 1}: malformed JSON array ({e})") from None
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {i}: not valid UTF-8 (convert it: iconv -f gbk -t utf-8)") from None
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), "line"
            except json.JSONDecodeError as e:
                yield i, e, "line"


def read_conversations(path: str | Path, layout: str = "auto", stats: ReadStats | None = None,
                       on_error: str = "skip") -> Iterator[list[Message]]:
    """Conversations of one file. Malformed records are counted in `stats` with file and line
    (on_error='skip', the default for SFT data, which is often messy) or stop the run ('raise')."""
    path = Path(path)
    check_readable(path)
    stats = stats if stats is not None else ReadStats()
    if path.suffix.lower() == ".csv" and layout == "auto":
        layout = "csv"
    for where, rec, unit in _records(path):
        loc = f"{path}: {unit} {where}"
        try:
            if isinstance(rec, json.JSONDecodeError):
                raise ValueError(f"malformed JSON ({rec.msg} at column {rec.colno})")
            if layout == "csv":
                msgs = [Message("user", rec["prompt"]), Message("assistant", rec["answer"])]
            else:
                if layout == "auto":
                    layout = detect_layout(rec)
                msgs = to_messages(rec, layout)
            check_conversation(msgs)
        except DataError as e:
            raise DataError(f"{loc}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            if on_error == "raise":
                raise DataError(f"{loc}: {why}") from None
            stats.skip(loc, why)
            continue
        stats.documents += 1
        yield msgs
