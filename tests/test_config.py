from pathlib import Path

import pytest

from babyllama.config import PRESETS, ConfigError, RunConfig, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", list(PRESETS))
def test_shipped_config_files_equal_the_presets(name):
    assert load_config(CONFIGS / f"{name}.toml", "tiny").to_dict() == PRESETS[name].to_dict()


def test_original_preset_matches_the_original_table():
    m = PRESETS["original"].model
    assert (m.dim, m.n_layers, m.n_heads, m.max_seq_len) == (512, 8, 8, 256)
    m.vocab_size = 64794
    assert round(m.num_params() / 1e6, 1) == 58.5


def test_file_and_overrides_stack(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text('[model]\ndim = 128\nn_heads = 2\n[train]\nlr = 1e-3\n')
    cfg = load_config(f, "tiny", parse_overrides(["train.max_steps=7", "model.n_layers=3"]))
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.n_layers) == (128, 2, 2, 3)
    assert cfg.model.hidden_dim == 352  # recomputed for the new dim
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7
    assert cfg.train.batch_size == PRESETS["tiny"].train.batch_size


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        RunConfig.from_dict({"train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        RunConfig.from_dict({"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="not divisible"):
        RunConfig.from_dict({"model": {"dim": 100, "n_heads": 3}})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, "huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def test_a_stage_base_replaces_the_tiny_preset(tmp_path):
    from babyllama.config import TrainConfig

    base = RunConfig(train=TrainConfig(lr=5e-4, max_steps=500, batch_size=16))
    f = tmp_path / "sft.toml"
    f.write_text("[train]\nmax_steps = 50\n")
    cfg = load_config(f, None, parse_overrides(["train.batch_size=4"]), base=base)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (5e-4, 50, 4)
