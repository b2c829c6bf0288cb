import json

import pytest

from babyllama.corpus.readers import DataError, ReadStats
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


# --- packing ------------------------------------------------------------------------------------

def _samples(lengths):
    from babyllama.data.sft import SFTSample
    from babyllama.tokenizer.chat import IGNORE

    # sample k: ids all equal to k + 1 (so a row's content names its samples), loss on the last 2 tokens
    return [SFTSample([k + 1] * n, [IGNORE] * (n - 2) + [k + 1] * 2) for k, n in enumerate(lengths)]


def test_pack_rows_uses_each_sample_once_within_capacity():
    import random

    from babyllama.data.sft import pack_rows

    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(500)]
    order = list(range(500))
    rng.shuffle(order)
    rows = pack_rows(lengths, order, capacity=64, window=128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert sum(lengths) / (64 * len(rows)) > 0.85  # rows are well filled


def test_packed_batches_keep_samples_apart_and_resume_exactly():
    import torch

    from babyllama.data.sft import PackedSFTBatches
    from babyllama.tokenizer.chat import IGNORE

    lengths = [5 + (k * 7) % 30 for k in range(200)]
    samples = _samples(lengths)
    batches = PackedSFTBatches(samples, 4, pad_id=0, capacity=40, seed=3)
    seen = []
    for _ in range(len(batches._order) // 4):
        x, y, seg = batches.next_batch()
        for r in range(x.shape[0]):
            for s in seg[r].unique().tolist():
                where = seg[r] == s
                ids = x[r][where]
                if s == -1:  # padding: never a target
                    assert (y[r][where] == IGNORE).all()
                    continue
                k = int(ids[0]) - 1
                assert (ids == k + 1).all() and len(ids) == lengths[k] - 1  # a whole sample, input shifted
                assert y[r][where].tolist() == samples[k].labels[1:]
                seen.append(k)
    assert batches.epoch == 0 and len(seen) == len(set(seen)) and len(seen) > 190
    state = batches.state_dict()
    after = batches.next_batch()
    again = PackedSFTBatches(samples, 4, pad_id=0, capacity=40, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, again.next_batch()))


# --- prepared datasets (`babyllama data sft`) -----------------------------------------------------

def test_prepared_sft_round_trips_and_checks_the_tokenizer(tmp_path, tokenizer_dir, tokenizer):
    from babyllama.data.sft import PrepareSFTConfig, build_sft_samples, load_prepared_sft, prepare_sft
    from babyllama.tokenizer.chat import ChatTemplate

    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"question": f"问题{i}", "response": f"回答{i}"}, ensure_ascii=False)
                             for i in range(300)) + "\n{broken\n", encoding="utf-8")
    m = prepare_sft(PrepareSFTConfig(inputs=[str(src)], tokenizer=str(tokenizer_dir), out=str(tmp_path / "ds"),
                                     max_len=65, val_fraction=0.1))
    assert m["conversations"] == 300 and m["skipped"] == 1 and m["train"] + m["val"] == 300
    train, val, manifest = load_prepared_sft(tmp_path / "ds", tokenizer.fingerprint)
    ref_train, ref_val, _ = build_sft_samples([str(src)], ChatTemplate(tokenizer), 65, val_fraction=0.1,
                                              verbose=False)
    assert train == ref_train and val == ref_val
    with pytest.raises(DataError, match="another tokenizer"):
        load_prepared_sft(tmp_path / "ds", "not-this-one")


@pytest.mark.parametrize("packed", [False, True])
def test_sft_ranks_take_disjoint_shares_of_every_global_batch(packed):
    import torch

    from babyllama.data.sft import PackedSFTBatches, SFTBatches

    samples = _samples([4 + (k * 5) % 20 for k in range(120)])

    def make(rank):
        if packed:
            return PackedSFTBatches(samples, 2, pad_id=0, capacity=40, seed=5, rank=rank, world_size=2)
        return SFTBatches(samples, 3, pad_id=0, seed=5, rank=rank, world_size=2)

    ranks = [make(0), make(1)]
    seen = [[], []]
    for _ in range(8):
        for r, b in enumerate(ranks):
            x = b.next_batch()[0]
            seen[r] += [int(v) for v in torch.unique(x) if v != 0]  # sample k's tokens are all k + 1
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])


MULTI_TURN = {  # one conversation, system + two turns, in every layout that can hold it
    "alpaca": {"system": "你是医生", "instruction": "头疼", "input": "两天了", "output": "多休息。",
               "history": [["你好", "你好，请讲。"]]},
    "sharegpt": {"conversations": [{"from": "system", "value": "你是医生"}, {"from": "human", "value": "你好"},
                                   {"from": "gpt", "value": "你好，请讲。"},
                                   {"from": "human", "value": "头疼\n两天了"}, {"from": "gpt", "value": "多休息。"}]},
    "openai": {"messages": [{"role": "system", "content": "你是医生"}, {"role": "user", "content": "你好"},
                            {"role": "assistant", "content": "你好，请讲。"},
                            {"role": "user", "content": "头疼\n两天了"}, {"role": "assistant", "content": "多休息。"}]},
}


@pytest.mark.parametrize("layout", list(MULTI_TURN) + ["qa", "csv"])
def test_label_positions_are_exactly_the_assistant_replies_in_every_layout(tmp_path, tokenizer, layout):
    """Expected ids and labels are built here from the template's definition,
    <|im_start|>role\\ncontent<|im_end|>\\n per turn, loss on content + <|im_end|> of replies only."""
    from babyllama.data.sft import build_sft_samples
    from babyllama.tokenizer import IM_END, IM_START
    from babyllama.tokenizer.chat import IGNORE, ChatTemplate

    if layout == "qa":
        f = tmp_path / "qa.jsonl"
        f.write_text(json.dumps({"question": "头疼\n两天了", "response": "多休息。"}, ensure_ascii=False))
        turns = [("user", "头疼\n两天了"), ("assistant", "多休息。")]
    elif layout == "csv":
        f = tmp_path / "pairs.csv"
        f.write_text('prompt,answer\n"头疼\n两天了",多休息。\n', encoding="utf-8")
        turns = [("user", "头疼\n两天了"), ("assistant", "多休息。")]
    else:
        f = tmp_path / f"{layout}.json"
        f.write_text(json.dumps([MULTI_TURN[layout]], ensure_ascii=False), encoding="utf-8")
        turns = [("system", "你是医生"), ("user", "你好"), ("assistant", "你好，请讲。"), ("user", "头疼\n两天了"),
                 ("assistant", "多休息。")]
    start, end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]
    ids, labels = [], []
    for role, content in turns:
        head, body, tail = [start] + tokenizer.encode(role + "\n"), tokenizer.encode(content) + [end], tokenizer.encode("\n")
        ids += head + body + tail
        labels += [IGNORE] * len(head) + (body if role == "assistant" else [IGNORE] * len(body)) + [IGNORE] * len(tail)
    (train, val, report) = build_sft_samples([f"{f}::{layout}"], ChatTemplate(tokenizer), 512, val_fraction=0.0,
                                             verbose=False)
    assert report["conversations"] == 1 and not val
    assert train[0].ids == ids
    assert [i for i, lab in enumerate(train[0].labels) if lab != IGNORE] == [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert train[0].labels == labels
