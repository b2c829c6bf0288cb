import pytest
import torch

from babyllama.model import Llama
import babyllama.checkpoint as ckpt_io
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


def test_a_checkpoint_without_checksums_is_loaded_only_when_allowed(tmp_path):
    cfg = tiny_model_config()
    model = Llama(cfg)
    path = ckpt_io.save_checkpoint(tmp_path, 1, model, cfg)
    (path / ckpt_io.CHECKSUMS).unlink()
    for target in (tmp_path, path):
        with pytest.raises(ckpt_io.CheckpointError, match="no checksums.json.*--allow-unverified"):
            ckpt_io.load_model(target)
    warned = []
    assert ckpt_io.find_checkpoint(tmp_path, verify=True, allow_unverified=True, warn=warned.append) == path
    assert "unverified" in warned[0]
    loaded, _ = ckpt_io.load_model(tmp_path, allow_unverified=True)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_when_every_checkpoint_is_damaged_each_is_named(tmp_path):
    cfg = tiny_model_config()
    model = Llama(cfg)
    for step in (1, 2):
        ckpt_io.save_checkpoint(tmp_path, step, model, cfg)
    root = tmp_path / "checkpoints"
    (root / "step-00000002" / "model.safetensors").write_bytes(b"cut")
    (root / "step-00000001" / "config.json").unlink()
    (root / "latest").unlink()  # found without the pointer as well
    with pytest.raises(ckpt_io.CheckpointError) as err:
        ckpt_io.find_checkpoint(tmp_path, verify=True)
    assert ("step-00000002: model.safetensors does not match its checksum" in str(err.value)
            and "step-00000001: config.json is missing" in str(err.value) and "nothing was changed" in str(err.value))


def test_checkpoints_are_found_without_the_latest_pointer(tmp_path):
    cfg = tiny_model_config()
    for step in (3, 7):
        ckpt_io.save_checkpoint(tmp_path, step, Llama(cfg), cfg, keep=0)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ckpt_io.find_checkpoint(tmp_path, verify=True).name == "step-00000007"
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000007"]


def test_weights_of_another_shape_name_the_fields_that_differ(tmp_path):
    cfg = tiny_model_config()
    path = ckpt_io.save_checkpoint(tmp_path, 1, Llama(cfg), cfg)
    with pytest.raises(ckpt_io.CheckpointError, match=r"another shape .*model\.dim: 64 in the checkpoint, 32 here"):
        ckpt_io.load_weights(Llama(tiny_model_config(dim=32)), path)
