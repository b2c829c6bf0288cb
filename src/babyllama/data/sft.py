"""Supervised fine-tuning records: the layouts users bring, turned into conversations.

    alpaca    {"instruction", "input", "output", "history": [[q, a], ...], "system"}
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
    openai    {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
    qa        {"question", "response"} (and the answer / query variants medical sets use)
    csv       a CSV file (.csv; .tsv tab-separated) with a header: prompt,answer columns (the original
              project's format) or a usual pair (question/answer, instruction[/input]/output,
              query/response, input/output, ...); csv:PROMPT_COL,ANSWER_COL names the two columns

`auto` picks the layout from the first record's keys (CSV: from the file name). JSON lines and JSON
arrays both work; text is UTF-8 (a byte-order mark is fine) unless an `encoding` is given.

Every conversation is checked before it is trained on: an optional leading system prompt, then user
and assistant turns in turn, starting with the user, every turn non-empty text. Records that break a
rule are skipped and counted with file, line and reason (or raise, with on_error='raise'); where the
repair is unambiguous the record is fixed and counted instead (a trailing user turn with no reply is
dropped, as is an empty system prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from babyllama.corpus.encodings import Utf8Source, check_encoding, codec_name, not_decodable, undecodable_at
from babyllama.corpus.readers import CsvFile, DataError, ReadStats, check_readable, container_of
from babyllama.config import IGNORE_INDEX
from babyllama.data.batches import ShuffledBatches
from babyllama.tokenizer.chat import Message

SFT_LAYOUTS = ("auto", "alpaca", "sharegpt", "openai", "qa", "csv")  # and csv:PROMPT_COL,ANSWER_COL
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bot": "assistant", "system": "system"}
_QA_KEYS = (("question", "response"), ("question", "answer"), ("query", "response"), ("prompt", "response"),
            ("prompt", "answer"), ("input", "output"))
# (prompt, answer) column names of CSV files, most specific first; matched ignoring case
_CSV_COLUMNS = (("prompt", "answer"), ("prompt", "response"), ("prompt", "completion"), ("question", "answer"),
                ("question", "response"), ("instruction", "output"), ("instruction", "response"),
                ("query", "response"), ("query", "answer"), ("input", "output"), ("input", "target"),
                ("source", "target"), ("user", "assistant"), ("问题", "回答"), ("问题", "答案"), ("问", "答"))


class BadRecord(ValueError):
    """A record that breaks a rule. `reason` is the short, fixed text the report counts it under;
    the message adds where in the record (turn numbers)."""

    def __init__(self, why: str, reason: str = ""):
        super().__init__(why)
        self.reason = reason or why.split(" (")[0]


def check_format(layout: str, path: str | Path | None = None) -> None:
    if layout not in SFT_LAYOUTS and not (layout.startswith("csv:") and len(layout) > 4):
        where = f"{path}: " if path is not None else ""
        raise DataError(f"{where}unknown SFT format '{layout}' (choose from {', '.join(SFT_LAYOUTS)}, "
                        f"csv:PROMPT_COL,ANSWER_COL)")


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
    raise DataError(f"cannot tell the SFT layout from keys {sorted(record)}; pass --layout "
                    f"({', '.join(SFT_LAYOUTS[1:])})")


def to_messages(record: dict, layout: str) -> list[Message]:
    """One record -> a conversation. Raises KeyError/TypeError/ValueError on a malformed record."""
    if layout == "alpaca":
        msgs = [Message("system", record["system"])] if record.get("system") else []
        for turn in record.get("history") or []:
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise BadRecord("a history turn is not a [question, answer] pair")
            msgs += [Message("user", turn[0]), Message("assistant", turn[1])]
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        return msgs + [Message("user", prompt), Message("assistant", record["output"])]
    if layout == "sharegpt":
        msgs = [Message("system", record["system"])] if record.get("system") else []
        for turn in record["conversations"]:
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise BadRecord(f"unknown speaker {turn['from']!r}", "unknown speaker")
            msgs.append(Message(role, turn["value"]))
        return msgs
    if layout == "openai":
        return [Message(m["role"], m["content"]) for m in record["messages"]]
    if layout == "qa":
        for q, a in _QA_KEYS:
            if q in record and a in record:
                return [Message("user", record[q]), Message("assistant", record[a])]
        raise KeyError("question/response")
    if layout == "csv":
        return [Message("user", record["prompt"]), Message("assistant", record["answer"])]
    raise DataError(f"unknown SFT layout '{layout}' (choose from {', '.join(SFT_LAYOUTS)})")


def check_conversation(msgs: list[Message]) -> tuple[list[Message], str]:
    """The conversation as it will be trained on, and what was fixed in it ("" if nothing). Raises
    BadRecord when a rule is broken: content that is not text, a system turn that is not the first,
    no reply at all, turns that do not alternate user/assistant starting with the user, an empty
    turn (whitespace only counts as empty: an empty reply would teach the model to say nothing)."""
    for k, m in enumerate(msgs, 1):
        if not isinstance(m.content, str):
            raise BadRecord(f"{m.role} content is {type(m.content).__name__}, not text (turn {k})",
                            "content is not text")
    has_system = bool(msgs) and msgs[0].role == "system"
    system, turns = msgs[:has_system], msgs[has_system:]
    first = 1 + has_system  # the turn number of turns[0], for messages
    for k, m in enumerate(turns, first):
        if m.role == "system":
            raise BadRecord(f"a system turn after the first turn (turn {k})", "system turn not first")
    fixes = []
    if system and not system[0].content.strip():
        system = []
        fixes.append("empty system prompt dropped")
    if turns and turns[-1].role == "user" and any(m.role == "assistant" for m in turns):
        while turns[-1].role == "user":  # nothing to learn from a question without an answer
            turns = turns[:-1]
        fixes.append("trailing user turn without a reply dropped")
    if not any(m.role == "assistant" for m in turns):
        raise BadRecord("no assistant reply to learn from")
    _check_turns(turns, first)
    return system + turns, "; ".join(fixes)


def _check_turns(turns: list[Message], first: int) -> None:
    expected = "user"
    for k, m in enumerate(turns, first):
        if m.role != expected:
            if k == first:
                raise BadRecord(f"the conversation starts with the {m.role} (turn {k})",
                                f"starts with the {m.role}")
            raise BadRecord(f"two {m.role} turns in a row (turns {k - 1} and {k})", f"two {m.role} turns in a row")
        if not m.content.strip():
            what = "assistant reply" if m.role == "assistant" else "user turn"
            raise BadRecord(f"{what} is empty (turn {k})")
        expected = "assistant" if expected == "user" else "user"


# --- reading records ------------------------------------------------------------------------------

@dataclass
class _Unreadable:
    """Stands for a record that could not be read at all (bad JSON, bytes that do not decode)."""

    why: str


def _records(path: Path, layout: str = "auto", encoding: str = "utf-8") -> Iterator[tuple[int, Any, str]]:
    """(line or record number, record, unit) from JSON lines, a JSON array or CSV. A record that cannot
    be read is an _Unreadable, so that the caller's on_error policy decides."""
    is_csv = layout == "csv" or layout.startswith("csv:")
    container = "csv" if is_csv else container_of(path, codec_name(encoding, path=path))
    if container == "parquet":
        raise DataError(f"{path}: Parquet is not read for SFT; convert it to JSON lines")
    codec = check_encoding(path, encoding, line_based=container != "json")
    if container == "csv":
        yield from _csv_records(path, layout, codec)
    elif container == "json":
        yield from _json_array_records(path, codec)
    else:
        yield from _json_line_records(path, codec)


