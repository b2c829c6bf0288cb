"""`babyllama export --format hf` and `babyllama import` against transformers and PEFT, which read
only the files written: logits, greedy tokens, the chat template, adapters, quantized runs, refusals,
and the round trip back to a run."""

import json

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.cli import main
from babyllama.config import ConfigError
from babyllama.export.stage import ExportJob, ImportJob, export, import_hf
from babyllama.infer.engine import Engine
from babyllama.model import Llama
from babyllama.rundir import write_checkpoint_run
from babyllama.tokenizer import load_tokenizer
from babyllama.tokenizer.chat import ChatTemplate, Message
from tests.conftest import make_lora_run, tiny_model_config

import transformers  # noqa: E402  (a dev dependency: the independent reference)

TEXT = "今天天气很好，我们去公园散步。商品质量不错，物流很快！"


def _ours(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))


def _theirs(directory, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf, hf(torch.tensor([ids])).logits


def test_export_gives_our_logits_greedy_tokens_and_chat_ids(float_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(float_run), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
                     "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config  # no custom code
    model, _ = ckpt_io.load_model(float_run)
    tok = load_tokenizer(float_run / "tokenizer")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok.encode(TEXT, add_special_tokens=False)
    assert ids == tok.encode(TEXT)
    hf, logits = _theirs(out, ids)
    torch.testing.assert_close(logits, _ours(model, ids), rtol=0, atol=1e-4)

    prompt = [tok.eos_id] + ids[:8]
    # replaced, not passed: transformers fills settings left at their defaults from the model's own
    # generation_config.json, whose repetition penalty (ours, 1.1) would then apply
    hf.generation_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                                         pad_token_id=tok.pad_id)
    theirs = hf.generate(torch.tensor([prompt]))[0, len(prompt):].tolist()
    from babyllama.infer.sampling import SamplingConfig

    ours = Engine(model, tok, compile_step=False).generate([prompt], 24, SamplingConfig(temperature=0, repetition_penalty=1.0))[0]
    assert theirs == ours

    messages = [Message("system", "你是助手。"), Message("user", "推荐一本书？")]
    chat = hf_tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                      add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(chat) == ChatTemplate(tok).prompt_ids(messages)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, tok.token_id("<|im_end|>")] and generation["temperature"] == 0.8


def test_import_of_an_export_round_trips_bit_exactly(float_run, tmp_path):
    export(ExportJob(ckpt=str(float_run), out=str(tmp_path / "hf")))
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    source, back = ckpt_io.find_checkpoint(float_run), ckpt_io.find_checkpoint(tmp_path / "back")
    a, b = ckpt_io.load_state_file(source), ckpt_io.load_state_file(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert ckpt_io.read_model_config(source) == ckpt_io.read_model_config(back)
    assert load_tokenizer(tmp_path / "back" / "tokenizer").fingerprint == load_tokenizer(float_run / "tokenizer").fingerprint
    # and it is a run like any other: it generates
    assert main(["generate", "--ckpt", str(tmp_path / "back"), "--prompt", "今天", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}])
def test_import_a_transformers_llama(tokenizer_dir, tokenizer, tmp_path, rope):
    """A model transformers made (untied, grouped-query, sharded files), with its own tokenizer.json."""
    from babyllama.export.tokenizer import save_hf_tokenizer

    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                      rope_parameters={"rope_theta": 5e5, **(rope or {"rope_type": "default"})})
    hf = transformers.LlamaForCausalLM(config).eval()
    src = tmp_path / "src"
    hf.save_pretrained(src, max_shard_size="200KB")
    assert (src / "model.safetensors.index.json").is_file()
    save_hf_tokenizer(tokenizer, src, 128)
    (src / "tokenizer.model").unlink()  # a plain Hugging Face directory: tokenizer.json only
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    del cfg["babyllama"]
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))

    import_hf(ImportJob(hf=str(src), out=str(tmp_path / "run")))
    model, _ = ckpt_io.load_model(tmp_path / "run")
    assert model.config.rope_theta == 5e5 and model.config.n_kv_heads == 2 and not model.config.tie_embeddings
    ids = tokenizer.encode(TEXT)[:40]
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, ids), hf(torch.tensor([ids])).logits, rtol=0, atol=1e-4)
    imported = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert imported.kind == "huggingface" and imported.encode(TEXT) == tokenizer.encode(TEXT)


