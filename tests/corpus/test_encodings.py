"""Encodings: UTF-8 with or without a byte-order mark by default; other encodings named by the user;
files in an encoding nobody named are refused with its name; single bad lines are bad records."""

import json

import pytest

from babyllama.corpus.encodings import SAMPLE_BYTES, check_encoding
from babyllama.corpus.readers import DataError, ReadStats, iter_documents, parse_chunk, read_chunks

SIMPLIFIED = ["今天天气很好，我们一起去公园散步吧。", "这本书的内容非常有意思，我已经看了两遍。", "他说明天会来北京参加会议。"]
TRADITIONAL = ["今天天氣很好，我們一起去公園散步吧。", "這本書的內容非常有意思，我已經看了兩遍。", "他說明天會來台北參加會議。"]
BOM = b"\xef\xbb\xbf"


def docs(path, layout="auto", **kw):
    return list(iter_documents(path, layout, **kw))


def jsonl(texts):
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


def json_array(texts):
    return json.dumps([{"text": t} for t in texts], ensure_ascii=False)


def csv_text(texts):
    return "id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts))


CONTAINERS = {"a.txt": lambda t: "\n".join(t) + "\n", "a.jsonl": jsonl, "a.json": json_array, "a.csv": csv_text}


# --- detection --------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_gb18030_file_is_refused_naming_its_encoding_even_when_skipping(tmp_path, on_error):
    p = tmp_path / "corpus.txt"
    p.write_bytes("\n".join(SIMPLIFIED).encode("gb18030"))
    with pytest.raises(DataError) as e:
        docs(p, on_error=on_error, stats=ReadStats())
    assert str(e.value) == (f"{p}: not UTF-8; it looks like GB18030 (GBK); pass --encoding gb18030, "
                            f"or convert it: iconv -f gb18030 -t utf-8")


def test_a_big5_file_is_named_as_big5(tmp_path):
    p = tmp_path / "tw.jsonl"
    p.write_bytes(jsonl(TRADITIONAL).encode("big5"))
    with pytest.raises(DataError, match=r"tw.jsonl: not UTF-8; it looks like Big5; pass --encoding big5"):
        docs(p)


