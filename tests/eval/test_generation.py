"""Generation evaluation: the metrics on hand-checked strings (Chinese included, where rouge-score's
own tokenizer sees nothing), and `babyllama eval gen` end to end on a tiny model: every SFT layout
read, the prompt cut before the last assistant turn, answers the Engine gives, results written;
mistakes are one error line naming the file and line."""

import json
import math

import pytest

from babyllama.cli import main
from babyllama.config import ConfigError
from babyllama.eval.generation import (GenerationEvalConfig, bleu, distinct_n, exact_match, generation_metrics,
                                       repeated_ngram_rate, rouge_l, sentence_bleu)

# --- metrics ---------------------------------------------------------------------------------------

IDENTICAL = (["今天天气很好，我们去公园散步吧。", "好", "价格便宜，质量不错"],
             ["今天天气很好，我们去公园散步吧。", "好", "价格便宜，质量不错"])
DISJOINT = (["今天天气很好", "你好"], ["明月几时有", "再见"])


@pytest.mark.parametrize("metric", [bleu, rouge_l, exact_match])
def test_identical_texts_score_one_and_disjoint_texts_zero(metric):
    assert metric(*IDENTICAL) == pytest.approx(1.0)
    assert metric(*DISJOINT) == 0.0


def test_bleu_of_short_answers_is_not_a_flat_zero():
    # answers under four characters have no 4-grams: plain corpus BLEU would be 0 even when all are right
    assert bleu(["正面", "负面"], ["正面", "负面"]) == pytest.approx(1.0)
    assert bleu(["正面", "负面"], ["负面", "正面"]) < 1.0


def test_bleu_counts_chinese_characters_as_tokens():
    # by hand: 1-grams 5/6 (今天天气好), 2-grams 3/5 (今天 天天 天气), 3-grams 2/4, 4-grams 1/3; same length
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["今天天气很好"], ["今天天气不好"]) == pytest.approx(expected, rel=1e-9)
    assert sentence_bleu("今天天气很好", "今天天气不好") == pytest.approx(expected, rel=1e-9)
    assert sentence_bleu("今天天气很好", "今天天气很好") == pytest.approx(1.0)