def test_lora_run_exports_merged_or_as_a_peft_adapter(float_run, tmp_path):
    import peft

    adapted = make_lora_run(float_run, tmp_path / "lora")
    ids = load_tokenizer(float_run / "tokenizer").encode(TEXT)
    expected = _ours(adapted, ids)
    export(ExportJob(ckpt=str(tmp_path / "lora"), out=str(tmp_path / "merged")))
    _, merged = _theirs(tmp_path / "merged", ids)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-4)

    export(ExportJob(ckpt=str(tmp_path / "lora"), out=str(tmp_path / "split"), peft=True))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "split")
    adapter = json.loads((tmp_path / "split" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "split").resolve())
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "split" / "adapter").eval()(
            torch.tensor([ids])).logits
    torch.testing.assert_close(with_adapter, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # the base alone is another model


def test_quantized_run_exports_its_float_values_with_a_warning(float_run, tmp_path):
    from babyllama.quant.stage import QuantizeJob, quantize

    quantize(QuantizeJob(ckpt=str(float_run), out=str(tmp_path / "q4"), method="rtn", bits=4, group_size=32))
    quantized, _ = ckpt_io.load_model(tmp_path / "q4")
    with pytest.warns(UserWarning, match="quantized"):
        export(ExportJob(ckpt=str(tmp_path / "q4"), out=str(tmp_path / "hf")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    wqkv = quantized.layers[0].attention.wqkv.dequantized()
    torch.testing.assert_close(hf.model.layers[0].self_attn.q_proj.weight, wqkv[:64], rtol=0, atol=0)
    torch.testing.assert_close(hf.model.embed_tokens.weight, quantized.output.dequantized(), rtol=0, atol=0)
    ids = load_tokenizer(float_run / "tokenizer").encode(TEXT)
    with torch.no_grad():
        theirs, ours = hf(torch.tensor([ids])).logits, _ours(quantized, ids)
    # the quantized model rounds activations to int8 blocks in its kernel; the export computes in float
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()


def _run_with(tmp_path, tokenizer, **model):
    m = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, **model))
    (tmp_path / "run").mkdir()
    return write_checkpoint_run(tmp_path / "run", "pretrain", m, tmp_path, 1, {}, tokenizer=tokenizer)


@pytest.mark.parametrize("fmt,scaling,why", [("hf", "clex", "no equivalent in transformers"),
                                             ("gguf", "dynamic-ntk", "llama.cpp"), ("gguf", "clex", "llama.cpp")])
def test_scalings_the_target_cannot_compute_are_refused(tokenizer, tmp_path, capsys, fmt, scaling, why):
    ckpt = _run_with(tmp_path, tokenizer, rope_scaling=scaling, rope_factor=2.0, max_seq_len=128, rope_original_len=64)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "hf")
    assert main(["export", "--ckpt", str(ckpt), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("babyllama: error:") and why in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_exports_and_imports_get_one_line(float_run, tmp_path, capsys):
    def fails(*argv, says):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("babyllama: error:") and says in err and err.count("\n") == 1, err

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    fails("export", "--ckpt", str(float_run), "--out", str(tmp_path / "mine"), says="not empty")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    fails("export", "--ckpt", str(float_run), "--out", str(tmp_path / "x.bin"), "--format", "gguf", says="FILE.gguf")
    fails("export", "--ckpt", str(float_run), "--out", str(tmp_path / "y"), "--type", "q4_0", says="--type")
    fails("export", "--ckpt", str(float_run), "--out", str(tmp_path / "z"), "--peft", says="not an adapter")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    fails("import", "--hf", str(src), "--out", str(tmp_path / "r"), says="Llama-architecture")
    tok = load_tokenizer(float_run / "tokenizer")
    tok.save(src)
    (src / "pytorch_model.bin").write_bytes(b"not really")
    for vocab, says in ((100, "the model only 100 rows"), (tok.vocab_size, "pickles")):
        (src / "config.json").write_text(json.dumps({**transformers.LlamaConfig(vocab_size=vocab).to_dict(),
                                                     "architectures": ["LlamaForCausalLM"]}))
        fails("import", "--hf", str(src), "--out", str(tmp_path / "r"), says=says)
    (src / "config.json").write_text("{not json")
    fails("import", "--hf", str(src), "--out", str(tmp_path / "r"), says="not JSON")
    with pytest.raises(ConfigError, match="attention_bias"):
        from babyllama.export.hf import model_config_from_hf

        model_config_from_hf({**transformers.LlamaConfig().to_dict(), "attention_bias": True})
