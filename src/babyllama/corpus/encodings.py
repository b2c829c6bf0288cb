"""Which encoding a file is in: checked on a sample before reading, named when it is not the one given.

Text is UTF-8, with or without a byte-order mark, unless `encoding` names another ASCII-compatible
codec (gb18030, gbk, big5, ...; JSON arrays may also be UTF-16/32). A file plainly in another
encoding is an error that names it (never skipped: it is a property of the whole file), while a
line that does not decode in an otherwise good file is a bad record like a malformed one.
Detection is by hand, for the encodings Chinese corpora come in: byte-order marks and NUL patterns
for UTF-16/32, then strict decoding as GB18030 and Big5 judged by the share of common characters.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from babyllama.corpus.errors import DataError


# --- encodings ------------------------------------------------------------------------------------

SAMPLE_BYTES = 1 << 16
# Characters that make up a large share of any Chinese text (simplified and traditional forms) and
# the common full-width punctuation. Text decoded with the right codec is full of them; decoded with a
# wrong one it is not, even when every byte decodes (Big5 bytes are nearly all valid GBK, and back).
_COMMON_CJK = frozenset(
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
    "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    "知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最"
    "间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市"
    "眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计"
    "或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让"
    "认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办"
    "运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党"
    "這個們為來說國會時對學後麼經頭兩長現樣實點種聲話進動與開見過發無當還從問給幾間業電體東軍產門處聽氣關"
    "內條華報張難數應愛讓認論義結聯區輕傳變遠語錢黨將專書達運親於"
    "，。、；：？！“”「」『』（）《》…—")
# what a file that is not in the expected encoding is tried in, in this order
_CANDIDATES = {"utf-8": "UTF-8", "gb18030": "GB18030 (GBK)", "big5": "Big5"}
_COMPRESSED = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: FF FE 00 00
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def encoding_label(codec: str) -> str:
    """How messages name an encoding: 'UTF-8', 'GB18030 (GBK)', 'UTF-16LE', 'big5hkscs'."""
    return _CANDIDATES.get(codec) or (codec.upper() if codec.startswith("utf") else codec)


def _ascii_compatible(codec: str) -> bool:
    """Whether ASCII (newlines, JSON punctuation) is the same bytes in `codec`: only then can a file be
    cut into lines at b"\\n" without decoding it first."""
    probe = '\n\r{}[]",:az09'
    try:
        return probe.encode(codec) == probe.encode("ascii")
    except UnicodeError:
        return False


def codec_name(encoding: str | None, line_based: bool = False, path: str | Path | None = None) -> str:
    """Python's name for `encoding` ('utf-8' for utf-8-sig too). A DataError (naming `path` if given)
    for a name Python does not know and, when `line_based`, for encodings in which a newline is not
    the byte \\n (UTF-16/32): line-based files are cut into chunks at b"\\n" before anything is decoded."""
    encoding = encoding or "utf-8"
    where = f"{path}: " if path is not None else ""
    try:
        codec = codecs.lookup(encoding).name
        "\n".encode(codec)  # a LookupError for codecs that are no text encodings (base64, rot13)
    except LookupError:
        raise DataError(f"{where}unknown encoding '{encoding}' (e.g. utf-8, gb18030, gbk, big5)") from None
    if codec == "utf-8-sig":
        codec = "utf-8"
    if line_based and not _ascii_compatible(codec):
        raise DataError(f"{where}encoding '{encoding}' cannot be read line by line (a newline is not one byte "
                        f"in it); convert the file to UTF-8: iconv -f {encoding} -t utf-8")
    return codec


def _common_share(lines: list[bytes], codec: str) -> float | None:
    """The share of common Chinese characters among the non-ASCII characters of `lines` decoded with
    `codec`, or None when fewer than half of the lines decode."""
    texts = []
    for line in lines:
        try:
            texts.append(line.decode(codec))
        except UnicodeDecodeError:
            pass
    if not lines or len(texts) * 2 < len(lines):
        return None
    wide = [c for text in texts for c in text if ord(c) > 127]
    return sum(c in _COMMON_CJK for c in wide) / len(wide) if wide else 0.0


def _guess(lines: list[bytes], exclude: str) -> tuple[float, str] | None:
    """(score, codec) of the candidate encoding in which `lines` read most like Chinese, if any does."""
    best = None
    for codec in _CANDIDATES:
        score = _common_share(lines, codec) if codec != exclude else None
        if score is not None and score >= 0.25 and (best is None or score > best[0]):
            best = (score, codec)
    return best


def _how_to_read(codec: str, line_based: bool) -> str:
    convert = f"convert it: iconv -f {codec} -t utf-8"
    if codec.startswith("utf-") and line_based:
        return convert
    return f"pass --encoding {codec}, or {convert}"


def _signature(sample: bytes) -> str | None:
    """UTF-16/32 from a byte-order mark, or from the NUL bytes that ASCII has in them."""
    for bom, codec in _BOMS:
        if sample.startswith(bom):
            return codec
    if sample.count(0) * 4 < len(sample):
        return None
    n = len(sample) - len(sample) % 4
    zeros = [sample[k:n:4].count(0) / max(n // 4, 1) for k in range(4)]
    if zeros[2] > 0.9 and zeros[3] > 0.9:
        return "utf-32le"
    if zeros[0] > 0.9 and zeros[1] > 0.9:
        return "utf-32be"
    return "utf-16le" if zeros[1] + zeros[3] > zeros[0] + zeros[2] else "utf-16be"


def _complete_lines(sample: bytes, whole: bool) -> list[bytes]:
    """The sample's lines, without the last one if the sample's end may have cut it (mid-character)."""
    if not whole:
        cut = sample.rfind(b"\n")
        sample = sample[:cut] if cut >= 0 else sample.rstrip(bytes(range(0x80, 0x100)))
    return sample.split(b"\n")


def check_encoding(path: str | Path, encoding: str | None = "utf-8", line_based: bool = True) -> str:
    """The codec to read `path` with: `encoding`, checked against the first SAMPLE_BYTES of the file.
    A file that is plainly in another encoding (or compressed) is a DataError naming it; a few lines
    that do not decode are left to the readers, which report or skip them one by one."""
    codec = codec_name(encoding, line_based, path)
    with open(path, "rb") as f:
        sample = f.read(SAMPLE_BYTES)
        whole = not f.read(1)
    for magic, kind in _COMPRESSED.items():
        if sample.startswith(magic):
            raise DataError(f"{path}: is {kind}-compressed; decompress it first")
    found = _signature(sample)
    if found and not codec.startswith(found[:6]):
        raise _looks_like(path, f"not {encoding_label(codec)}", found, line_based)
    if _ascii_compatible(codec):
        _check_lines(path, encoding, codec, _complete_lines(sample, whole), line_based)
    elif not found:  # UTF-16/32 asked for (JSON arrays), but neither a byte-order mark nor their NULs
        raise DataError(f"{path}: does not look like {encoding_label(codec)} (no byte-order mark); "
                        f"leave out --encoding {encoding}")
    return codec


def _check_lines(path: str | Path, encoding: str | None, codec: str, lines: list[bytes], line_based: bool) -> None:
    wide = [line for line in lines if not line.isascii()]  # ASCII lines read the same in every candidate
    if codec != "utf-8" and _decodes_mostly(wide, "utf-8"):
        raise DataError(f"{path}: is UTF-8, not {encoding}; leave out --encoding {encoding}")
    bad = [line for line in wide if not _decodes(line, codec)]
    if len(bad) * 2 > len(wide):  # most of the text does not decode: the file's encoding, not a few bad lines
        guess = _guess(bad, exclude=codec)
        if guess:
            raise _looks_like(path, f"not {encoding_label(codec)}", guess[1], line_based)
        if len(bad) * 20 > sum(1 for line in lines if line.strip()):  # (else: a few stray bytes)
            raise DataError(f"{path}: not {encoding_label(codec)}, and not recognisably GB18030 or Big5 either; "
                            f"pass --encoding NAME (the encoding it was written in), or convert it to UTF-8")
    elif codec != "utf-8":  # every byte may decode and still be the wrong encoding (GBK read as Big5)
        own, guess = _common_share(wide, codec) or 0.0, _guess(wide, exclude=codec)
        if guess and guess[0] > 2 * own + 0.1:
            raise _looks_like(path, f"does not read as {codec} (few common characters)", guess[1], line_based)


def _looks_like(path: str | Path, what: str, codec: str, line_based: bool) -> DataError:
    return DataError(f"{path}: {what}; it looks like {encoding_label(codec)}; {_how_to_read(codec, line_based)}")


def _decodes(data: bytes, codec: str) -> bool:
    try:
        data.decode(codec)
        return True
    except UnicodeDecodeError:
        return False


def _decodes_mostly(lines: list[bytes], codec: str) -> bool:
    return sum(_decodes(line, codec) for line in lines) * 2 > len(lines)


def not_decodable(raw: bytes, codec: str) -> str:
    """Why one line is a bad record: it does not decode (and what it might be in instead)."""
    guess = _guess([raw], exclude=codec)
    hint = f" (it reads as {encoding_label(guess[1])}: is part of the file in another encoding?)" if guess else ""
    return f"not valid {encoding_label(codec)}{hint}"


class Utf8Source:
    """A binary file of `codec` text, handed on as ijson wants it: UTF-8 bytes without a byte-order mark.
    UTF-8 is only checked (decoded and dropped), so its bytes pass through unchanged. After a
    UnicodeDecodeError, `error_offset` is where in the file the bytes that did not decode are."""

    def __init__(self, f, codec: str):
        self._f, self._codec = f, codec
        self._decoder = codecs.getincrementaldecoder(codec)()
        self._started = False
        self.error_offset = 0

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        while True:
            pending = len(self._decoder.getstate()[0])  # bytes of a character cut by the last block
            data = self._f.read(n)
            try:
                text = self._decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                self.error_offset = self._f.tell() - len(data) - pending + e.start
                raise
            out = data if self._codec == "utf-8" else text.encode("utf-8")
            if not self._started and out:
                self._started = True
                out = out.removeprefix(codecs.BOM_UTF8)
            if out or not data:
                return out

    def tell(self) -> int:
        return self._f.tell()


def undecodable_at(path: str | Path, codec: str, offset: int) -> str:
    """'line N: not valid ...' for bytes at `offset` that did not decode in a stream (a JSON array),
    found by counting newlines: this runs once, on the way to an error."""
    line, line_start, done = 1, 0, 0
    with open(path, "rb") as f:
        while done < offset and (block := f.read(min(1 << 20, offset - done))):
            line += block.count(b"\n")
            if (cut := block.rfind(b"\n")) >= 0:
                line_start = done + cut + 1
            done += len(block)
        f.seek(line_start)
        raw = f.readline(1 << 16)  # enough for the hint at what it might be in; a JSON array may be one line
    return f"line {line}: {not_decodable(raw, codec)}"
