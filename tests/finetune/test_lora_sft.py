"""`babyllama sft --lora` end to end: only the adapter trains and is saved (a PEFT directory naming
its base), it resumes exactly, and every stage that loads a model takes the adapter run."""

import json

import pytest
import torch
from safetensors.torch import load_file

import babyllama.checkpoint as ckpt_io
from babyllama.cli import main
from babyllama.infer.engine import Engine
from babyllama.infer.sampling import SamplingConfig
from babyllama.tokenizer.chat import Message
from babyllama.transforms import applied
from tests.conftest import tiny_model_config


def _qa(path, answer, other=None):
    rows = [{"question": f"第{i}个问题是什么？", "response": other if other and i % 2 else answer} for i in range(200)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return _qa(tmp_path_factory.mktemp("qa") / "qa.jsonl", "答案是好。")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer):
    """A trained base: fully fine-tuned to answer 答案是好。 or 答案是坏。 at random, which the
    adapters then make always 答案是好。 (a tiny model with frozen random embeddings learns little else)."""
    from babyllama.model import Llama

    root = tmp_path_factory.mktemp("base")
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    ckpt_io.save_checkpoint(root / "random", 0, Llama(cfg), cfg)
    tokenizer.save(root / "random" / "tokenizer")
    assert _sft(root / "random", _qa(root / "mixed.jsonl", "答案是坏。", "答案是好。"), root / "run",
                "--max-steps", "60", "--lr", "3e-3") == 0
    return root / "run"


def _sft(base_run, qa, out, *extra):
    return main(["sft", "--ckpt", str(base_run), "--data", str(qa), "--out", str(out), "--device", "cpu",
                 "--batch-size", "8", "--set", "train.eval_interval=40", "--set", "train.ckpt_interval=20",
                 "--set", "train.warmup_steps=5", *extra])


def test_lora_sft_learns_saves_only_the_adapter_and_every_stage_takes_it(base_run, qa, tmp_path):
    out = tmp_path / "lora"
    assert _sft(base_run, qa, out, "--lora", "--max-steps", "40") == 0  # the default LoRA learning rate
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert val[-1] < val[0]
    ckpt = ckpt_io.find_checkpoint(out)
    assert not (ckpt / "model.safetensors").exists()
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    rows = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"  # the chat markers' rows
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter if k != rows) and len(adapter) == 2 * 7 * 2 + 2 + 1
    assert "base_model.model.lm_head.lora_B.weight" in adapter
    assert adapter[rows].shape == (2, 64)
    assert json.loads((ckpt / "config.json").read_text())["base"] == str(ckpt_io.find_checkpoint(base_run))
    config = (out / "run_config.toml").read_text()
    assert "[lora]" in config and "rank = 8" in config and "lr = 0.002" in config
    # generate and chat: the adapter run as --ckpt (merged on loading); the base answered either way
    questions = [[Message("user", f"第{1000 + i}个问题是什么？")] for i in range(8)]
    greedy = SamplingConfig(temperature=0)
    before = Engine.load(base_run, "cpu").reply_batch(questions, 20, greedy)
    after = Engine.load(out, "cpu").reply_batch(questions, 20, greedy)
    assert "答案是坏。" in before and after == ["答案是好。"] * 8
    # merge: plain weights with the same outputs
    assert main(["lora", "merge", "--ckpt", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged, merged_ckpt = ckpt_io.load_model(tmp_path / "merged")
    unmerged, _ = ckpt_io.load_model(out)
    assert applied(merged) == [] and applied(unmerged)[0]["name"] == "lora"
    tokens = torch.randint(0, 500, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), unmerged(tokens), rtol=1e-5, atol=1e-5)
    # eval takes it too, and gives the merged model's figures
    for run, name in ((out, "a"), (tmp_path / "merged", "b")):
        assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(qa), "--lengths", "32", "--device", "cpu", "--layout", "field:question",
                     "--out", str(tmp_path / f"{name}.json")]) == 0
    ppl = [json.loads((tmp_path / f"{n}.json").read_text())["results"][0]["perplexity"] for n in "ab"]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)
    # a LoRA run over an adapter run is refused: merge first
    assert _sft(out, qa, tmp_path / "again", "--lora", "--max-steps", "2") == 2


def test_lora_sft_resumes_exactly(base_run, qa, tmp_path):
    args = ("--dora", "--lora-rank", "4", "--lora-targets", "q,v,down", "--lora-train", "norms", "--max-steps", "8",
            "--set", "train.ckpt_interval=4")
    assert _sft(base_run, qa, tmp_path / "whole", *args) == 0
    assert _sft(base_run, qa, tmp_path / "halves", *args, "--stop-at-step", "4") == 0
    assert main(["sft", "--ckpt", str(base_run), "--data", str(qa), "--out", str(tmp_path / "halves"), "--resume",
                 "--device", "cpu"]) == 0  # the run's own [lora] and [train] settings
    a = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "whole"))
    b = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "halves"))
    assert set(a) == set(b) and any(".lora_magnitude." in k for k in a) and any(k.endswith("norm.weight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # resuming with other adapter settings is refused, not silently mixed
    assert main(["sft", "--ckpt", str(base_run), "--data", str(qa), "--out", str(tmp_path / "halves"), "--resume",
                 "--device", "cpu", "--lora-rank", "8", "--max-steps", "12"]) == 2


def test_pretrain_lora_continues_from_init(data_dir, tmp_path):
    base = tmp_path / "base"
    flags = ["--data", str(data_dir), "--device", "cpu", "--set", "model.dim=32", "--set", "model.n_layers=1",
             "--set", "model.max_seq_len=32", "--batch-size", "4", "--set", "train.eval_interval=10"]
    assert main(["pretrain", "--out", str(base), "--max-steps", "5", *flags]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "nolinit"), "--lora", "--max-steps", "2", *flags]) == 2
    assert main(["pretrain", "--out", str(tmp_path / "cont"), "--init", str(base), "--lora", "--lora-targets", "o",
                 "--max-steps", "10", *flags]) == 0
    ckpt = ckpt_io.find_checkpoint(tmp_path / "cont")
    assert set(load_file(str(ckpt / "adapter_model.safetensors"))) == {
        "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"}
