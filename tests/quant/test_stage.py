"""`babyllama quantize` end to end on a tiny pretrained run: every method writes a run that loads,
generates and evaluates; the calibrated methods beat RTN on real activations; bad input is refused
with one line."""

import json

import pytest
import torch
from safetensors import safe_open

import babyllama.checkpoint as ckpt_io
from babyllama.cli import main
from babyllama.eval.perplexity import PerplexityConfig, perplexity
from babyllama.infer import Engine, SamplingConfig
from babyllama.quant import QuantEmbedding, QuantLinear
from babyllama.quant.stage import MANIFEST


@pytest.fixture(scope="module")
def quantized(float_run, data_dir, tmp_path_factory):
    """{name: run directory} for RTN, GPTQ, AWQ (4-bit, groups of 32) and int8, calibrated on the training split."""
    root = tmp_path_factory.mktemp("quantized")
    runs = {}
    for name, flags in {"rtn": ["--method", "rtn"], "gptq": ["--method", "gptq", "--act-order"],
                        "awq": ["--method", "awq"], "int8": ["--method", "int8", "--threshold", "3"]}.items():
        runs[name] = root / name
        calib = [] if name == "rtn" else ["--calib", str(data_dir), "--calib-samples", "32"]
        assert main(["quantize", "--ckpt", str(float_run), "--out", str(runs[name]), "--group-size", "32",
                     *flags, *calib]) == 0
    return runs


def _ppl(run, data_dir):
    result = perplexity(PerplexityConfig(ckpt=str(run), data=[str(data_dir)], max_tokens=4096, batch_size=8,
                                         progress=False, out=str(run / "ppl.json")))
    return result["results"][0]["perplexity"]


def test_quantized_runs_hold_packed_integers_and_load_back_exactly(quantized, float_run):
    run = quantized["rtn"]
    ckpt = ckpt_io.find_checkpoint(run)
    with safe_open(str(ckpt / ckpt_io.WEIGHTS), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("layers.0.attention.wqkv.qweight").dtype == torch.uint8
    assert "tok_embeddings.weight" not in names and "output.qweight" in names  # the tied head, once, packed
    assert not any(n.endswith(".weight") and "norm" not in n for n in names)  # no float copy of a projection
    model, _ = ckpt_io.load_model(run)
    assert isinstance(model.layers[1].feed_forward.w2, QuantLinear) and isinstance(model.tok_embeddings, QuantEmbedding)
    saved = ckpt_io.load_state_file(ckpt)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    float_size = (ckpt_io.find_checkpoint(float_run) / ckpt_io.WEIGHTS).stat().st_size
    assert (ckpt / ckpt_io.WEIGHTS).stat().st_size < 0.3 * float_size  # 4-bit: under 30% of float32
    manifest = json.loads((run / MANIFEST).read_text())
    assert manifest["method"] == "rtn" and manifest["bits"] == 4 and manifest["transform"]["group_size"] == 32


def test_quantized_models_generate_and_stay_near_the_float_perplexity(quantized, float_run, data_dir):
    base = _ppl(float_run, data_dir)
    ppl = {name: _ppl(run, data_dir) for name, run in quantized.items()}
    assert ppl["int8"] == pytest.approx(base, rel=0.01)  # stated bounds: int8 within 1%, 4-bit g32 within 10%
    for name in ("rtn", "gptq", "awq"):
        assert ppl[name] == pytest.approx(base, rel=0.10), (name, ppl[name], base)
    engine = Engine.load(str(quantized["gptq"]), device="cpu")
    text = engine.complete("今天", max_new_tokens=8, sampling=SamplingConfig(temperature=0.0))
    assert isinstance(text, str) and text


def test_gptq_and_awq_give_lower_layer_output_error_than_rtn(quantized):
    for name in ("gptq", "awq"):
        manifest = json.loads((quantized[name] / MANIFEST).read_text())
        layers = manifest["layers"]
        assert len(layers) == 2 * 4 + 1  # every projection of both blocks, and the head
        assert all(l["error"] <= l["rtn_error"] * 1.01 for l in layers), name
        assert manifest["mean_error_vs_rtn"] < (0.7 if name == "gptq" else 1.0), (name, manifest["mean_error_vs_rtn"])


def test_int8_keeps_the_outlier_columns_in_float(quantized):
    manifest = json.loads((quantized["int8"] / MANIFEST).read_text())
    assert manifest["outlier_columns"] > 0
    model, _ = ckpt_io.load_model(quantized["int8"])
    kept = {name: len(m.outlier_index) for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.outlier_index is not None}
    assert kept == manifest["transform"]["outliers"] and sum(kept.values()) == manifest["outlier_columns"]


@pytest.mark.parametrize("flags,message", [
    (["--method", "int8", "--bits", "4"], "--method int8 takes --bits 8"),
    (["--method", "rtn", "--group-size", "48"], "--group-size must be 0 (one scale per row) or a multiple of 32"),
    (["--method", "gptq"], "--method gptq needs calibration text"),
    (["--method", "bitnet"], "--method bitnet packs a run trained with --bitnet"),
    (["--method", "awq", "--bits", "5", "--calib", "x"], "invalid choice: 5"),
])
def test_bad_settings_get_one_line(float_run, tmp_path, capsys, flags, message):
    assert main(["quantize", "--ckpt", str(float_run), "--out", str(tmp_path / "q"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_group_size_must_divide_the_model_width():
    from types import SimpleNamespace

    from babyllama.config import ConfigError
    from babyllama.quant import Quantize
    from babyllama.quant.stage import check_group_size_fits

    with pytest.raises(ConfigError, match="--group-size 64 does not divide the model width 96"):
        check_group_size_fits(SimpleNamespace(config=SimpleNamespace(dim=96)), 64)
    check_group_size_fits(SimpleNamespace(config=SimpleNamespace(dim=96)), 128)  # wider: one group per row
    # the widths it does not divide inside the model take the largest multiple of 32 that does
    assert [Quantize(group_size=128).group_for(w) for w in (512, 1376, 64, 80)] == [128, 32, 64, 80]


def test_calibration_data_from_another_tokenizer_is_refused(float_run, data_dir, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["quantize", "--ckpt", str(float_run), "--out", str(tmp_path / "q"), "--method", "gptq",
                 "--calib", str(other)]) == 2
    assert "made with tokenizer 0123456789abcdef" in capsys.readouterr().err


def test_a_quantized_run_is_not_quantized_again(quantized, tmp_path, capsys):
    assert main(["quantize", "--ckpt", str(quantized["rtn"]), "--out", str(tmp_path / "q")]) == 2
    assert "quantized already" in capsys.readouterr().err
