import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from babyllama.config import PRESETS, ConfigError, ModelConfig, RunConfig, TrainConfig, load_config, parse_overrides

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


# --- validation when a config is built: every field range-checked, named in the message -----------

@pytest.mark.parametrize("toml", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_file_loads(toml):
    cfg = load_config(toml)
    cfg.validate()


@pytest.mark.parametrize("override,message", [
    ({"train": {"lr": -0.01}}, "train.lr must be a finite number > 0, got -0.01 (--lr)"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be >= 1, got 0 (--batch-size)"),
    ({"train": {"max_steps": 0}}, "train.max_steps must be >= 1, got 0 (--max-steps)"),
    ({"train": {"grad_accum": 0}}, "train.grad_accum must be >= 1, got 0 (--grad-accum)"),
    ({"train": {"dtype": "float8"}}, "train.dtype must be one of auto, float32, fp32, bfloat16, bf16, float16, fp16, "
                                     "got 'float8' (--dtype)"),
    ({"train": {"device": "gpu"}}, "train.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu' (--device)"),
    ({"train": {"parallel": "zero"}}, "train.parallel must be one of ddp, fsdp, got 'zero' (--parallel)"),
    ({"train": {"min_lr": 0.01}}, "train.min_lr must be <= train.lr (0.002), got 0.01"),
    ({"train": {"keep_ckpts": -1}}, "train.keep_ckpts must be >= 0 (0 = keep all), got -1"),
    ({"train": {"max_minutes": "inf"}}, "train.max_minutes must be a finite number >= 0 (0 = no limit), got inf"),
    ({"train": {"beta2": 1}}, "train.beta2 must be a finite number in [0, 1), got 1.0"),
    ({"train": {"seed": -1}}, "train.seed must be an integer in [0, 4294967295], got -1 (--seed)"),
    ({"model": {"dropout": 1}}, "model.dropout must be a finite number in [0, 1), got 1.0"),
    ({"model": {"vocab_size": -5}}, "model.vocab_size must be >= 0 (0 = from the tokenizer), got -5"),
    ({"model": {"n_heads": 0}}, "model.n_heads must be >= 1, got 0"),
    ({"model": {"max_seq_len": 1}}, "model.max_seq_len must be >= 2, got 1"),
    ({"model": {"norm_eps": 0}}, "model.norm_eps must be a finite number > 0, got 0.0"),
    ({"model": {"rope_theta": "nan"}}, "model.rope_theta must be a finite number > 0, got nan"),
    ({"model": {"dim": 24, "n_heads": 8}}, "model.dim / model.n_heads (the head dimension) must be even"),
])
def test_out_of_range_values_are_refused_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(override, base=PRESETS["tiny"])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_command_line_values_are_checked_like_file_values():
    """What `--grad-accum 0` or `--dtype float8` become (overrides) is refused before anything runs;
    grad_accum 0 used to fail much later with 'everything is masked'."""
    with pytest.raises(ConfigError, match=r"train.grad_accum must be >= 1, got 0 \(--grad-accum\)"):
        load_config(None, "tiny", {"train": {"grad_accum": 0}})
    with pytest.raises(ConfigError, match="train.dtype must be one of"):
        load_config(None, "tiny", parse_overrides(["train.dtype=float8"]))
    with pytest.raises(ConfigError, match="train.lr must be a finite number > 0, got nan"):
        load_config(None, "tiny", parse_overrides(["train.lr=nan"]))
    for device in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert load_config(None, "tiny", {"train": {"device": device}}).train.device == device


@pytest.mark.parametrize("cls,section", [(ModelConfig, "model"), (TrainConfig, "train")])
def test_nan_and_inf_are_refused_for_every_float(cls, section):
    floats = [f.name for f in dataclasses.fields(cls) if isinstance(getattr(cls(), f.name), float)]
    assert floats
    for name in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=rf"{section}\.{name} must be a finite number"):
                cls(**{name: bad})


def test_python_values_of_the_wrong_type_are_refused():
    with pytest.raises(ConfigError, match="train.batch_size must be an integer, got 2.5"):
        TrainConfig(batch_size=2.5)
    with pytest.raises(ConfigError, match="train.compile must be true or false, got 'yes'"):
        TrainConfig(compile="yes")
    with pytest.raises(ConfigError, match="model.dim must be an integer, got True"):
        ModelConfig(dim=True)


def test_validate_again_after_a_stage_changes_a_field():
    cfg = load_config(None, "tiny")
    cfg.model.vocab_size = 4096  # filled from the tokenizer
    cfg.validate()
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1"):
        cfg.validate()
    model = ModelConfig(dim=64, n_heads=4)
    model.n_kv_heads = 0  # derived fields left at 0 are filled again, not divided by
    model.validate()
    assert model.n_kv_heads == 4


def test_derived_hidden_dim_is_unchanged_and_exact_for_huge_dims():
    assert ModelConfig(dim=512).hidden_dim == 1376 and ModelConfig(dim=768, n_heads=12).hidden_dim == 2048
    assert ModelConfig(dim=2**70, n_heads=8).hidden_dim % 32 == 0  # integer arithmetic: no float overflow


# Property: whatever value a field gets (from a file, --set, or Python), the config is built or a
# ConfigError names that field; never another exception.

FIELDS = [("model", f.name) for f in dataclasses.fields(ModelConfig)] + \
         [("train", f.name) for f in dataclasses.fields(TrainConfig)]
ANY_VALUE = st.one_of(
    st.integers(min_value=-10, max_value=10), st.integers(), st.floats(), st.booleans(), st.just(10**400),
    st.sampled_from(["", "0", "1", "-1", "1e-3", "nan", "inf", "-inf", "1e999", "true", "auto", "cpu", "cuda:1",
                     "bf16", "float8", "fsdp", "gpu", "12abc"]),
    st.text(max_size=8),
)
SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _check_built(cfg: RunConfig) -> None:
    for part in (cfg.model, cfg.train):
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, float):
                assert math.isfinite(value), f.name


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_any_value_in_a_file_or_override_builds_or_names_the_field(field, value):
    section, name = field
    try:
        cfg = RunConfig.from_dict({section: {name: value}}, base=PRESETS["tiny"])
    except ConfigError as e:
        assert f"{section}.{name}" in str(e), str(e)
    else:
        _check_built(cfg)


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_any_python_value_builds_or_names_the_field(field, value):
    section, name = field
    cls = ModelConfig if section == "model" else TrainConfig
    try:
        part = cls(**{name: value})
    except ConfigError as e:
        assert f"{section}.{name}" in str(e), str(e)
    else:
        _check_built(RunConfig(model=part) if section == "model" else RunConfig(train=part))


# --- the device and precision a config names must exist here ---------------------------------------

def test_a_device_this_machine_lacks_is_a_config_error(monkeypatch):
    import torch

    from babyllama import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device cuda: CUDA is not available here"):
        runtime.pick_device("cuda")
    with pytest.raises(ConfigError, match=r"--device cuda:1: CUDA is not available here"):
        runtime.pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA devices \(cuda:0 .. cuda:1\)"):
        runtime.pick_device("cuda:2")
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ConfigError, match="--device mps: Apple's MPS backend is not available here"):
            runtime.pick_device("mps")
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        runtime.pick_device("gpu")
    assert runtime.pick_device("cpu") == torch.device("cpu")


def test_an_unknown_dtype_is_a_config_error():
    import torch

    from babyllama.runtime import pick_dtype

    with pytest.raises(ConfigError, match="--dtype: unknown dtype 'float8'"):
        pick_dtype("float8", torch.device("cpu"))
