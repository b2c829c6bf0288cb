"""CSV files: a column of text for pretraining and tokenizer training, prompt/answer pairs for SFT."""

import json
import warnings

import pytest

from babyllama.corpus.readers import DataError, DataWarning, ReadStats, iter_documents, parse_chunk, read_chunks
from babyllama.data.sft import read_conversations

# a header, quoted fields with commas, quotes and line breaks, a label column that must not become text
REVIEWS = ('label,review\n'
           '1,"房间干净,早餐丰富"\n'
           '0,"服务员说""没有空房了""\n然后就走了"\n'
           '1,交通方便\n'
           '\n'
           '0,"第一行\n第二行\n第三行"\n'
           '1,最后一条\n')
REVIEW_TEXTS = ["房间干净,早餐丰富", '服务员说"没有空房了"\n然后就走了', "交通方便", "第一行\n第二行\n第三行", "最后一条"]


def docs(path, layout="auto", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return list(iter_documents(path, layout, **kw))


def test_a_named_column_with_quoted_multiline_fields(tmp_path):
    p = tmp_path / "reviews.csv"
    p.write_text(REVIEWS, encoding="utf-8")
    assert docs(p, "csv:review") == REVIEW_TEXTS
    assert docs(f"{p}::csv:label") == ["1", "0", "1", "0", "1"]
    assert docs(p, "field:review") == REVIEW_TEXTS  # field:NAME means the column, as for Parquet


def test_auto_takes_the_one_text_like_column_and_says_so(tmp_path):
    p = tmp_path / "reviews.csv"
    p.write_text(REVIEWS, encoding="utf-8")
    with pytest.warns(DataWarning, match=r"reviews.csv: reading the text from column 'review'"):
        assert list(iter_documents(p)) == REVIEW_TEXTS


def test_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text(REVIEWS + '0,"多了",一列\n1,"引号"没关\n1,好\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        docs(p, "csv:review")
    assert str(e.value) == (f"{p}: line 11: row has 3 fields, the header has 2 "
                            f"(an unquoted delimiter or quote in the text?)")
    stats = ReadStats()
    assert docs(p, "csv:review", on_error="skip", stats=stats) == REVIEW_TEXTS + ["好"]
    assert stats.skipped == 2
    assert stats.skipped_where[1].startswith(f"{p}: line 12: malformed CSV (")


def test_an_unclosed_quote_is_an_error_not_a_field_running_to_the_end(tmp_path):
    p = tmp_path / "open.csv"
    p.write_text('text\n好\n"没有结束\n坏\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"open.csv: line 3: malformed CSV"):
        docs(p, "csv:text")


def test_a_missing_column_lists_the_columns(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text(REVIEWS, encoding="utf-8")
    with pytest.raises(DataError) as e:
        docs(p, "csv:text")
    assert str(e.value) == f"{p}: no column 'text' (columns: label, review)"


@pytest.mark.parametrize("header,why", [("id,label", "no column is named like text"),
                                        ("text,content,id", r"several columns could be the text \(text, content\)")])
def test_auto_without_one_text_like_column_asks_for_one(tmp_path, header, why):
    p = tmp_path / "x.csv"
    p.write_text(header + "\n" + ",".join("a" for _ in header.split(",")) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"x.csv: {why}; columns: {header.replace(',', ', ')}; "
                                        rf"pass .*x.csv::csv:COLUMN or --layout csv:COLUMN"):
        docs(p)


def test_reading_a_csv_file_as_lines_warns(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text(REVIEWS, encoding="utf-8")
    with pytest.warns(DataWarning, match=r"r.csv is read as plain text \(lines\): its header, every column"):
        got = list(iter_documents(p, "lines"))
    assert got[0] == "label,review"


def test_tsv_and_csv_layout_on_any_file(tmp_path):
    t = tmp_path / "r.tsv"
    t.write_text('id\ttext\n1\t有,逗号也没关系\n2\t"带\t制表符"\n', encoding="utf-8")
    assert docs(t) == ["有,逗号也没关系", "带\t制表符"]
    c = tmp_path / "r.txt"
    c.write_text(REVIEWS, encoding="utf-8")
    assert docs(c, "csv:review") == REVIEW_TEXTS


def test_a_header_is_required(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text(",\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"h.csv: line 1: not a CSV header"):
        docs(p, "csv:text")


def test_chunk_size_never_changes_csv_documents(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("label,review\n" + REVIEWS.split("\n", 1)[1] * 30, encoding="utf-8")
    whole = [d for c in read_chunks(p, "csv:review", 1 << 30) for d in parse_chunk(c)]
    assert len(whole) == 150
    for size in (1, 50, 1000):
        chunks = list(read_chunks(p, "csv:review", size))
        assert [d for c in chunks for d in parse_chunk(c)] == whole
        assert chunks[1].start > chunks[0].start


def test_prepare_pretrain_reads_a_csv_column(tmp_path, tokenizer_dir):
    """A CSV column gives the same shards as a JSON-lines file of the same texts."""
    from babyllama.data.pretrain import PrepareConfig, prepare_pretrain

    p = tmp_path / "r.csv"
    p.write_text(REVIEWS * 1, encoding="utf-8")
    j = tmp_path / "r.jsonl"
    j.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in REVIEW_TEXTS), encoding="utf-8")
    outs = []
    for spec, workers in ((f"{p}::csv:review", 2), (str(j), 1)):
        out = tmp_path / f"o{workers}"
        m = prepare_pretrain(PrepareConfig(inputs=[spec], tokenizer=str(tokenizer_dir), out=str(out),
                                           workers=workers, val_fraction=0.0, progress=False))
        assert m["splits"]["train"]["documents"] == len(REVIEW_TEXTS)
        outs.append(out)
    assert (outs[0] / "train-00000.bin").read_bytes() == (outs[1] / "train-00000.bin").read_bytes()


# --- SFT --------------------------------------------------------------------------------------------------

def pairs(path, layout="auto", **kw):
    return [[m.content for m in conv] for conv in read_conversations(path, layout, **kw)]


@pytest.mark.parametrize("header", ["prompt,answer", "question,answer", "Query,Response", "input,output",
                                    "问题,回答"])
def test_sft_csv_column_synonyms(tmp_path, header):
    p = tmp_path / "qa.csv"
    p.write_text(f'id,{header}\n1,发烧怎么办,"多喝水,\n多休息"\n', encoding="utf-8")
    assert pairs(p) == [["发烧怎么办", "多喝水,\n多休息"]]


def test_sft_csv_alpaca_columns_join_the_input(tmp_path):
    p = tmp_path / "alpaca.csv"
    p.write_text("instruction,input,output\n翻译成中文,hello,你好\n自我介绍,,我是小助手\n", encoding="utf-8")
    assert pairs(p) == [["翻译成中文\nhello", "你好"], ["自我介绍", "我是小助手"]]


def test_sft_csv_named_columns_and_byte_order_mark(tmp_path):
    p = tmp_path / "named.csv"
    p.write_bytes(b"\xef\xbb\xbf" + "问,答,备注\n你是谁,我是小助手,x\n".encode())
    assert pairs(p) == [["你是谁", "我是小助手"]]
    assert pairs(p, "csv:答,问") == [["我是小助手", "你是谁"]]
    with pytest.raises(DataError, match=r"named.csv: no column 'ask' \(columns: 问, 答, 备注\)"):
        pairs(p, "csv:ask,答")


def test_sft_csv_without_prompt_and_answer_columns_lists_them(tmp_path):
    p = tmp_path / "odd.csv"
    p.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        pairs(p)
    assert str(e.value) == (f"{p}: no prompt and answer columns among: a, b; name them: "
                            f"{p}::csv:PROMPT_COL,ANSWER_COL or --layout csv:PROMPT_COL,ANSWER_COL")


def test_sft_csv_bad_rows_are_skipped_or_raised_with_their_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('prompt,answer\n"第一问\n续",答一\n多,一,列\n空答案,"  "\n"好问",好答\n', encoding="utf-8")
    stats = ReadStats()
    assert pairs(p, stats=stats) == [["第一问\n续", "答一"], ["好问", "好答"]]
    assert stats.skipped_where == [
        f"{p}: line 4: row has 3 fields, the header has 2 (an unquoted delimiter or quote in the text?)",
        f"{p}: line 5: assistant reply is empty (turn 2)"]
    with pytest.raises(DataError, match=r"bad.csv: line 4: row has 3 fields"):
        pairs(p, on_error="raise")


def test_sft_csv_in_gb18030(tmp_path):
    p = tmp_path / "gb.csv"
    p.write_bytes("prompt,answer\n今天天气怎么样,今天天气很好，我们一起去公园散步吧。\n".encode("gb18030"))
    with pytest.raises(DataError, match=r"gb.csv: not UTF-8; it looks like GB18030"):
        pairs(p)
    assert pairs(p, encoding="gb18030") == [["今天天气怎么样", "今天天气很好，我们一起去公园散步吧。"]]
