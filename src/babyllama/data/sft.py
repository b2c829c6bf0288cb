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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from babyllama.data.readers import DataError, ReadStats, check_readable, container_of
from babyllama.tokenizer.chat import IGNORE, Message

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


# --- tokenized SFT samples ------------------------------------------------------------------------

@dataclass
class SFTSample:
    ids: list[int]
    labels: list[int]  # -100 where no loss is taken


@dataclass
class SFTStats:
    conversations: int = 0
    truncated_prompt: int = 0  # earlier turns or prompt text dropped to fit
    truncated_reply: int = 0  # the reply itself was cut (only when it alone exceeds the window)


def fit_to_window(ids: list[int], labels: list[int], max_len: int, stats: SFTStats,
                  header: int = 4) -> tuple[list[int], list[int]]:
    """Truncation policy, in order: (1) keep everything if it fits; (2) drop tokens from the *start*
    (earliest turns, then the beginning of the prompt) until the last assistant reply and the
    `header` tokens before it fit; (3) if that reply alone is longer than the window, keep its
    beginning and cut the rest. An answer is never silently dropped: every cut is counted."""
    if len(ids) <= max_len:
        return ids, labels
    last = len(labels) - 1
    while labels[last] == IGNORE:
        last -= 1
    reply_start = last
    while reply_start > 0 and labels[reply_start - 1] != IGNORE:
        reply_start -= 1
    cut = len(ids) - max_len
    if cut <= reply_start - header:
        stats.truncated_prompt += 1
        ids, labels = ids[cut:], labels[cut:]
        first_ignored = labels.index(IGNORE)
        labels = [IGNORE] * first_ignored + labels[first_ignored:]  # no loss on a reply cut in half
        return ids, labels
    stats.truncated_reply += 1
    start = max(0, reply_start - header)
    return ids[start:start + max_len], labels[start:start + max_len]


def tokenize_conversations(convs, template, max_len: int, stats: SFTStats | None = None) -> list[SFTSample]:
    stats = stats if stats is not None else SFTStats()
    out = []
    for msgs in convs:
        ids, labels = template.encode(msgs)
        ids, labels = fit_to_window(ids, labels, max_len, stats, header=template.header_len)
        stats.conversations += 1
        out.append(SFTSample(ids, labels))
    return out


