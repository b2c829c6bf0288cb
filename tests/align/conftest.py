"""A tiny SFT run shared by the RL tests (GRPO and PPO)."""

import json

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.cli import main
from babyllama.model import Llama
from tests.conftest import tiny_model_config


@pytest.fixture(scope="package")
def sft_run(tmp_path_factory, tokenizer):
    """A tiny model that answers 答案是好。 or 答案是坏，不好。 at random."""
    root = tmp_path_factory.mktemp("grpo")
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    ckpt_io.save_checkpoint(root / "random", 0, Llama(cfg), cfg)
    tokenizer.save(root / "random" / "tokenizer")
    rows = [{"question": f"第{i}个问题是什么？", "response": "答案是好。" if i % 2 else "答案是坏，不好。"} for i in range(200)]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert main(["sft", "--ckpt", str(root / "random"), "--data", str(root / "sft.jsonl"), "--out", str(root / "sft"),
                 "--device", "cpu", "--max-steps", "80", "--lr", "3e-3", "--batch-size", "8",
                 "--set", "train.eval_interval=80", "--set", "train.warmup_steps=5"]) == 0
    (root / "prompts.txt").write_text("\n".join(f"第{i}个问题是什么？" for i in range(40)), encoding="utf-8")
    (root / "reward.py").write_text("def good(prompt, completion):\n"
                                    "    return float('好' in completion and '坏' not in completion)\n", encoding="utf-8")
    return root


