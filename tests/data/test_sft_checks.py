"""What an SFT conversation must be to be trained on, how broken records are counted, fixed or raised,
and SFT files in other encodings or with a byte-order mark."""

import json

import pytest

from babyllama.corpus.readers import DataError, ReadStats
from babyllama.data.sft import BadRecord, check_conversation, read_conversations
from babyllama.tokenizer.chat import Message


def openai(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write_jsonl(path, records, encoding="utf-8", bom=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return path


def contents(convs):
    return [[(m.role, m.content) for m in c] for c in convs]


@pytest.mark.parametrize("turns,why", [
    ([("assistant", "我先说"), ("user", "好"), ("assistant", "嗯")], "the conversation starts with the assistant (turn 1)"),
    ([("user", "一"), ("user", "二"), ("assistant", "三")], "two user turns in a row (turns 1 and 2)"),
    ([("system", "s"), ("user", "一"), ("assistant", "二"), ("assistant", "三")],
     "two assistant turns in a row (turns 3 and 4)"),
    ([("user", "一"), ("assistant", " \n"), ("user", "二"), ("assistant", "三")], "assistant reply is empty (turn 2)"),
    ([("user", "  "), ("assistant", "二")], "user turn is empty (turn 1)"),
    ([("user", "一"), ("system", "s"), ("assistant", "二")], "a system turn after the first turn (turn 2)"),
    ([("user", ["一"]), ("assistant", "二")], "user content is list, not text (turn 1)"),
    ([("system", "s"), ("user", "一")], "no assistant reply to learn from"),
])
def test_rules(turns, why):
    with pytest.raises(BadRecord) as e:
        check_conversation([Message(r, c) for r, c in turns])
    assert str(e.value) == why


@pytest.mark.parametrize("turns,kept,fixed", [
    ([("user", "一"), ("assistant", "二"), ("user", "三")], 2, "trailing user turn without a reply dropped"),
    ([("user", "一"), ("assistant", "二"), ("user", "三"), ("user", "四")], 2,
     "trailing user turn without a reply dropped"),
    ([("system", " "), ("user", "一"), ("assistant", "二")], 2, "empty system prompt dropped"),
    ([("system", "s"), ("user", "一"), ("assistant", "二")], 3, ""),
])
def test_unambiguous_fixes(turns, kept, fixed):
    msgs = [Message(r, c) for r, c in turns]
    out, what = check_conversation(msgs)
    assert what == fixed and len(out) == kept and out[-1].role == "assistant"


def test_broken_conversations_are_skipped_with_line_and_reason_or_fixed(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        openai(("user", "你好"), ("assistant", "你好！")),
        openai(("assistant", "我先说"), ("user", "好"), ("assistant", "嗯")),
        openai(("user", "一"), ("user", "二"), ("assistant", "三")),
        openai(("user", "一"), ("assistant", ""), ("user", "二"), ("assistant", "三")),
        openai(("user", "一"), ("assistant", "二"), ("user", "没有回答的问题")),
        openai(("user", "一"), ("assistant", "二"), ("user", "三"), ("assistant", "四")),
    ])
    stats = ReadStats()
    convs = list(read_conversations(f, stats=stats))
    assert contents(convs) == [[("user", "你好"), ("assistant", "你好！")],
                               [("user", "一"), ("assistant", "二")],
                               [("user", "一"), ("assistant", "二"), ("user", "三"), ("assistant", "四")]]
    assert stats.documents == 3 and stats.skipped == 3 and stats.fixed == 1
    assert stats.skipped_where == [f"{f}: line 2: the conversation starts with the assistant (turn 1)",
                                   f"{f}: line 3: two user turns in a row (turns 1 and 2)",
                                   f"{f}: line 4: assistant reply is empty (turn 2)"]
    assert stats.skipped_reasons == {"starts with the assistant": 1, "two user turns in a row": 1,
                                     "assistant reply is empty": 1}
    assert stats.fixed_where == [f"{f}: line 5: trailing user turn without a reply dropped"]
    with pytest.raises(DataError) as e:
        list(read_conversations(f, on_error="raise"))
    assert str(e.value) == f"{f}: line 2: the conversation starts with the assistant (turn 1)"


def test_alpaca_history_and_sharegpt_follow_the_same_rules(tmp_path):
    a = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "头疼", "input": "", "output": "多休息。", "history": [["你好", "你好，请讲。"]]},
        {"instruction": "头疼", "input": "", "output": "多休息。", "history": [["你好", ""]]},
        {"instruction": "头疼", "input": "", "output": "多休息。", "history": [["只有问题"]]},
        {"instruction": "", "input": "", "output": "多休息。"},
    ])
    stats = ReadStats()
    assert len(list(read_conversations(a, stats=stats))) == 1
    assert [w.split(": ", 1)[1] for w in stats.skipped_where] == [
        "line 2: assistant reply is empty (turn 2)", "line 3: a history turn is not a [question, answer] pair",
        "line 4: user turn is empty (turn 1)"]
    s = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "gpt", "value": "你好"}, {"from": "human", "value": "在吗"}]},
        {"conversations": [{"from": "human", "value": "在吗"}, {"from": "gpt", "value": "在"},
                           {"from": "human", "value": "再见"}]},
    ])
    stats = ReadStats()
    assert contents(read_conversations(s, stats=stats)) == [[("user", "在吗"), ("assistant", "在")]]
    assert stats.skipped_reasons == {"starts with the assistant": 1} and stats.fixed == 1