class SFTBatches:
    """Shuffled, resumable micro-batches of conversations, padded to the longest in the batch.
    Inputs are ids[:-1], targets labels[1:]; padding is never trained on. Rank-aware like
    PretrainBatches (rank r takes every world_size-th sample of each global batch)."""

    def __init__(self, samples: list[SFTSample], batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(samples) < batch_size * world_size:
            raise DataError(f"{len(samples)} conversations are fewer than one batch ({batch_size * world_size})")
        self.samples, self.batch_size, self.pad_id = samples, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int):
        """A shuffled order in which neighbours have similar lengths: windows of 64 batches are
        sorted by length and their batches shuffled again, so little compute goes to padding."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.samples), generator=g).tolist()
        global_batch = self.batch_size * self.world_size
        window = 64 * global_batch
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: len(self.samples[i].ids))
            batches += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
        shuffled = torch.randperm(len(batches), generator=g).tolist()
        return [i for b in shuffled for i in batches[b]]

    def _next_share(self) -> list:
        """This rank's entries of the next global batch (a new epoch's order when one runs out)."""
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        share = self._order[self.cursor:self.cursor + global_batch][self.rank::self.world_size]
        self.cursor += global_batch
        return share

    def next_batch(self):
        return collate([self.samples[i] for i in self._next_share()], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def collate(samples: list[SFTSample], pad_id: int):
    import torch

    width = max(len(s.ids) for s in samples) - 1
    x = torch.full((len(samples), width), pad_id, dtype=torch.long)
    y = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.ids) - 1
        x[row, :n] = torch.tensor(s.ids[:-1])
        y[row, :n] = torch.tensor(s.labels[1:])
    return x, y


# --- packing: several short conversations in one row, never attending to each other -------------

def pack_rows(lengths: list[int], order: list[int], capacity: int, window: int = 4096) -> list[list[int]]:
    """Group sample indices (taken in `order`) into rows of at most `capacity` tokens: first-fit
    decreasing inside windows of `window` samples, so rows are well filled and the shuffle holds."""
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        bins: list[tuple[int, list[int]]] = []  # (room left, members)
        for i in sorted(order[start:start + window], key=lambda i: -lengths[i]):
            for b, (room, members) in enumerate(bins):
                if lengths[i] <= room:
                    members.append(i)
                    bins[b] = (room - lengths[i], members)
                    break
            else:
                bins.append((capacity - lengths[i], [i]))
        rows += [members for _, members in bins]
    return rows


class PackedSFTBatches(SFTBatches):
    """Like SFTBatches, but each of the `batch_size` rows holds as many conversations as fit in
    `capacity` tokens, with segment ids so that the model keeps them apart (see Llama.forward)."""

    def __init__(self, samples: list[SFTSample], batch_size: int, pad_id: int, capacity: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.capacity = capacity
        self._lengths = [len(s.ids) - 1 for s in samples]
        super().__init__(samples, batch_size, pad_id, seed, rank, world_size)
        if len(self._order) < batch_size * world_size:
            raise DataError(f"{len(samples)} conversations pack into {len(self._order)} rows of {capacity} tokens, "
                            f"fewer than one batch ({batch_size * world_size}); lower the batch size")

    def _permutation(self, epoch: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.samples), generator=g).tolist()
        rows = pack_rows(self._lengths, order, self.capacity)
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def next_batch(self):  # entries of the order are rows (lists of sample indices)
        return collate_packed([[self.samples[i] for i in row] for row in self._next_share()], self.pad_id)


def collate_packed(rows: list[list[SFTSample]], pad_id: int):
    """(tokens, targets, segments); segment -1 marks padding."""
    import torch

    width = max(sum(len(s.ids) - 1 for s in row) for row in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for k, s in enumerate(row):
            n = len(s.ids) - 1
            x[r, pos:pos + n] = torch.tensor(s.ids[:-1])
            y[r, pos:pos + n] = torch.tensor(s.labels[1:])
            seg[r, pos:pos + n] = k
            pos += n
    return x, y, seg


# --- reading, splitting and tokenizing files; prepared datasets on disk ---------------------------

def is_validation_conversation(msgs: list[Message], fraction: float) -> bool:
    """A stable hash of the text decides, so the split survives reordering and re-runs."""
    import zlib

    key = "\x00".join(m.content for m in msgs).encode("utf-8")
    return (zlib.crc32(key) % 1_000_000) < fraction * 1_000_000


def build_sft_samples(files: list[str], template, max_len: int, layout: str = "auto",
                      val_fraction: float = 0.02, on_error: str = "skip", verbose: bool = True):
    """Read, split and tokenize SFT files: (train samples, val samples, report).
    An empty result is an error, never an empty model."""
    from babyllama.data.readers import split_input_spec

    read, cut = ReadStats(), SFTStats()
    train_convs, val_convs = [], []
    for spec in files:
        path, fmt = split_input_spec(spec, layout)
        for msgs in read_conversations(path, fmt, read, on_error):
            (val_convs if is_validation_conversation(msgs, val_fraction) else train_convs).append(msgs)
    train = tokenize_conversations(train_convs, template, max_len, cut)
    val = tokenize_conversations(val_convs, template, max_len, cut)
    report = {"conversations": read.documents, "skipped": read.skipped, "skipped_where": read.skipped_where,
              "train": len(train), "val": len(val), "truncated_prompt": cut.truncated_prompt,
              "truncated_reply": cut.truncated_reply, "max_len": max_len}
    if verbose and read.skipped:
        print(f"skipped {read.skipped} malformed records; first: {'; '.join(read.skipped_where[:3])}")
    if not train:
        raise DataError(f"no usable conversations in {', '.join(files)}"
                        + (f" ({read.skipped} malformed; first: {read.skipped_where[0]})" if read.skipped else ""))
    return train, val, report


SFT_FORMAT = "babyllama-sft-v1"
SFT_MANIFEST = "manifest.json"


@dataclass
class PrepareSFTConfig:
    inputs: list[str]  # FILE or FILE::FORMAT
    tokenizer: str
    out: str
    layout: str = "auto"
    max_len: int = 1024  # tokens per conversation incl. the shifted target; match the model's max_seq_len + 1
    val_fraction: float = 0.02
    on_error: str = "skip"


def prepare_sft(cfg: PrepareSFTConfig) -> dict:
    """Tokenize SFT files once into `cfg.out` (ids, labels and offsets per split, in safetensors),
    so repeated fine-tuning runs skip reading and tokenizing. Returns the manifest."""
    import os
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from babyllama.tokenizer import load_tokenizer
    from babyllama.tokenizer.chat import ChatTemplate

    tok = load_tokenizer(cfg.tokenizer)
    train, val, report = build_sft_samples(cfg.inputs, ChatTemplate(tok), cfg.max_len, cfg.layout,
                                           cfg.val_fraction, cfg.on_error)
    out = Path(cfg.out)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok.save(work / "tokenizer")
    for name, samples in (("train", train), ("val", val)):
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s.ids) for s in samples])
        ids = np.fromiter((t for s in samples for t in s.ids), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for s in samples for t in s.labels), dtype=np.int32, count=int(offsets[-1]))
        save_file({"ids": ids, "labels": labels, "offsets": offsets}, str(work / f"{name}.safetensors"))
    manifest = {"format": SFT_FORMAT, "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
                "sources": list(cfg.inputs), **report,
                "train_tokens": sum(len(s.ids) for s in train), "val_tokens": sum(len(s.ids) for s in val)}
    (work / SFT_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)  # complete or absent, never half written
    return manifest


def is_prepared_sft(path: str | Path) -> bool:
    return (Path(path) / SFT_MANIFEST).is_file()


def load_prepared_sft(directory: str | Path, fingerprint: str | None = None):
    """(train samples, val samples, manifest) from a `prepare_sft` directory."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    manifest = json.loads((directory / SFT_MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != SFT_FORMAT:
        raise DataError(f"{directory / SFT_MANIFEST}: not a prepared SFT dataset "
                        f"(format {manifest.get('format')!r}, expected {SFT_FORMAT})")
    if fingerprint and manifest["tokenizer"]["fingerprint"] != fingerprint:
        raise DataError(f"{directory} was tokenized with another tokenizer "
                        f"({manifest['tokenizer']['fingerprint']}) than the model's ({fingerprint}); "
                        f"prepare it again with the model's tokenizer")
    splits = []
    for name in ("train", "val"):
        arrays = load_file(str(directory / f"{name}.safetensors"))
        ids, labels, offsets = arrays["ids"].tolist(), arrays["labels"].tolist(), arrays["offsets"].tolist()
        splits.append([SFTSample(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    return splits[0], splits[1], manifest