def test_rouge_l_on_chinese_uses_characters_where_rouge_scores_own_tokenizer_gives_zero():
    from rouge_score.rouge_scorer import RougeScorer

    hyp, ref = "今天天气很好", "今天天气不好"
    assert RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure == 0  # the bug it would be
    # longest common subsequence 今天天气好: 5 of 6 characters on both sides
    assert rouge_l([hyp], [ref]) == pytest.approx(5 / 6)
    # per answer, then averaged; whitespace is not a character
    assert rouge_l([hyp, "今天 天气"], [ref, "今天天气"]) == pytest.approx((5 / 6 + 1) / 2)
    # precision and recall differ: LCS 3 of a 3-character answer and a 6-character reference
    assert rouge_l(["今天好"], ["今天天气很好"]) == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(["答案 ", "答 案", "x"], ["答案", "答案", "y"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_distinct_n_counts_over_all_answers_and_not_across_their_boundaries():
    texts = ["好的好的", "谢谢"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # 好 的 谢 of 好的好的谢谢
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # 好的 的好 (好的) 谢谢: no 的谢 across answers
    assert distinct_n(["同样的回答", "同样的回答"], 2) == pytest.approx(0.5)
    assert distinct_n(["", "好"], 2) == 0.0  # no bigrams at all


def test_repeated_ngram_rate_counts_repeats_inside_each_answer():
    # 好的好的好的: bigrams 好的 的好 好的 的好 好的, 3 repeats of 5; 今天天气: 3 bigrams, none repeated
    assert repeated_ngram_rate(["好的好的好的", "今天天气"], 2) == pytest.approx(3 / 8)
    # the same sentence in two answers is variety lost (distinct-n), not looping
    assert repeated_ngram_rate(["我们去公园散步", "我们去公园散步"], 4) == 0.0


def test_a_looping_answer_has_a_high_repeated_rate_and_a_varied_one_none():
    looping = "我觉得这个很好。" * 10
    varied = "今天天气很好，我们去公园散步，然后回家吃饭。"
    metrics = generation_metrics([looping], [varied])
    assert metrics["repeated_4gram_rate"] > 0.85
    assert metrics["distinct_2"] < 0.15
    assert generation_metrics([varied], [varied])["repeated_4gram_rate"] == 0.0
    assert metrics["mean_answer_chars"] == 80 and metrics["mean_reference_chars"] == len(varied)


def test_the_config_refuses_bad_values_naming_the_flag():
    for kwargs, flag in [({"max_samples": 0}, "--max-samples"), ({"batch_size": 0}, "--batch-size"),
                         ({"max_new_tokens": 0}, "--max-new-tokens"), ({"temperature": -1.0}, "--temperature"),
                         ({"layout": "nope"}, "--layout"), ({"out": "r.jsonl"}, "--out"), ({"data": []}, "--data")]:
        with pytest.raises(ConfigError, match=flag):
            GenerationEvalConfig(**{"ckpt": "run", "data": ["x.jsonl"], **kwargs})


# --- the command -----------------------------------------------------------------------------------

def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def sft_files(tmp_path):
    """Three layouts; the ShareGPT file has a system prompt, several turns and a too-long prompt."""
    sharegpt = _write_jsonl(tmp_path / "chat.jsonl", [
        {"system": "你是助手", "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                                                {"from": "human", "value": "今天天气怎么样"},
                                                {"from": "gpt", "value": "今天天气很好。"}]},
        {"conversations": [{"from": "human", "value": "经济发展" * 40}, {"from": "gpt", "value": "很快。"}]},
        {"conversations": [{"from": "human", "value": "这本书好看吗"}, {"from": "gpt", "value": "好看。"}]},
    ])
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "翻译成英文", "input": "中国", "output": "China", "history": [["一加一", "二"]]},
        {"instruction": "评价这个商品", "input": "", "output": "质量不错。"},
    ])
    csv = tmp_path / "pairs.csv"
    csv.write_text("question,answer\n中国人民,勤劳勇敢\n今天天气,晴朗\n价格,便宜\n", encoding="utf-8")
    return [sharegpt, alpaca, csv]


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_command_answers_every_layout_and_writes_the_run_eval(tiny_run, sft_files, capsys):
    from babyllama.infer import Engine, SamplingConfig
    from babyllama.tokenizer.chat import Message

    run, _ = tiny_run  # tests/eval/conftest.py: max_seq_len 64
    assert main(["eval", "gen", "--ckpt", str(run), "--data", *map(str, sft_files), "--max-new-tokens", "6",
                 "--max-samples", "6", "--batch-size", "3"]) == 0
    out = capsys.readouterr()
    assert "ROUGE-L" in out.out and "1 of 6 prompts were longer than the context" in out.out
    assert "were dropped" not in out.err  # the cut prompt is counted once, not warned about
    summary_file = run / "eval" / "gen-chat+alpaca+pairs.json"
    result = json.loads(summary_file.read_text(encoding="utf-8"))
    assert result["kind"] == "gen" and result["samples"] == 6 and result["max_new_tokens"] == 6
    assert result["sampling"]["temperature"] == 0 and result["sampling"]["repetition_penalty"] == 1.0
    assert result["outputs"] == "gen-chat+alpaca+pairs.jsonl" and result["prompts_cut"] == 1
    assert set(result["metrics"]) == {"bleu", "rouge_l", "exact_match", "distinct_1", "distinct_2",
                                      "repeated_4gram_rate", "mean_answer_chars", "mean_reference_chars"}
    assert all(0 <= v <= 1 for k, v in result["metrics"].items() if not k.startswith("mean_"))
    records = _records(run / "eval" / result["outputs"])
    assert len(records) == 6  # --max-samples: the first 6 of 8, in order
    assert [r["reference"] for r in records] == ["今天天气很好。", "很快。", "好看。", "China", "质量不错。", "勤劳勇敢"]
    # the prompt is everything before the last assistant turn: system prompt and earlier turns included
    assert records[0]["prompt"] == [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                                    {"role": "assistant", "content": "你好！"},
                                    {"role": "user", "content": "今天天气怎么样"}]
    assert records[3]["prompt"] == [{"role": "user", "content": "一加一"}, {"role": "assistant", "content": "二"},
                                    {"role": "user", "content": "翻译成英文\n中国"}]
    assert records[5]["prompt"] == [{"role": "user", "content": "中国人民"}]
    # the answers are the Engine's greedy replies, whatever the batch (prompts are grouped by length)
    engine = Engine.load(run, "cpu")
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    again = engine.reply_batch([[Message(**m) for m in r["prompt"]] for r in (records[4], records[0])], 6, greedy)
    assert again == [records[4]["answer"], records[0]["answer"]]
    # the summary's metrics are those of the saved answers
    answers, refs = [r["answer"] for r in records], [r["reference"] for r in records]
    for name, value in generation_metrics(answers, refs).items():
        assert math.isclose(result["metrics"][name], value, rel_tol=1e-12)