def test_the_report_counts_fixes_and_reasons(tmp_path, tokenizer, capsys):
    from babyllama.data.sft import build_sft_samples
    from babyllama.tokenizer.chat import ChatTemplate

    f = write_jsonl(tmp_path / "c.jsonl", [
        *[openai(("user", f"问题{i}"), ("assistant", f"回答{i}")) for i in range(5)],
        openai(("user", "问"), ("assistant", "答"), ("user", "追问")),
        openai(("user", "问"), ("assistant", "   ")),
        openai(("user", "问"), ("assistant", "")),
    ])
    train, val, report = build_sft_samples([str(f)], ChatTemplate(tokenizer), 128, val_fraction=0.0)
    assert report["conversations"] == 6 and len(train) == 6
    assert report["fixed"] == 1
    assert report["fixed_where"] == [f"{f}: line 6: trailing user turn without a reply dropped"]
    assert report["skipped"] == 2 and report["skipped_reasons"] == {"assistant reply is empty": 2}
    printed = capsys.readouterr().out
    assert "skipped 2 records (assistant reply is empty: 2)" in printed
    assert f"fixed 1 records and kept them; first: {f}: line 6: trailing user turn" in printed


def test_unknown_format_names_the_file(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [openai(("user", "一"), ("assistant", "二"))])
    with pytest.raises(DataError, match=r"c.jsonl: unknown SFT format 'chatml'"):
        list(read_conversations(f, "chatml"))


# --- encodings and byte-order marks -------------------------------------------------------------------

QA = [{"question": "今天天气怎么样？", "response": "今天天气很好，我们一起去公园散步吧。"},
      {"question": "这本书好看吗？", "response": "这本书的内容非常有意思，我已经看了两遍。"}]
QA_PAIRS = [[("user", r["question"]), ("assistant", r["response"])] for r in QA]


@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_sft_files_with_a_byte_order_mark_or_in_gb18030(tmp_path, container):
    def write(name, encoding, bom):
        p = tmp_path / f"{name}.{container}"
        text = json.dumps(QA, ensure_ascii=False) if container == "json" else \
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in QA)
        p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
        return p

    assert contents(read_conversations(write("bom", "utf-8", True))) == QA_PAIRS
    gb = write("gb", "gb18030", False)
    assert contents(read_conversations(gb, encoding="gb18030")) == QA_PAIRS
    with pytest.raises(DataError, match=rf"gb.{container}: not UTF-8; it looks like GB18030 \(GBK\)"):
        list(read_conversations(gb, stats=ReadStats()))  # skipping is the default; a file's encoding is not skipped


def test_a_bad_byte_in_sft_json_lines_is_skipped_or_raised(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in QA * 2]
    lines[3] = lines[3].replace("书".encode(), b"\xff")
    p.write_bytes(b"\n".join(lines))
    stats = ReadStats()
    assert len(list(read_conversations(p, stats=stats))) == 3
    assert stats.skipped_where == [f"{p}: line 4: not valid UTF-8"]
    with pytest.raises(DataError, match=r"bad.jsonl: line 4: not valid UTF-8"):
        list(read_conversations(p, on_error="raise"))


def test_prepare_sft_passes_the_encoding(tmp_path, tokenizer_dir):
    from babyllama.data.sft import PrepareSFTConfig, prepare_sft

    p = tmp_path / "gb.jsonl"
    p.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in QA * 20).encode("gb18030"))
    m = prepare_sft(PrepareSFTConfig(inputs=[str(p)], tokenizer=str(tokenizer_dir), out=str(tmp_path / "ds"),
                                     max_len=65, val_fraction=0.0, encoding="gb18030"))
    assert m["conversations"] == 40 and m["skipped"] == 0 and m["fixed"] == 0
