"""`babyllama eval pref`: preference accuracy against a pair-by-pair computation, one error line for bad input."""

import json

import pytest
import torch

from babyllama.cli import main
from babyllama.tokenizer.chat import ChatTemplate, Message

PAIRS = [("今天天气怎么样？", "今天天气很好。", "好好好好好"), ("这本书好看吗？", "好看，推荐。", "不知道"),
         ("你好", "你好！", "再见再见再见"), ("评价一下这家店", "服务很好，价格实惠。", "差")]


def _logp(model, template, prompt, reply) -> float:
    """log p(reply | prompt) summed over the tokens the template trains on (the reply and its closing
    marker), one sequence alone, from full logits."""
    ids, labels = template.encode([Message("user", prompt), Message("assistant", reply)])
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).double(), -1)[0]
    return sum(logps[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)


def test_accuracy_and_margin_equal_a_pair_by_pair_computation(tiny_run, tokenizer, tmp_path, capsys):
    run, model = tiny_run
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                            for p, c, r in PAIRS), encoding="utf-8")
    assert main(["eval", "pref", "--ckpt", str(run), "--data", str(data), "--batch-size", "3"]) == 0
    assert "4 pairs" in capsys.readouterr().out
    result = json.loads((run / "eval" / "pref-pairs.json").read_text(encoding="utf-8"))
    template = ChatTemplate(tokenizer)
    model.eval()
    margins = [_logp(model, template, p, c) - _logp(model, template, p, r) for p, c, r in PAIRS]
    assert result["pairs"] == 4
    assert result["metrics"]["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 4)
    assert result["metrics"]["mean_margin"] == pytest.approx(sum(margins) / 4, rel=1e-4)
    assert 0 < sum(m > 0 for m in margins) < 4  # a random model gets some right and some wrong: both paths tested


def test_bad_pairs_are_one_error_line(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "一", "chosen": "二", "rejected": "三"}\n{"prompt": "一", "chosen": "二"}\n',
                   encoding="utf-8")
    assert main(["eval", "pref", "--ckpt", str(run), "--data", str(bad)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "bad.jsonl: line 2" in err[0], err
