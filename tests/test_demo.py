"""The demo's learning curve (pretrained vs random weights on a few labelled reviews), in a tiny setting."""

import json

import pytest
import torch

from babyllama.checkpoint import save_checkpoint
from babyllama.config import ConfigError
from babyllama.data.builtin import write_review_sample
from tests.conftest import tiny_model_config


def _reviews(path, pos: int, neg: int):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(pos):
            f.write(json.dumps({"text": f"好评{i}", "label": "positive"}, ensure_ascii=False) + "\n")
        for i in range(neg):
            f.write(json.dumps({"text": f"差评{i}", "label": "negative"}, ensure_ascii=False) + "\n")
    return path


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_review_sample_is_balanced_nested_and_seeded(tmp_path):
    src = _reviews(tmp_path / "r.jsonl", 30, 10)
    small = _read(write_review_sample(src, 10, tmp_path / "a.jsonl"))
    large = _read(write_review_sample(src, 30, tmp_path / "b.jsonl"))
    assert [r["label"] for r in small].count("positive") == 5
    assert large[:10] == small  # a larger sample adds reviews to the smaller one
    assert [r["label"] for r in large].count("negative") == 10  # all of the rarer label, then the other
    assert _read(write_review_sample(src, 10, tmp_path / "c.jsonl")) == small
    assert _read(write_review_sample(src, 10, tmp_path / "d.jsonl", seed=1)) != small
    assert len(_read(write_review_sample(src, 100, tmp_path / "e.jsonl"))) == 40  # all there is
    unbalanced = _read(write_review_sample(src, 40, tmp_path / "f.jsonl", balanced=False))
    assert sorted(map(json.dumps, unbalanced)) == sorted(map(json.dumps, _read(src)))


def test_curve_flag_parsing():
    from babyllama.demo import DemoConfig

    assert DemoConfig(curve="").curve_sizes() == []
    assert DemoConfig(curve=" 300, 100,100 ").curve_sizes() == [100, 300]
    assert DemoConfig().curve_sizes() == [100, 300, 1000]
    for bad in ("abc", "100,", "4", "-100", "1e3"):
        with pytest.raises(ConfigError, match="--curve"):
            DemoConfig(curve=bad)


@pytest.fixture
def tiny_demo(tmp_path, tokenizer):
    """A demo directory with a (random-weight, tiny) 'pretrained' model and a small review corpus."""
    from babyllama.model import Llama

    out = tmp_path / "demo"
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    save_checkpoint(out / "pretrain", 0, Llama(cfg), cfg)
    tokenizer.save(out / "pretrain" / "tokenizer")
    (out / "corpus").mkdir()
    corpus = {"reviews": str(_reviews(out / "corpus" / "reviews_train.jsonl", 40, 40)),
              "heldout": str(_reviews(out / "corpus" / "reviews_heldout.jsonl", 12, 12))}
    return out, corpus


