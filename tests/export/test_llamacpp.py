"""llama.cpp itself on our GGUF files (opt-in: `pytest --llamacpp tests/export`, after
`pip install --no-binary llama-cpp-python llama-cpp-python`; `make test` does not build llama.cpp).
Its tokenizer, reading the vocabulary from the file, gives our ids; its greedy tokens are ours."""

import pytest

from babyllama.export.stage import ExportJob, export
from babyllama.tokenizer import load_tokenizer
from tests.conftest import needs_shared
from tests.export.test_tokenizer import AWKWARD

pytestmark = pytest.mark.llamacpp


def _llama(path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)


def _texts(corpus_dir):
    news = (corpus_dir / "news.txt").read_text(encoding="utf-8").splitlines()[:300]
    return news + (corpus_dir / "reviews.txt").read_text(encoding="utf-8").splitlines()[:300] + AWKWARD


@pytest.mark.parametrize("type_", ["f32", "f16", "q8_0"])
def test_llamacpp_tokenizes_and_decodes_as_we_do(float_run, corpus_dir, tmp_path, type_):
    from babyllama.checkpoint import load_model
    from babyllama.infer.engine import Engine
    from babyllama.infer.sampling import SamplingConfig

    path = export(ExportJob(ckpt=str(float_run), out=str(tmp_path / "m.gguf"), format="gguf", type=type_))
    tok = load_tokenizer(float_run / "tokenizer")
    llm = _llama(path)
    for text in _texts(corpus_dir):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    if type_ != "f32":  # rounded weights may change a near tie: the agreement is a benchmark figure (bench/export.py)
        return
    model, _ = load_model(float_run)
    engine = Engine(model, tok, compile_step=False)
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    for text in _texts(corpus_dir)[:4]:
        prompt = [tok.eos_id] + tok.encode(text)[:16]
        ours = engine.generate([prompt], 24, greedy)[0]
        theirs = [t for t, _ in zip(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0), range(24))]
        assert theirs == ours


def test_llamacpp_reads_chatglm2s_vocabulary(corpus_dir, tmp_path):
    import torch

    from babyllama.export.gguf import write_gguf
    from babyllama.export.tokenizer import vocabulary
    from babyllama.model import Llama
    from tests.conftest import tiny_model_config

    tok = load_tokenizer(needs_shared("tokenizers/chatglm2"))
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=tok.vocab_size, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)).eval()
    write_gguf(model, vocabulary(tok), tmp_path / "glm.gguf", "f16")
    llm = _llama(tmp_path / "glm.gguf")
    for text in _texts(corpus_dir):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert llm.tokenize("<sop>".encode(), add_bos=False, special=True) == [64792]
