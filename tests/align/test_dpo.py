"""Preference data and DPO: every layout users bring, errors with file and line, log-probs of the
reply tokens only, ln 2 for a policy equal to its reference, and `babyllama dpo` end to end (the
loss falls, held-out preference accuracy rises, a paused run resumes exactly)."""

import json
import math
from pathlib import Path

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.align.dpo import PreferencePairs, reference_logps, sequence_logps
from babyllama.cli import main
from babyllama.config import IGNORE_INDEX
from babyllama.corpus.readers import DataError, ReadStats
from babyllama.data.preference import build_pairs, collate_pairs, read_pairs
from babyllama.model import Llama
from babyllama.tokenizer.chat import ChatTemplate, Message
from tests.conftest import tiny_model_config

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "preference"


def _write(path: Path, records, array: bool = False) -> Path:
    text = json.dumps(records, ensure_ascii=False) if array else \
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text(text, encoding="utf-8")
    return path


def test_every_layout_reads_to_the_same_pair(tmp_path):
    want = ([Message("user", "今天天气怎么样？")], "晴天。", "不知道。")
    records = {
        "sharegpt": {"conversations": [{"from": "human", "value": "今天天气怎么样？"}], "chosen": "晴天。",
                     "rejected": "不知道。"},
        "alpaca": {"instruction": "今天天气怎么样？", "input": "", "output": ["晴天。", "不知道。"]},
        "qa": {"question": "今天天气怎么样？", "response_chosen": "晴天。", "response_rejected": "不知道。"},
        "prompt": {"prompt": "今天天气怎么样？", "chosen": "晴天。", "rejected": "不知道。"},
        "messages": {"prompt": [{"role": "user", "content": "今天天气怎么样？"}],
                     "chosen": [{"role": "assistant", "content": "晴天。"}],
                     "rejected": [{"role": "assistant", "content": "不知道。"}]},
    }
    for name, record in records.items():
        for array in (False, True):
            path = _write(tmp_path / f"{name}.json{'' if array else 'l'}", [record], array)
            (pair,) = list(read_pairs(path))
            assert (pair.prompt, pair.chosen, pair.rejected) == want, name


def test_history_and_system_become_the_prompt(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"system": "你是助手", "history": [["你好", "你好！"]], "instruction": "再见",
                                          "input": "明天", "output": ["再见！", "嗯"]}])
    (pair,) = list(read_pairs(path))
    assert [m.role for m in pair.prompt] == ["system", "user", "assistant", "user"]
    assert pair.prompt[-1].content == "再见\n明天"


def test_bad_records_name_their_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n'
                    '{"prompt": "a", "chosen": "b", "rejected": "b"}\n{"prompt": "a", "rejected": "c"}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        list(read_pairs(path, on_error="raise"))
    stats = ReadStats()
    assert len(list(read_pairs(path, stats=stats, on_error="skip"))) == 1
    assert stats.skipped == 3
    assert any("line 3: chosen and rejected are the same text" in w for w in stats.skipped_where)
    assert any("line 4: missing field 'chosen'" in w for w in stats.skipped_where)
    with pytest.raises(DataError, match="cannot tell the preference layout"):
        list(read_pairs(_write(tmp_path / "x.jsonl", [{"text": "a"}])))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/preference is not present (a fresh clone)")
def test_the_shared_samples_read_in_their_own_layouts():
    counts = {}
    for path in sorted(SHARED.iterdir()):
        stats = ReadStats()
        counts[path.name] = (len(list(read_pairs(path, stats=stats, on_error="skip"))), stats.skipped)
    assert counts == {"dpo_zh_500.jsonl": (500, 0), "medical_reward_sample.json": (100, 0),
                      "oaast_rm_zh.json": (772, 3)}  # three of its pairs have chosen == rejected


def test_log_probs_cover_the_reply_tokens_only(tokenizer, tmp_path):
    template = ChatTemplate(tokenizer)
    path = _write(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "你好"},
                                                     {"role": "assistant", "content": "你好！"},
                                                     {"role": "user", "content": "天气？"}],
                                          "chosen": "晴天。", "rejected": "下雨了，带伞。"}])
    train, _, _ = build_pairs([str(path)], template, 64, val_fraction=0.0)
    tokens, targets, _ = collate_pairs(train, tokenizer.pad_id)
    prompt = template.prompt_ids([Message("user", "你好"), Message("assistant", "你好！"), Message("user", "天气？")])
    for side, reply in enumerate(("晴天。", "下雨了，带伞。")):
        expected = tokenizer.encode(reply) + [template.end_id]
        row = targets[0, side]
        scored = [(t, int(row[t])) for t in range(row.shape[0]) if row[t] != IGNORE_INDEX]
        # position by position: target t is the token at t + 1, the first reply token right after the prompt
        assert [t for t, _ in scored] == list(range(len(prompt) - 1, len(prompt) - 1 + len(expected)))
        assert [tok for _, tok in scored] == expected
        assert tokens[0, side, :len(prompt)].tolist() == prompt  # the earlier assistant turn is prompt