def test_learning_curve_writes_json_and_plot_and_is_reused(tiny_demo, monkeypatch, capsys):
    import babyllama.demo as demo

    out, corpus = tiny_demo
    # seconds, not minutes: the code path, not the accuracy (one pass: 16 reviews in 2 steps, 48 in 6)
    for name, value in (("CURVE_EPOCHS", 1), ("CURVE_MIN_STEPS", 1), ("CURVE_MAX_STEPS", 100)):
        monkeypatch.setattr(demo, name, value)
    cfg = demo.DemoConfig(out=str(out), curve="16,48")
    full = {"accuracy_pretrained": 0.85, "accuracy_scratch": 0.84, "heldout": 2000, "sft_steps": 1000}
    curve = demo.run_learning_curve(cfg, out, corpus, full, heldout=20)

    saved = json.loads((out / "learning_curve.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(curve))
    assert (out / "learning_curve.png").stat().st_size > 1000 and curve["plot"] == "learning_curve.png"
    assert curve["heldout"] == 20
    points = curve["points"]
    assert [p["n"] for p in points] == [16, 48, None]  # no sft/ run here: the "all" size is unknown
    assert points[-1]["all"] and points[-1]["accuracy_pretrained"] == 0.85 and points[-1]["heldout"] == 2000
    for p in points[:2]:
        assert 0 <= p["accuracy_pretrained"] <= 1 and 0 <= p["accuracy_scratch"] <= 1
        assert p["steps"] == p["steps_pretrained"] == p["steps_scratch"] == p["n"] // demo.CURVE_BATCH
        assert p["heldout"] == 20
    for name in ("pretrained-16", "scratch-16", "pretrained-48", "scratch-48"):
        assert (out / "curve" / name / "run_config.toml").is_file()
    table = demo.format_learning_curve(curve)
    assert "pretrained" in table and "all" in table and len(table.splitlines()) == 5

    capsys.readouterr()
    again = demo.run_learning_curve(cfg, out, corpus, full, heldout=20)  # a rerun trains and scores nothing
    assert capsys.readouterr().out.count("reusing") == 4
    assert again["points"] == curve["points"]

    assert demo.run_learning_curve(demo.DemoConfig(out=str(out), curve=""), out, corpus, full) == {}


@pytest.mark.slow
def test_the_demo_ends_with_its_evaluations_and_a_run_report(tmp_path, tokenizer, data_dir, monkeypatch):
    """evaluate_demo on tiny real runs: perplexity at 256 and 512 tokens, generation metrics of both
    fine-tuned models, and one report (Markdown + self-contained HTML) holding them and the curve."""
    import babyllama.demo as demo
    from babyllama.config import RunConfig, TrainConfig
    from babyllama.finetune.sft import SFTJob, default_sft_train, sft
    from babyllama.train.pretrain import PretrainJob, pretrain

    out = tmp_path / "demo"
    run_cfg = RunConfig(model=tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64),
                        train=TrainConfig(max_steps=4, batch_size=2, eval_interval=2, eval_batches=1, device="cpu"))
    pretrain(PretrainJob(data=str(data_dir), out=str(out / "pretrain"), config=run_cfg, progress=False))
    (out / "corpus").mkdir()
    corpus = {"reviews": str(_reviews(out / "corpus" / "reviews_train.jsonl", 40, 40)),
              "heldout": str(_reviews(out / "corpus" / "reviews_heldout.jsonl", 6, 6))}
    sft_data = demo_sft = out / "corpus" / "sentiment_sft.jsonl"
    from babyllama.data.builtin import write_sentiment_sft

    write_sentiment_sft(corpus["reviews"], sft_data)
    from babyllama.config import LoraConfig

    for name, scratch, lora in (("sft", False, None), ("sft_scratch", True, None), ("sft_lora", False, LoraConfig())):
        train = default_sft_train()
        train.max_steps, train.batch_size, train.eval_interval, train.device = 3, 4, 3, "cpu"
        sft(SFTJob(ckpt=str(out / "pretrain"), data=[str(demo_sft)], out=str(out / name), train=train,
                   from_scratch=scratch, progress=False, lora=lora))
    (out / "report.json").write_text(json.dumps({"accuracy_pretrained": 0.8, "accuracy_lora": 0.78}))
    curve = {"points": [{"n": 16, "all": False, "accuracy_pretrained": 0.6, "accuracy_scratch": 0.5, "steps": 1,
                         "steps_pretrained": 1, "steps_scratch": 1, "heldout": 12}], "heldout": 12, "plot": None}
    (out / "learning_curve.json").write_text(json.dumps(curve), encoding="utf-8")
    monkeypatch.setattr(demo, "format_learning_curve", lambda c: "n  pretrained  scratch\n16  60.0%  50.0%")

    result = demo.evaluate_demo(demo.DemoConfig(out=str(out)), out, corpus, data_dir)
    assert [r["length"] for r in result["perplexity"]["results"]] == [256, 512]
    assert all(r["beyond_trained"] for r in result["perplexity"]["results"])  # a 64-token model
    assert set(result["generation"]) == {"sft", "sft_scratch", "sft_lora"}
    assert (out / "sft" / "eval" / "gen-sentiment_heldout.jsonl").is_file()
    html = (out / "report.html").read_text(encoding="utf-8")
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for text in (html, markdown):
        assert "Learning curve" in text and "perplexity" in text.lower() and "sft_scratch" in text
        assert "LoRA against full fine-tuning" in text and "78.0%" in text and "sft_lora" in text
    assert result["report"]["html"] == str(out / "report.html")


@pytest.mark.slow
def test_the_alignment_stage_measures_three_models_and_is_reused(tiny_demo, data_dir, monkeypatch, capsys):
    """run_alignment on a tiny model, in seconds: GRPO and DPO runs from the pretrained model, the
    same figures for all three, alignment.json, the report's section; a rerun trains nothing."""
    import babyllama.demo as demo

    out, _ = tiny_demo
    corpus = {}
    for split, n in (("reviews", 40), ("heldout", 20)):
        path = out / "corpus" / f"long_{split}.jsonl"
        path.write_text("".join(json.dumps({"text": f"这家店的服务很好，价格也实惠，第{i}次来了，下次还会再来。",
                                            "label": "positive"}, ensure_ascii=False) + "\n" for i in range(n)),
                        encoding="utf-8")
        corpus[split] = str(path)
    for name, value in (("ALIGN_HELDOUT", 6), ("ALIGN_DPO_PAIRS", (12, 6)), ("ALIGN_NEW_TOKENS", 8),
                        ("ALIGN_GRPO_STEPS", 2), ("ALIGN_DPO_STEPS", 2), ("ALIGN_LOOPING", 0.0)):
        monkeypatch.setattr(demo, name, value)
    cfg = demo.DemoConfig(out=str(out))
    results = demo.run_alignment(cfg, out, corpus, data_dir, "8/9")
    for name in ("pretrain", "grpo", "dpo"):
        row = results[name]
        for mode in ("greedy", "t0.5"):
            assert 0 <= row[mode]["repeated_4gram_rate"] <= 1 and 0 <= row[mode]["reward"] <= 1
        assert row["perplexity"] > 1 and row["preference"]["pairs"] == 6
        assert 0 <= row["preference"]["accuracy"] <= 1
    assert results["grpo"]["settings"]["algo"] == "grpo" and results["grpo"]["settings"]["chat"] is False
    assert results["grpo"]["kl_last_steps"] >= 0
    # the policy as loaded is its own reference: DPO's first logged loss is ln 2
    first = next(r for r in map(json.loads, (out / "dpo" / "metrics.jsonl").open()) if "loss" in r)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert json.loads((out / "alignment.json").read_text(encoding="utf-8")) == json.loads(json.dumps(results))
    section = demo.alignment_section(results)
    assert [row[0] for row in section.table[1]] == ["pretrained", "after GRPO", "after DPO"]
    assert "GRPO" in demo.format_alignment(results)
    capsys.readouterr()
    demo.run_alignment(cfg, out, corpus, data_dir, "8/9")
    assert capsys.readouterr().out.count("reusing") == 2