def _json_line_records(path: Path, codec: str) -> Iterator[tuple[int, Any, str]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode(codec).lstrip("\ufeff")
            except UnicodeDecodeError:
                yield i, _Unreadable(not_decodable(raw, codec)), "line"
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec = _Unreadable(f"malformed JSON ({e.msg} at column {e.colno})")
            yield i, rec, "line"


def _json_array_records(path: Path, codec: str) -> Iterator[tuple[int, Any, str]]:
    import ijson

    with open(path, "rb") as raw:
        f, n = Utf8Source(raw, codec), 0
        try:
            for n, rec in enumerate(ijson.items(f, "item", use_float=True), start=1):
                yield n, rec, "record"
        except ijson.JSONError as e:
            raise DataError(f"{path}: record {n + 1}: malformed JSON array ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError:  # no next record to go on with in a stream that does not decode
            raise DataError(f"{path}: {undecodable_at(path, codec, f.error_offset)}") from None


def _csv_records(path: Path, layout: str, codec: str) -> Iterator[tuple[int, Any, str]]:
    """{"prompt", "answer"} per row; an alpaca-like CSV's input column is appended to the instruction."""
    with CsvFile(path, codec) as table:
        prompt, answer, extra = _csv_columns(path, layout, table.header)
        for line, row, problem in table.rows():
            if problem:
                yield line, _Unreadable(problem), "line"
                continue
            text = row[prompt]
            if extra and row[extra].strip():
                text = f"{text}\n{row[extra]}"
            yield line, {"prompt": text, "answer": row[answer]}, "line"


def _csv_columns(path: Path, layout: str, header: list[str]) -> tuple[str, str, str | None]:
    """(prompt column, answer column, column appended to the prompt or None)."""
    if layout.startswith("csv:"):
        names = [name.strip() for name in layout.split(":", 1)[1].split(",")]
        if len(names) != 2:
            raise DataError(f"{path}: format '{layout}' must name two columns: csv:PROMPT_COL,ANSWER_COL")
        for name in names:
            if name not in header:
                raise DataError(f"{path}: no column '{name}' (columns: {', '.join(header)})")
        return names[0], names[1], None
    by_lower = {name.lower(): name for name in header}
    for q, a in _CSV_COLUMNS:
        if q in by_lower and a in by_lower:
            extra = by_lower.get("input") if q == "instruction" else None
            return by_lower[q], by_lower[a], extra
    raise DataError(f"{path}: no prompt and answer columns among: {', '.join(header)}; name them: "
                    f"{path}::csv:PROMPT_COL,ANSWER_COL or --layout csv:PROMPT_COL,ANSWER_COL")


def read_conversations(path: str | Path, layout: str = "auto", stats: ReadStats | None = None,
                       on_error: str = "skip", encoding: str = "utf-8") -> Iterator[list[Message]]:
    """Conversations of one file. Records that cannot be read or break a rule of check_conversation are
    counted in `stats` with file, line and reason (on_error='skip', the default for SFT data, which is
    often messy) or stop the run ('raise'). Fixed records are counted in stats.fixed and kept."""
    path = Path(path)
    check_readable(path)
    check_format(layout, path)
    stats = stats if stats is not None else ReadStats()
    if layout == "auto" and container_of(path) == "csv":
        layout = "csv"
    fmt = "csv" if layout.startswith("csv") else layout

    def convert(rec: Any):
        nonlocal fmt
        fmt = detect_layout(rec) if fmt == "auto" else fmt
        return check_conversation(to_messages(rec, fmt))

    for loc, (msgs, fixed) in checked_records(path, layout, stats, on_error, encoding, convert):
        if fixed:
            stats.fix(loc, fixed)
        yield msgs


def checked_records(path: Path, layout: str, stats: ReadStats, on_error: str, encoding: str,
                    convert) -> Iterator[tuple[str, Any]]:
    """(where, convert(record)) for each record of a file that converts. A record that cannot be read,
    or that `convert` rejects with KeyError/TypeError/ValueError, is counted in `stats` with file,
    line and reason (on_error='skip') or stops the run with a DataError naming them ('raise'); a
    DataError from `convert` (the file as a whole is wrong) always stops it, with the place."""
    for where, rec, unit in _records(path, layout, encoding):
        loc = f"{path}: {unit} {where}"
        try:
            if isinstance(rec, _Unreadable):
                raise BadRecord(rec.why)
            value = convert(rec)
        except DataError as e:
            raise DataError(f"{loc}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            why, reason = _why(e)
            if on_error == "raise":
                raise DataError(f"{loc}: {why}") from None
            stats.skip(loc, why, reason)
            continue
        stats.documents += 1
        yield loc, value


def _why(e: Exception) -> tuple[str, str]:
    """(message, reason counted in the report) for an error raised while reading one record."""
    if isinstance(e, KeyError):
        return f"missing field {e}", "missing field"
    if isinstance(e, BadRecord):
        return str(e), e.reason
    if isinstance(e, TypeError):
        return f"a field has the wrong type ({e})", "a field has the wrong type"
    return str(e), ""


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
    while labels[last] == IGNORE_INDEX:
        last -= 1
    reply_start = last
    while reply_start > 0 and labels[reply_start - 1] != IGNORE_INDEX:
        reply_start -= 1
    cut = len(ids) - max_len
    if cut <= reply_start - header:
        stats.truncated_prompt += 1
        ids, labels = ids[cut:], labels[cut:]
        first_ignored = labels.index(IGNORE_INDEX)
        labels = [IGNORE_INDEX] * first_ignored + labels[first_ignored:]  # no loss on a reply cut in half
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


class SFTBatches(ShuffledBatches):
    """Shuffled, resumable micro-batches of conversations, padded to the longest in the batch.
    Inputs are ids[:-1], targets labels[1:]; padding is never trained on. Rank-aware like
    PretrainBatches (rank r takes every world_size-th sample of each global batch)."""

    def __init__(self, samples: list[SFTSample], batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(samples) < batch_size * world_size:
            raise DataError(f"{len(samples)} conversations are fewer than one batch ({batch_size * world_size})")
        self.samples, self.pad_id, self.num_items = samples, pad_id, len(samples)
        super().__init__(batch_size, seed, rank, world_size)

    def arrange(self, order, generator) -> list[int]:
        """A shuffled order in which neighbours have similar lengths: windows of 64 batches are
        sorted by length and their batches shuffled again, so little compute goes to padding."""
        import torch

        order = order.tolist()
        global_batch = self.global_batch
        window = 64 * global_batch
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: len(self.samples[i].ids))
            batches += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [i for b in shuffled for i in batches[b]]

    def make_batch(self, indices: list[int]):
        return collate([self.samples[i] for i in indices], self.pad_id)


def collate(samples: list[SFTSample], pad_id: int):
    import torch

    width = max(len(s.ids) for s in samples) - 1
    x = torch.full((len(samples), width), pad_id, dtype=torch.long)
    y = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
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

    def arrange(self, order, generator) -> list[list[int]]:  # entries of the order are rows of samples
        import torch

        rows = pack_rows(self._lengths, order.tolist(), self.capacity)
        return [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]

    def make_batch(self, rows: list[list[int]]):
        return collate_packed([[self.samples[i] for i in row] for row in rows], self.pad_id)


def collate_packed(rows: list[list[SFTSample]], pad_id: int):
    """(tokens, targets, segments); segment -1 marks padding."""
    import torch

    width = max(sum(len(s.ids) - 1 for s in row) for row in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
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
    """The pretraining rule (a stable hash of the text) on the turns joined by NUL, so the split
    survives reordering and re-runs and duplicate conversations land on the same side."""
    from babyllama.data.pretrain import is_validation

    return is_validation("\x00".join(m.content for m in msgs), fraction)


def build_sft_samples(files: list[str], template, max_len: int, layout: str = "auto",
                      val_fraction: float = 0.02, on_error: str = "skip", verbose: bool = True,
                      encoding: str = "utf-8"):
    """Read, split and tokenize SFT files: (train samples, val samples, report).
    An empty result is an error, never an empty model."""
    from babyllama.corpus.readers import split_input_spec

    read, cut = ReadStats(), SFTStats()
    train_convs, val_convs = [], []
    for spec in files:
        path, fmt = split_input_spec(spec, layout)
        for msgs in read_conversations(path, fmt, read, on_error, encoding):
            (val_convs if is_validation_conversation(msgs, val_fraction) else train_convs).append(msgs)
    train = tokenize_conversations(train_convs, template, max_len, cut)
    val = tokenize_conversations(val_convs, template, max_len, cut)
    report = {"conversations": read.documents, "skipped": read.skipped, "skipped_where": read.skipped_where,
              "skipped_reasons": read.skipped_reasons, "fixed": read.fixed, "fixed_where": read.fixed_where,
              "train": len(train), "val": len(val), "truncated_prompt": cut.truncated_prompt,
              "truncated_reply": cut.truncated_reply, "max_len": max_len}
    if verbose and (read.skipped or read.fixed):
        print(read_summary(read))
    if not train:
        raise DataError(f"no usable conversations in {', '.join(files)}"
                        + (f" ({read.skipped} skipped; first: {read.skipped_where[0]})" if read.skipped else ""))
    return train, val, report


def read_summary(read: ReadStats) -> str:
    """'skipped 3 records (assistant reply is empty: 2, ...); first: ...; fixed 1 ...' for the console."""
    parts = []
    if read.skipped:
        reasons = ", ".join(f"{why}: {n}" for why, n in sorted(read.skipped_reasons.items(), key=lambda kv: -kv[1]))
        parts.append(f"skipped {read.skipped} records ({reasons}); first: {'; '.join(read.skipped_where[:3])}")
    if read.fixed:
        parts.append(f"fixed {read.fixed} records and kept them; first: {'; '.join(read.fixed_where[:3])}")
    return "\n".join(parts)


SFT_FORMAT = "babyllama-sft-v1"
SFT_MANIFEST = "manifest.json"


@dataclass
class PrepareSFTConfig:
    inputs: list[str]  # FILE or FILE::FORMAT
    tokenizer: str
    out: str
    layout: str = "auto"
    # tokens per conversation incl. the shifted target, so the model's max_seq_len + 1: a model of
    # max_seq_len 1024 reads ids[:-1] and learns labels[1:] (the CLI's --max-len default too)
    max_len: int = 1025
    val_fraction: float = 0.02
    on_error: str = "skip"
    overwrite: bool = False  # replace an existing SFT dataset in `out` (never anything else)
    encoding: str = "utf-8"  # of the input files (UTF-8 may have a byte-order mark); e.g. gb18030

    def __post_init__(self) -> None:  # checked before any work, flag names in the messages
        from babyllama.config import ConfigError, check_float, check_int

        check_int("--max-len", self.max_len, 3, note=" (a conversation needs a prompt token and a reply)")
        check_float("--val-fraction", self.val_fraction, 0, 1, high_open=True)
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"--on-error must be raise or skip, got {self.on_error!r}")


def prepare_sft(cfg: PrepareSFTConfig) -> dict:
    """Tokenize SFT files once into `cfg.out` (ids, labels and offsets per split, in safetensors),
    so repeated fine-tuning runs skip reading and tokenizing. Returns the manifest."""
    import shutil

    from babyllama.corpus.readers import split_input_spec
    from babyllama.outputs import SFT_DATA, claim_output, staged_output, swap_in
    from babyllama.tokenizer import load_tokenizer
    from babyllama.tokenizer.chat import ChatTemplate

    out = Path(cfg.out)
    claim_output(out, SFT_DATA, [split_input_spec(spec, cfg.layout)[0] for spec in cfg.inputs] + [cfg.tokenizer],
                 cfg.overwrite)
    tok = load_tokenizer(cfg.tokenizer)
    work, lock = staged_output(out, "SFT dataset")
    try:
        claim_output(out, SFT_DATA, (), cfg.overwrite)  # again under the lock
        train, val, report = build_sft_samples(cfg.inputs, ChatTemplate(tok), cfg.max_len, cfg.layout,
                                               cfg.val_fraction, cfg.on_error, encoding=cfg.encoding)
        _write_sft_dataset(work, tok, train, val)
        manifest = {"format": SFT_FORMAT, "fingerprint": samples_fingerprint(train, val),
                    "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
                    "sources": list(cfg.inputs), **report,
                    "train_tokens": sum(len(s.ids) for s in train), "val_tokens": sum(len(s.ids) for s in val)}
        (work / SFT_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        swap_in(work, out)  # complete or absent, never half written
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        lock.release()
    return manifest


def samples_fingerprint(train: list[SFTSample], val: list[SFTSample]) -> str:
    """Identifies tokenized SFT data (ids, labels, order): a run resumes only on the same samples."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for split in (train, val):
        for field_name in ("ids", "labels"):
            lengths = np.fromiter((len(getattr(s, field_name)) for s in split), dtype=np.int64, count=len(split))
            flat = np.fromiter((t for s in split for t in getattr(s, field_name)), dtype=np.int32,
                               count=int(lengths.sum()))
            h.update(lengths.tobytes())
            h.update(flat.tobytes())
    return h.hexdigest()[:16]


def _write_sft_dataset(work: Path, tok, train: list[SFTSample], val: list[SFTSample]) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tok.save(work / "tokenizer")
    for name, samples in (("train", train), ("val", val)):
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s.ids) for s in samples])
        ids = np.fromiter((t for s in samples for t in s.ids), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for s in samples for t in s.labels), dtype=np.int32, count=int(offsets[-1]))
        save_file({"ids": ids, "labels": labels, "offsets": offsets}, str(work / f"{name}.safetensors"))


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
