"""Long-context fine-tuning end to end: `pretrain --init BASE --seq-len 2x --rope-scaling ...`
records the scaling with the base's trained length, LongLoRA (S2-Attn + LoRA + norms and
embeddings) resumes exactly, CLEX learns its ODE, and `eval ppl --rope-scaling` scores each."""

import json

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.cli import main

SHORT = 32  # the base's trained length; the fine-tunes run at twice it


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("longctx") / "base"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(out), "--device", "cpu", "--set", "model.dim=32",
                 "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--seq-len", str(SHORT),
                 "--batch-size", "8", "--max-steps", "40", "--lr", "1e-2", "--set", "train.eval_interval=40"]) == 0
    return out


def _extend(base, data_dir, out, *flags):
    return main(["pretrain", "--init", str(base), "--config", str(base / "run_config.toml"), "--data", str(data_dir),
                 "--out", str(out), "--device", "cpu", "--seq-len", str(2 * SHORT), "--batch-size", "2",
                 "--set", "train.eval_interval=4", "--set", "train.eval_batches=2", "--set", "train.ckpt_interval=3",
                 "--set", "train.warmup_steps=1", *flags])


def test_yarn_fine_tune_records_the_scaling_from_the_base_length(base, data_dir, tmp_path, capsys):
    assert _extend(base, data_dir, tmp_path / "yarn", "--rope-scaling", "yarn", "--rope-factor", "2",
                   "--max-steps", "3") == 0
    model = ckpt_io.read_model_config(ckpt_io.find_checkpoint(tmp_path / "yarn"))
    assert (model.rope_scaling, model.rope_factor, model.rope_original_len, model.max_seq_len) == \
        ("yarn", 2.0, SHORT, 2 * SHORT)  # the base's length, not the new --seq-len
    capsys.readouterr()
    assert main(["eval", "ppl", "--ckpt", str(tmp_path / "yarn"), "--data", str(data_dir), "--lengths", "32,64,128",
                 "--max-tokens", "600"]) == 0
    result = json.loads((tmp_path / "yarn" / "eval" / "ppl-data.json").read_text())
    assert result["rope_scaling"] == {"kind": "yarn", "factor": 2.0, "original_length": SHORT}
    assert [r["beyond_trained"] for r in result["results"]] == [False, True, True]
    assert "RoPE scaling yarn x2" in capsys.readouterr().out


def test_eval_ppl_scores_a_base_with_each_scaling(base, data_dir, capsys):
    for kind in ("none", "linear", "dynamic-ntk", "yarn"):
        flags = [] if kind == "none" else ["--rope-scaling", kind, "--rope-factor", "4"]
        assert main(["eval", "ppl", "--ckpt", str(base), "--data", str(data_dir), "--lengths", "32,128",
                     "--max-tokens", "600", *flags]) == 0
    files = sorted(p.name for p in (base / "eval").glob("ppl-data*.json"))
    assert files == ["ppl-data-rope-dynamic-ntk4.json", "ppl-data-rope-linear4.json", "ppl-data-rope-yarn4.json",
                     "ppl-data.json"]
    rows = {f: json.loads((base / "eval" / f).read_text())["results"] for f in files}
    # within the trained length dynamic NTK is the plain model; linear is not
    assert rows["ppl-data-rope-dynamic-ntk4.json"][0]["loss"] == pytest.approx(rows["ppl-data.json"][0]["loss"])
    assert rows["ppl-data-rope-linear4.json"][0]["loss"] != pytest.approx(rows["ppl-data.json"][0]["loss"])
    capsys.readouterr()
    assert main(["eval", "ppl", "--ckpt", str(base), "--data", str(data_dir), "--rope-factor", "4"]) == 2
    assert "--rope-factor and --original-max-len go with --rope-scaling" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["longlora", "clex"])
def test_long_context_fine_tune_resumes_exactly(base, data_dir, tmp_path, method):
    """LongLoRA (S2-Attn + LoRA + norms and embeddings) and CLEX (a scale drawn at every step)."""
    flags = ("--rope-scaling", "linear", "--rope-factor", "2", "--lora", "--s2-attn") if method == "longlora" else \
        ("--rope-scaling", "clex", "--rope-factor", "4")
    flags += ("--max-steps", "6")
    assert _extend(base, data_dir, tmp_path / "whole", *flags) == 0
    assert _extend(base, data_dir, tmp_path / "halves", *flags, "--stop-at-step", "3") == 0
    assert main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "halves"), "--resume",
                 "--device", "cpu"]) == 0
    saved = (tmp_path / "whole" / "run_config.toml").read_text()
    a = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "whole"))
    b = ckpt_io.load_state_file(ckpt_io.find_checkpoint(tmp_path / "halves"))
    if method == "longlora":
        assert "s2_group_size = 16" in saved  # a quarter of the training length
        # LongLoRA trains norms and embeddings beside the adapters
        assert any(k.endswith("norm.weight") for k in a) and "tok_embeddings.weight" in a
    else:
        assert "rope.clex.down.weight" in a
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [[json.loads(line).get("loss") for line in (tmp_path / run / "metrics.jsonl").open()]
              for run in ("whole", "halves")]
    assert [x for x in losses[0] if x is not None] == [x for x in losses[1] if x is not None]


def test_clex_learns_its_scaling_and_refuses_lora(base, data_dir, tmp_path, capsys):
    assert _extend(base, data_dir, tmp_path / "clex", "--rope-scaling", "clex", "--rope-factor", "4",
                   "--max-steps", "3", "--lr", "1e-2") == 0
    ckpt = ckpt_io.find_checkpoint(tmp_path / "clex")
    state = ckpt_io.load_state_file(ckpt)
    assert state["rope.clex.down.weight"].abs().sum() > 0  # it starts at zero (NTK) and trained
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "clex"), "--prompt", "中国", "--max-new-tokens", "40",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("中国")
    assert _extend(base, data_dir, tmp_path / "clex-lora", "--rope-scaling", "clex", "--rope-factor", "4",
                   "--lora", "--max-steps", "2") == 2
    assert "CLEX learns its scaling together with the whole model" in capsys.readouterr().err


def test_s2_group_must_divide_the_length(base, data_dir, tmp_path, capsys):
    assert _extend(base, data_dir, tmp_path / "s2", "--s2-group-size", "24", "--max-steps", "2") == 2
    assert "train.s2_group_size=24 must divide the training length" in capsys.readouterr().err
