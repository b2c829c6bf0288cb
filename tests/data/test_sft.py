import json

import pytest

from babyllama.data.readers import DataError, ReadStats
from babyllama.data.sft import read_conversations
from tests.conftest import needs_shared


def roles(conv):
    return [m.role for m in conv]


@pytest.mark.parametrize("name,count", [
    ("medical_sft_1K_format.jsonl", 1000), ("huatuo_medical_instructions.jsonl", 8658),
    ("alpaca_zh_demo.json", 1000), ("oaast_sft_zh.json", 689)])
def test_shared_samples_parse_with_expected_counts(name, count):
    path = needs_shared(f"sft/{name}")
    stats = ReadStats()
    convs = list(read_conversations(path, stats=stats))
    assert len(convs) + stats.skipped == count
    assert stats.skipped <= count * 0.01, stats.skipped_where
    assert all(c[-1].role == "assistant" for c in convs)


def test_layouts(tmp_path):
    f = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "翻译", "input": "hello", "output": "你好", "history": [["在吗", "在"]]}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (conv,) = read_conversations(f)
    assert roles(conv) == ["user", "assistant", "user", "assistant"] and conv[2].content == "翻译\nhello"
    f = tmp_path / "openai.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                          {"role": "assistant", "content": "a"}]}), encoding="utf-8")
    assert roles(next(read_conversations(f))) == ["system", "user", "assistant"]
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "发烧怎么办", "response": "多喝水"}, ensure_ascii=False), encoding="utf-8")
    assert [m.content for m in next(read_conversations(f))] == ["发烧怎么办", "多喝水"]
    f = tmp_path / "orig.csv"
    f.write_text("prompt,answer\n你是谁,我是小助手\n", encoding="utf-8")
    assert [m.content for m in next(read_conversations(f))] == ["你是谁", "我是小助手"]


def test_malformed_records_are_counted_with_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "response": "a"}\n{"question": "q"\n{"question": "q", "response": ""}\n',
                 encoding="utf-8")
    stats = ReadStats()
    assert len(list(read_conversations(f, stats=stats))) == 1
    assert stats.skipped == 2
    assert "bad.jsonl: line 2: malformed JSON" in stats.skipped_where[0]
    assert "line 3: assistant reply is empty" in stats.skipped_where[1]
    with pytest.raises(DataError, match="bad.jsonl: line 2"):
        list(read_conversations(f, on_error="raise"))
