import pytest
import torch

from babyllama.model import Llama
from babyllama.train import checkpoint as ckpt_io
from tests.conftest import tiny_model_config


def test_save_load_round_trip_and_latest(tmp_path):
    cfg = tiny_model_config()
    model = Llama(cfg)
    for step in (1, 2, 3):
        ckpt_io.save_checkpoint(tmp_path, step, model, cfg, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    loaded, ckpt = ckpt_io.load_model(tmp_path)
    assert ckpt.name == "step-00000003"
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_interrupted_write_leaves_previous_checkpoint(tmp_path):
    cfg = tiny_model_config()
    model = Llama(cfg)
    ckpt_io.save_checkpoint(tmp_path, 10, model, cfg)
    # a crash during the next save leaves a .tmp directory and an untouched `latest`
    partial = tmp_path / "checkpoints" / "step-00000020.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    assert ckpt_io.find_checkpoint(tmp_path).name == "step-00000010"
    ckpt_io.load_model(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt_io.CheckpointError, match="no such directory"):
        ckpt_io.find_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint found"):
        ckpt_io.find_checkpoint(tmp_path / "empty")


def test_training_state_loads_without_pickle(tmp_path):
    cfg = tiny_model_config()
    model = Llama(cfg)
    opt = torch.optim.AdamW(model.parameters())
    (model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))).backward()
    opt.step()
    path = ckpt_io.save_checkpoint(tmp_path, 1, model, cfg, opt, {"step": 1, "rng_cpu": torch.get_rng_state(),
                                                                   "data": {"epoch": 0, "cursor": 4}})
    opt_state, state = ckpt_io.load_training_state(path)  # weights_only=True inside
    assert state["data"] == {"epoch": 0, "cursor": 4}
    assert len(opt_state["state"]) == len(list(model.parameters()))
