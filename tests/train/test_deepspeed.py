"""DeepSpeed ZeRO as an engine: the config it receives, and (CPU, gloo, 2 processes) the same run."""

from __future__ import annotations

import json

import pytest
import torch

from babyllama.config import ConfigError, TrainConfig
from babyllama.train.deepspeed_backend import deepspeed_config
from tests.train.test_distributed import SMALL, assert_same_run, babyllama, losses


def test_config_deepspeed_receives_follows_our_settings():
    cfg = TrainConfig(batch_size=4, grad_accum=8, lr=3e-4, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
    ds = deepspeed_config(cfg, {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}, world_size=4,
                          dtype=torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 4 * 8 * 4
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1}}
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 2}
    assert "scheduler" not in ds  # the loop sets lr_at(step) itself: no second schedule to disagree


def test_conflicting_or_scheduled_configs_are_refused(tmp_path):
    cfg = TrainConfig(batch_size=4, lr=3e-4)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4"):
        deepspeed_config(cfg, {"gradient_accumulation_steps": 4}, 1, torch.float32)
    with pytest.raises(ConfigError, match=r"optimizer.params.lr = 1.0"):
        deepspeed_config(cfg, {"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, 1, torch.float32)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1.0}}}))
    with pytest.raises(ConfigError, match="remove \"scheduler\""):
        deepspeed_config(cfg, f, 1, torch.float32)
    f.write_text("{\n  \"zero_optimization\": {\"stage\": 2,}\n}")
    with pytest.raises(ConfigError, match="line 2"):
        deepspeed_config(cfg, f, 1, torch.float32)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "8"] + SMALL)
    return out


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_on_two_processes_matches_one_process(single, data_dir, tmp_path, stage):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    out = tmp_path / "run"
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "2", "--grad-accum", "2",
               "--deepspeed", str(config)] + SMALL, nproc=2)
    assert_same_run(single, out)
    assert (out / "checkpoints" / "step-00000006" / "deepspeed").is_dir()


def test_zero_run_resumes_exactly(single, data_dir, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "4", "--deepspeed", str(config)]
    babyllama(args + SMALL + ["--stop-at-step", "3"], nproc=2)
    assert len(losses(out)) == 3
    babyllama(args + SMALL + ["--resume"], nproc=2)
    assert_same_run(single, out)