def test_out_puts_the_json_there_and_the_answers_beside_it(tiny_run, sft_files, tmp_path):
    run, _ = tiny_run
    ckpt_dir = next((run / "checkpoints").glob("step-*"))
    out = tmp_path / "results" / "mine.json"
    assert main(["eval", "gen", "--ckpt", str(ckpt_dir), "--data", f"{sft_files[2]}::csv", "--max-new-tokens", "4",
                 "--out", str(out), "--temperature", "0.8", "--seed", "3"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["samples"] == 3 and result["sampling"]["seed"] == 3 and result["checkpoint"] == str(ckpt_dir)
    assert len(_records(out.with_suffix(".jsonl"))) == 3
    assert not (run / "eval").exists()


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("babyllama: error:"), err
    return lines[0]


def test_bad_input_is_one_error_line_naming_the_file_and_line(tiny_run, sft_files, tmp_path, capsys):
    run_dir, _ = tiny_run
    run = str(run_dir)
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]})
    bad.write_text(f"{good}\n{good}\n{{\"messages\": [\n{good}\n", encoding="utf-8")
    assert main(["eval", "gen", "--ckpt", run, "--data", str(bad)]) == 2
    error = _one_error(capsys)
    assert "bad.jsonl: line 3" in error and "malformed JSON" in error
    # --on-error skip: counted and the rest evaluated
    assert main(["eval", "gen", "--ckpt", run, "--data", str(bad), "--on-error", "skip", "--max-new-tokens", "2"]) == 0
    assert "malformed records skipped: 1" in capsys.readouterr().out
    assert json.loads((run_dir / "eval" / "gen-bad.json").read_text(encoding="utf-8"))["samples"] == 3

    missing = tmp_path / "missing.jsonl"
    assert main(["eval", "gen", "--ckpt", run, "--data", str(missing)]) == 2
    assert "missing.jsonl: no such file" in _one_error(capsys)
    no_reply = _write_jsonl(tmp_path / "noreply.jsonl", [{"messages": [{"role": "user", "content": "你好"}]}])
    assert main(["eval", "gen", "--ckpt", run, "--data", str(no_reply)]) == 2
    assert "noreply.jsonl: line 1: no assistant reply" in _one_error(capsys)
    assert main(["eval", "gen", "--ckpt", run, "--data", str(sft_files[0]), "--max-samples", "0"]) == 2
    assert "--max-samples" in _one_error(capsys)
    ckpt_dir = tmp_path / "loose"  # a checkpoint outside a run directory: nowhere to put the results
    assert main(["eval", "gen", "--ckpt", str(ckpt_dir), "--data", str(sft_files[0])]) == 2
    assert "--out" in _one_error(capsys)
