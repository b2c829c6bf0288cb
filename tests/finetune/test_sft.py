import json

import pytest
import torch

from babyllama.corpus.readers import DataError
from babyllama.data.sft import SFTStats, fit_to_window
from babyllama.finetune.sft import SFTJob, default_sft_train, sft
from babyllama.infer.chat import fit_history, repl
from babyllama.infer.engine import Engine
from babyllama.infer.sampling import SamplingConfig
from babyllama.tokenizer.chat import IGNORE, ChatTemplate, Message
from babyllama.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer):
    """A (random-weight) 'pretrained' run directory: checkpoint + tokenizer."""
    from babyllama.model import Llama

    root = tmp_path_factory.mktemp("base")
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    save_checkpoint(root, 0, Llama(cfg), cfg)
    tokenizer.save(root / "tokenizer")
    return root


def test_truncation_keeps_the_last_reply_whole():
    ids = list(range(20))
    labels = [IGNORE] * 5 + list(range(5, 9)) + [IGNORE] * 7 + list(range(16, 20))
    stats = SFTStats()
    new_ids, new_labels = fit_to_window(ids, labels, 10, stats, header=2)
    assert new_ids == list(range(10, 20)) and new_labels[-4:] == [16, 17, 18, 19]
    assert all(l == IGNORE for l in new_labels[:-4]) and stats.truncated_prompt == 1
    # a reply longer than the window is cut at its end, and counted
    labels = [IGNORE] * 4 + list(range(4, 20))
    new_ids, new_labels = fit_to_window(ids, labels, 10, stats, header=2)
    assert new_ids == list(range(2, 12)) and stats.truncated_reply == 1


def test_sft_loss_falls_and_masks_prompts(base_run, tmp_path, tokenizer):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"第{i}个问题是什么？", "response": "答案是好。"} for i in range(200)]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    train = default_sft_train()
    train.max_steps, train.batch_size, train.lr, train.eval_interval, train.device = 30, 8, 3e-3, 30, "cpu"
    summary = sft(SFTJob(ckpt=str(base_run), data=[str(data)], out=str(tmp_path / "sft"), train=train,
                         val_fraction=0.1, progress=False))
    (_, v0), (_, v1) = summary["val"][0], summary["val"][-1]
    assert v1 < v0 / 3  # the constant answer is learnt
    assert summary["data"]["train"] + summary["data"]["val"] == 200
    engine = Engine.load(tmp_path / "sft", "cpu")
    reply = engine.reply([Message("user", "第1000个问题是什么？")], 20,
                       SamplingConfig(temperature=0))
    assert reply == "答案是好。"


def test_empty_sft_data_is_an_error(base_run, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "response": ""}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable conversations .*bad.jsonl: line 1"):
        sft(SFTJob(ckpt=str(base_run), data=[str(data)], out=str(tmp_path / "o"), progress=False))


def test_history_is_trimmed_from_the_oldest_turn(tokenizer):
    tpl = ChatTemplate(tokenizer)
    msgs = [Message("system", "系统")] + [Message(r, f"第{i}轮内容" * 3) for i in range(6)
                                        for r in ("user", "assistant")] + [Message("user", "最新的问题")]
    kept = fit_history(tpl, msgs, 60)
    assert kept[0].role == "system" and kept[-1].content == "最新的问题"
    assert len(tpl.prompt_ids(kept)) <= 60 and len(kept) < len(msgs)


def test_repl_commands(base_run):
    engine = Engine.load(base_run, "cpu")
    lines = iter(["/system 你是医生", "你好", "/reset", "/bogus", "/exit"])
    out = []
    repl(engine, SamplingConfig(temperature=0), 5, read=lambda prompt: next(lines), write=out.append)
    text = "".join(out)
    assert "(system prompt set)" in text and "(conversation cleared)" in text and "unknown command" in text
    assert "助手> " in text


def test_sft_batches_cover_every_sample_once_and_group_lengths():
    from babyllama.data.sft import SFTBatches, SFTSample

    samples = [SFTSample(list(range(1, n + 1)), [IGNORE] + list(range(2, n + 1))) for n in range(2, 402)]
    b = SFTBatches(samples, 4, pad_id=0, seed=1)
    seen, padding = [], 0
    for _ in range(100):
        x, y = b.next_batch()
        seen += [int((row != 0).sum()) for row in x]  # each row's length identifies its sample
        padding += int((y == IGNORE).sum()) - len(x)
    assert sorted(seen) == list(range(1, 401)) and b.epoch == 0
    assert padding < 0.1 * sum(seen)  # grouped by length: little padding
    state = b.state_dict()
    after = b.next_batch()[0]
    b2 = SFTBatches(samples, 4, pad_id=0, seed=1)
    b2.load_state_dict(state)
    assert torch.equal(b2.next_batch()[0], after)


def test_cli_prepared_data_and_packed_sft(base_run, tmp_path):
    """`babyllama data sft` then `babyllama sft --data DIR --pack`: the answer is learnt, and the
    packed rows held several conversations each."""
    from babyllama.cli import main

    data = tmp_path / "qa.json"  # a JSON array this time
    data.write_text(json.dumps([{"question": f"第{i}个问题？", "response": "好的。"} for i in range(300)],
                               ensure_ascii=False), encoding="utf-8")
    assert main(["data", "sft", "--input", str(data), "--tokenizer", str(base_run / "tokenizer"),
                 "--out", str(tmp_path / "ds"), "--max-len", "200"]) == 0  # longer than the model's 64: re-cut
    assert main(["sft", "--ckpt", str(base_run), "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
                 "--pack", "--batch-size", "2", "--max-steps", "60", "--lr", "3e-3", "--device", "cpu",
                 "--set", "train.eval_interval=60", "--set", "train.warmup_steps=5"]) == 0
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").open()]
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert val[-1] < val[0] / 3
    # 2 rows of 64 tokens per step, each conversation ~15 tokens: far more than 2 conversations a step
    steps = [r for r in metrics if "loss" in r]
    assert steps[-1]["tokens"] / steps[-1]["step"] > 100
    engine = Engine.load(tmp_path / "run", "cpu")
    assert engine.reply([Message("user", "第999个问题？")], 10,
                      SamplingConfig(temperature=0)) == "好的。"