@pytest.mark.parametrize("codec,name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_utf16_and_utf32_are_named_and_line_files_must_be_converted(tmp_path, codec, name):
    p = tmp_path / "wide.txt"
    p.write_bytes("\n".join(SIMPLIFIED).encode(codec))  # Python writes the byte-order mark
    with pytest.raises(DataError, match=rf"wide.txt: not UTF-8; it looks like {name}; "
                                        rf"convert it: iconv -f {codec} -t utf-8"):
        docs(p)
    with pytest.raises(DataError, match=rf"wide.txt: encoding '{codec}' cannot be read line by line.*iconv"):
        docs(p, encoding=codec)


def test_a_utf16_json_array_reads_when_named(tmp_path):
    p = tmp_path / "wide.json"
    p.write_bytes(json_array(SIMPLIFIED).encode("utf-16"))
    with pytest.raises(DataError, match=r"wide.json: not UTF-8; it looks like UTF-16; pass --encoding utf-16"):
        docs(p)
    assert docs(p, encoding="utf-16") == SIMPLIFIED
    u = tmp_path / "narrow.json"
    u.write_text(json_array(SIMPLIFIED), encoding="utf-8")
    with pytest.raises(DataError, match=r"narrow.json: does not look like UTF-16 \(no byte-order mark\)"):
        docs(u, encoding="utf-16")


def test_utf16_without_a_byte_order_mark_is_recognised(tmp_path):
    p = tmp_path / "le.txt"
    p.write_bytes("first line\nsecond line\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"le.txt: not UTF-8; it looks like UTF-16LE"):
        docs(p)


def test_unknown_and_unsuitable_encoding_names(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("一行\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a.txt: unknown encoding 'gbk2'"):
        docs(p, encoding="gbk2")
    with pytest.raises(DataError, match=r"a.txt: unknown encoding 'base64'"):
        docs(p, encoding="base64")


def test_a_utf8_file_read_as_another_encoding_is_refused(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("\n".join(SIMPLIFIED), encoding="utf-8")
    with pytest.raises(DataError, match=r"u.txt: is UTF-8, not gb18030; leave out --encoding gb18030"):
        docs(p, encoding="gb18030")


def test_a_file_read_in_the_wrong_chinese_encoding_is_refused(tmp_path):
    p = tmp_path / "g.txt"
    p.write_bytes("\n".join(SIMPLIFIED * 3).encode("gbk"))
    with pytest.raises(DataError, match=r"g.txt: not Big5; it looks like GB18030 \(GBK\); pass --encoding gb18030"):
        docs(p, encoding="big5")
    t = tmp_path / "t.txt"  # every byte of Big5 text decodes as GB18030: only the characters tell
    t.write_bytes("\n".join(TRADITIONAL * 3).encode("big5"))
    with pytest.raises(DataError, match=r"t.txt: does not read as gb18030.*it looks like Big5"):
        docs(t, encoding="gb18030")


def test_compressed_files_are_named(tmp_path):
    import gzip

    p = tmp_path / "c.jsonl"
    p.write_bytes(gzip.compress(jsonl(SIMPLIFIED).encode()))
    with pytest.raises(DataError, match=r"c.jsonl: is gzip-compressed; decompress it first"):
        docs(p)


def test_a_multibyte_character_cut_by_the_sample_end_is_not_an_error(tmp_path):

    for pad in range(3):  # the sample's end falls on each byte of a 3-byte character in turn
        p = tmp_path / f"cut{pad}.txt"
        p.write_bytes(b"x" * pad + "中".encode() * (SAMPLE_BYTES // 3 + 2))  # one line, no newline
        assert check_encoding(p) == "utf-8"
    g = tmp_path / "cut.json"
    g.write_bytes(json_array(["中文" * 20_000]).encode("gb18030"))  # one long line, cut mid-character
    assert check_encoding(g, "gb18030", line_based=False) == "gb18030"


# --- reading other encodings --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONTAINERS))
@pytest.mark.parametrize("codec,texts", [("gb18030", SIMPLIFIED), ("gbk", SIMPLIFIED), ("big5", TRADITIONAL)])
def test_every_container_reads_a_named_encoding(tmp_path, name, codec, texts):
    p = tmp_path / name
    p.write_bytes(CONTAINERS[name](texts).encode(codec))
    layout = "csv:text" if name.endswith(".csv") else "auto"
    assert docs(p, layout, encoding=codec) == texts


def test_workers_decode_byte_ranges_in_the_named_encoding(tmp_path):
    """Chunks are cut at b"\\n" whatever the encoding; every chunk size gives the same documents."""
    texts = [f"{t}第{i}行" for i in range(40) for t in SIMPLIFIED[:1]]
    p = tmp_path / "g.jsonl"
    p.write_bytes(jsonl(texts).encode("gb18030"))
    for size in (1, 7, 64, 1 << 20):
        chunks = list(read_chunks(p, "text", size, encoding="gb18030"))
        assert all(c.encoding == "gb18030" for c in chunks)
        assert [d for c in chunks for d in parse_chunk(c)] == texts


# --- byte-order marks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONTAINERS))
def test_a_utf8_byte_order_mark_works_in_every_container(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(BOM + CONTAINERS[name](SIMPLIFIED).encode())
    layout = "csv:text" if name.endswith(".csv") else "auto"
    assert docs(p, layout) == SIMPLIFIED
    if name.endswith(".csv"):  # the first header name is "id", not "\ufeffid"
        assert docs(p, "csv:id") == ["0", "1", "2"]


@pytest.mark.parametrize("layout", ["lines", "paragraphs"])
def test_a_byte_order_mark_is_dropped_when_the_file_is_read_in_several_chunks(tmp_path, layout):
    p = tmp_path / "bom.txt"
    p.write_bytes(BOM + "\n\n".join(SIMPLIFIED).encode())
    for size in (1, 5, 40, 1 << 20):
        chunks = list(read_chunks(p, layout, size))
        assert len(chunks) > 1 or size == 1 << 20
        assert [d for c in chunks for d in parse_chunk(c)] == SIMPLIFIED


def test_a_gb18030_byte_order_mark_is_dropped(tmp_path):
    p = tmp_path / "g.txt"
    p.write_bytes("\ufeff".encode("gb18030") + "\n".join(SIMPLIFIED).encode("gb18030"))
    assert docs(p, encoding="gb18030") == SIMPLIFIED


# --- single lines that do not decode --------------------------------------------------------------------

def _with_bad_byte(texts, bad_line):
    lines = jsonl(texts).encode().split(b"\n")
    lines[bad_line - 1] = lines[bad_line - 1].replace("书".encode(), b"\xff")
    return b"\n".join(lines)


def test_one_bad_byte_in_json_lines_is_a_bad_record(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(_with_bad_byte(SIMPLIFIED, 2))
    with pytest.raises(DataError) as e:
        docs(p)
    assert str(e.value) == f"{p}: line 2: not valid UTF-8"
    stats = ReadStats()
    assert docs(p, on_error="skip", stats=stats) == [SIMPLIFIED[0], SIMPLIFIED[2]]
    assert stats.skipped == 1 and stats.skipped_where == [f"{p}: line 2: not valid UTF-8"]
    assert stats.skipped_reasons == {"not valid UTF-8": 1}


def test_a_bad_line_after_the_sample_is_reported_with_its_line_in_any_chunk(tmp_path):
    texts = [f"{SIMPLIFIED[i % 3]}{i}" for i in range(3000)]  # ~200 KB: line 2500 is past the sample
    p = tmp_path / "late.txt"
    raw = "\n".join(texts).encode().split(b"\n")
    raw[2499] = raw[2499][:9] + b"\xff" + raw[2499][9:]
    p.write_bytes(b"\n".join(raw))
    for size in (4096, 1 << 20):
        with pytest.raises(DataError, match=r"late.txt: line 2500: not valid UTF-8"):
            [parse_chunk(c) for c in read_chunks(p, "lines", size)]
        stats = ReadStats()
        got = [d for c in read_chunks(p, "lines", size) for d in parse_chunk(c, "skip", stats)]
        assert got == texts[:2499] + texts[2500:] and stats.skipped == 1


def test_a_paragraph_with_a_bad_line_is_left_out_whole(tmp_path):
    p = tmp_path / "para.txt"
    p.write_bytes("第一段\n还是第一段\n\n第二段\n".encode().replace("还".encode(), b"\xff") + b"\n" +
                  "\n".join(SIMPLIFIED).encode())
    stats = ReadStats()
    assert docs(p, "paragraphs", on_error="skip", stats=stats) == ["第二段", "\n".join(SIMPLIFIED)]
    assert stats.skipped_where == [f"{p}: line 2: not valid UTF-8"]


def test_a_line_in_another_encoding_says_which(tmp_path):
    p = tmp_path / "mixed.txt"
    p.write_bytes("第一行是UTF-8\n".encode() + "\n".join(SIMPLIFIED).encode("gbk") + "\n最后一行\n".encode() * 3)
    with pytest.raises(DataError, match=r"mixed.txt: line 2: not valid UTF-8 \(it reads as GB18030 \(GBK\)"):
        docs(p)


def test_a_bad_row_of_a_csv_file_is_a_bad_record(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(csv_text(SIMPLIFIED).encode().replace("书".encode(), b"\xff"))
    with pytest.raises(DataError, match=r"bad.csv: line 3: not valid UTF-8"):
        docs(p, "csv:text")
    stats = ReadStats()
    assert docs(p, "csv:text", on_error="skip", stats=stats) == [SIMPLIFIED[0], SIMPLIFIED[2]]


# --- through pretraining and tokenizer training -------------------------------------------------------

def test_prepare_pretrain_reads_gb18030_with_workers_like_utf8(tmp_path, corpus_dir, tokenizer_dir):
    """The same corpus in UTF-8 (1 worker) and in GB18030 (2 workers, small chunks): identical shards."""
    from babyllama.data.pretrain import PrepareConfig, prepare_pretrain

    text = (corpus_dir / "news.txt").read_text(encoding="utf-8")
    gb = tmp_path / "news.gb.txt"
    gb.write_bytes(text.encode("gb18030"))
    outs = []
    for src, workers, encoding in ((corpus_dir / "news.txt", 1, "utf-8"), (gb, 2, "gb18030")):
        out = tmp_path / f"o{workers}"
        prepare_pretrain(PrepareConfig(inputs=[str(src)], tokenizer=str(tokenizer_dir), out=str(out),
                                       workers=workers, chunk_bytes=20_000, encoding=encoding, progress=False))
        outs.append(out)
    names = sorted(p.name for p in outs[0].glob("*.bin"))
    assert names and names == sorted(p.name for p in outs[1].glob("*.bin"))
    assert all((outs[0] / n).read_bytes() == (outs[1] / n).read_bytes() for n in names)
    with pytest.raises(DataError, match=r"news.gb.txt: not UTF-8; it looks like GB18030"):
        prepare_pretrain(PrepareConfig(inputs=[str(gb)], tokenizer=str(tokenizer_dir), out=str(tmp_path / "x"),
                                       on_error="skip", progress=False))


def test_tokenizer_training_reads_the_named_encoding(tmp_path):
    from babyllama.tokenizer.train import TokenizerTrainConfig, _sentences

    u, g = tmp_path / "u.txt", tmp_path / "g.txt"
    u.write_text("\n".join(SIMPLIFIED), encoding="utf-8")
    g.write_bytes("\n".join(SIMPLIFIED).encode("gb18030"))
    want = list(_sentences(TokenizerTrainConfig(inputs=[str(u)], out=str(tmp_path / "t"))))
    assert want == SIMPLIFIED
    assert list(_sentences(TokenizerTrainConfig(inputs=[str(g)], out=str(tmp_path / "t"), encoding="gb18030"))) == want
    with pytest.raises(DataError, match="it looks like GB18030"):
        list(_sentences(TokenizerTrainConfig(inputs=[str(g)], out=str(tmp_path / "t"))))


def test_bytes_that_do_not_decode_in_a_json_array_are_named_by_line(tmp_path):
    """A JSON array is one stream: nothing after such bytes can be read, so this raises even when skipping."""
    records = [{"text": f"{SIMPLIFIED[i % 3]}{i}"} for i in range(3000)]  # ~200 KB, one record per line
    lines = ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]").encode().split(b"\n")
    lines[2500] = json.dumps(records[2499], ensure_ascii=False).encode("gbk") + b","
    p = tmp_path / "arr.json"
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"arr.json: line 2501: not valid UTF-8 \(it reads as GB18030 \(GBK\)"):
        docs(p, on_error="skip", stats=ReadStats())