def _pairs(tokenizer, tmp_path, n=24):
    rows = [{"prompt": f"第{i}个问题？", "chosen": "答案是好。", "rejected": "答案是坏，不好。"} for i in range(n)]
    return build_pairs([str(_write(tmp_path / "pairs.jsonl", rows))], ChatTemplate(tokenizer), 64, val_fraction=0.0)[0]


def test_a_policy_equal_to_its_reference_gives_exactly_ln2(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size)).eval()
    tokens, targets, _ = collate_pairs(_pairs(tokenizer, tmp_path)[:6], tokenizer.pad_id)
    with torch.no_grad():
        ref = sequence_logps(model, tokens, targets)
        loss, metrics = PreferencePairs(beta=0.1).loss(model, (tokens, targets, ref))
    assert loss.item() / 6 == pytest.approx(math.log(2), rel=1e-7)
    assert metrics["reward_margin"].item() == 0 and metrics["pref_accuracy"].item() == 0
    ipo, _ = PreferencePairs(beta=0.1, loss="ipo").loss(model, (tokens, targets, ref))
    assert ipo.item() / 6 == pytest.approx((1 / 0.2) ** 2)  # IPO's target margin 1 / (2 beta), squared
    # the cached reference (batched differently) agrees with the in-batch one
    samples = _pairs(tokenizer, tmp_path)[:6]
    reference_logps(model, samples, tokenizer.pad_id, batch_size=4)
    torch.testing.assert_close(torch.tensor([s.ref for s in samples], dtype=torch.float32), ref, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tokenizer):
    """A tiny model taught to answer either 答案是好。 or 答案是坏，不好。 at random (SFT)."""
    root = tmp_path_factory.mktemp("dpo")
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    ckpt_io.save_checkpoint(root / "random", 0, Llama(cfg), cfg)
    tokenizer.save(root / "random" / "tokenizer")
    rows = [{"question": f"第{i}个问题是什么？", "response": "答案是好。" if i % 2 else "答案是坏，不好。"} for i in range(200)]
    _write(root / "sft.jsonl", rows)
    assert main(["sft", "--ckpt", str(root / "random"), "--data", str(root / "sft.jsonl"), "--out", str(root / "sft"),
                 "--device", "cpu", "--max-steps", "60", "--lr", "3e-3", "--batch-size", "8",
                 "--set", "train.eval_interval=60", "--set", "train.warmup_steps=5"]) == 0
    pairs = [{"question": f"第{i}个问题是什么？", "response_chosen": "答案是好。", "response_rejected": "答案是坏，不好。"}
             for i in range(200)]
    return root / "sft", _write(root / "pairs.jsonl", pairs)


def _dpo(sft, pairs, out, *extra):
    return main(["dpo", "--ckpt", str(sft), "--data", str(pairs), "--out", str(out), "--device", "cpu",
                 "--batch-size", "8", "--val-fraction", "0.1", "--set", "train.eval_interval=10",
                 "--set", "train.eval_batches=2", "--set", "train.ckpt_interval=10", "--set", "train.log_interval=1",
                 "--set", "train.warmup_steps=2", *extra])


def test_dpo_starts_at_ln2_and_learns_the_preference(sft_run, tmp_path):
    sft, pairs = sft_run
    assert _dpo(sft, pairs, tmp_path / "dpo", "--max-steps", "20", "--lr", "1e-3") == 0
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").open()]
    val = [r for r in records if "val_loss" in r]
    train = [r for r in records if "loss" in r]
    assert val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is its reference
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)
    assert val[-1]["val_loss"] < 0.5 and val[-1]["val_pref_accuracy"] == 1.0
    assert val[-1]["val_reward_margin"] > 0
    # the reference's own accuracy was chance: the SFT model says either reply half the time
    assert val[0]["val_pref_accuracy"] < 1.0


def test_dpo_resumes_exactly_and_takes_lora_and_ipo(sft_run, tmp_path):
    sft, pairs = sft_run
    args = ("--lora", "--loss", "ipo", "--max-steps", "6", "--set", "train.ckpt_interval=3")
    assert _dpo(sft, pairs, tmp_path / "whole", *args) == 0
    assert _dpo(sft, pairs, tmp_path / "halves", *args, "--stop-at-step", "3") == 0
    assert main(["dpo", "--ckpt", str(sft), "--data", str(pairs), "--out", str(tmp_path / "halves"), "--resume",
                 "--device", "cpu"]) == 0  # beta, loss, split and lora: the run's own
    a = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "whole"))
    b = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "halves"))
    assert set(a) == set(b) and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [[json.loads(line).get("loss") for line in (tmp_path / run / "metrics.jsonl").open()]
              for run in ("whole", "halves")]
    assert [x for x in losses[0] if x is not None] == [x for x in losses[1] if x is not None]
    assert main(["dpo", "--ckpt", str(sft), "--data", str(pairs), "--out", str(tmp_path / "halves"), "--resume",
                 "--device", "cpu", "--loss", "sigmoid", "--max-steps", "8"]) == 2  # not silently another loss
