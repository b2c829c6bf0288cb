"""A tiny run directory, as pretraining leaves it, for the evaluation commands."""

import json

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.model import Llama
from tests.conftest import tiny_model_config


@pytest.fixture
def tiny_run(tmp_path, tokenizer, tokenizer_dir):
    """A run directory as pretraining leaves it: run.json, tokenizer/, a checkpoint."""
    run = tmp_path / "run"
    torch.manual_seed(1)
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64))
    ckpt_io.save_checkpoint(run, 5, model, model.config)
    tokenizer.save(run / "tokenizer")
    (run / "run.json").write_text(json.dumps({"stage": "pretrain"}), encoding="utf-8")
    return run, model
