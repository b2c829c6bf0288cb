import json

import pytest

from babyllama.corpus.readers import DataError, ReadStats, clean_text, iter_documents, strip_pos_tags
from tests.conftest import needs_shared


def docs(path, layout="auto", **kw):
    return list(iter_documents(path, layout, **kw))


def test_plain_text_lines_and_paragraphs(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("第一段第一行\n第一段第二行\n\n\n第二段\n", encoding="utf-8")
    assert docs(p) == ["第一段第一行", "第一段第二行", "第二段"]
    assert docs(p, "paragraphs") == ["第一段第一行\n第一段第二行", "第二段"]


def test_peoples_daily_layout_strips_tags():
    assert strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  １９９８年/t") == "迈向充满希望的新世纪——１９９８年"


def test_cleaning_normalises_width_but_keeps_chinese_punctuation():
    assert clean_text("  １９９８年，ＡＢＣ！\x00\u200b ") == "1998年，ABC！"


def test_json_layouts(tmp_path):
    wiki = tmp_path / "wiki.json"
    wiki.write_text(json.dumps([{"completion": "维基百科条目一", "source": "wikipedia.zh2307"},
                                {"completion": "条目二", "source": "wikipedia.zh2307"}], ensure_ascii=False), encoding="utf-8")
    assert docs(wiki) == ["维基百科条目一", "条目二"]
    baike = tmp_path / "baike.jsonl"
    baike.write_text(json.dumps({"title": "熊猫", "summary": "中国特有物种。",
                                 "sections": [{"title": "习性", "content": "吃竹子。"}]}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert docs(baike) == ["熊猫\n中国特有物种。\n习性\n吃竹子。"]
    med = tmp_path / "med.jsonl"
    med.write_text('{"text": "发热是常见症状。"}\n\n{"text": "多喝水。"}\n', encoding="utf-8")
    assert docs(med, "text") == ["发热是常见症状。", "多喝水。"]
    assert docs(med, "field:text") == ["发热是常见症状。", "多喝水。"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["甲文档", "乙文档", None], "id": [1, 2, 3]}), path)
    stats = ReadStats()
    assert docs(path, on_error="skip", stats=stats) == ["甲文档", "乙文档"]
    assert stats.skipped == 1


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "好"}\n{"text": "坏"\n{"text": "好"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        docs(p)
    stats = ReadStats()
    assert docs(p, on_error="skip", stats=stats) == ["好", "好"]
    assert stats.skipped == 1 and "line 2" in stats.skipped_where[0]


def test_missing_field_names_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl: line 2: record has no 'text' field"):
        docs(p)


def test_wrong_encoding_names_the_line(tmp_path):
    p = tmp_path / "gbk.txt"
    p.write_bytes("第一行\n".encode("utf-8") + "第二行是GBK编码\n".encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.txt: line 2: not valid UTF-8"):
        docs(p)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        docs(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no such file"):
        docs(tmp_path / "nope.txt")


def test_malformed_json_array(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[{"completion": "一"}, {"completion": "二"', encoding="utf-8")
    with pytest.raises(DataError, match=r"arr.json: record 2: malformed JSON array"):
        docs(p)


def test_unknown_keys_suggest_a_layout(tmp_path):
    p = tmp_path / "odd.jsonl"
    p.write_text('{"foo": "bar"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="field:NAME"):
        docs(p)


def test_shared_samples_parse():
    fever = needs_shared("pretrain/fever.txt")
    assert len(docs(fever)) > 900
    tnews = needs_shared("pretrain/tnews_unlabeled.jsonl")
    n = sum(1 for _ in iter_documents(tnews))  # auto layout finds "sentence"
    assert n > 19000


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_chunk_size_never_changes_documents_or_line_numbers(tmp_path, ending):
    """Chunks are byte blocks cut at line ends (paragraphs: at blank lines); any chunk size must give
    the documents of one whole-file chunk, and errors must name the same line."""
    from babyllama.corpus.readers import parse_chunk, read_chunks

    paras = [ending.join(f"第{p}段第{i}行" for i in range(p % 4 + 1)) for p in range(60)]
    text = tmp_path / "a.txt"
    text.write_bytes(((ending * 2).join(paras)).encode("utf-8"))  # no final newline
    jsonl = tmp_path / "a.jsonl"
    rows = [json.dumps({"text": f"文档{i}" * (i % 7 + 1)}, ensure_ascii=False) for i in range(200)]
    jsonl.write_bytes(ending.join(rows[:150] + ["{broken"] + rows[150:]).encode("utf-8"))

    def chunked(path, layout, size):
        return [d for c in read_chunks(path, layout, size) for d in parse_chunk(c, "skip", ReadStats())]

    for path, layout in ((text, "lines"), (text, "paragraphs"), (jsonl, "text")):
        whole = chunked(path, layout, 1 << 30)
        for size in [*range(1, 41), 64, 500]:  # every cut position within the first lines
            assert chunked(path, layout, size) == whole, (layout, size)
    assert len(chunked(text, "paragraphs", 1 << 30)) == 60
    for size in (1, 100, 1 << 30):
        with pytest.raises(DataError, match=r"a.jsonl: line 151: malformed JSON"):
            [parse_chunk(c) for c in read_chunks(jsonl, "text", size)]
