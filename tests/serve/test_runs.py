"""Every kind of run serves: an adapter run, a quantized run and an imported Hugging Face model each
answer through the API with the tokens the Engine gives for the same run."""

import pytest
from fastapi.testclient import TestClient

from babyllama.infer.engine import Engine
from babyllama.infer.sampling import SamplingConfig
from babyllama.serve.stage import ServeJob, build
from tests.conftest import make_lora_run


def _lora(float_run, out):
    make_lora_run(float_run, out, targets="q,v")


def _quantized(float_run, out):
    from babyllama.quant.stage import QuantizeJob, quantize

    quantize(QuantizeJob(ckpt=str(float_run), out=str(out), method="rtn", bits=4, group_size=32))


def _imported(float_run, out):
    from babyllama.export.stage import ExportJob, ImportJob, export, import_hf

    export(ExportJob(ckpt=str(float_run), out=str(out.parent / "hf")))
    import_hf(ImportJob(hf=str(out.parent / "hf"), out=str(out)))


@pytest.mark.parametrize("make", [_lora, _quantized, _imported], ids=["lora", "quantized", "imported"])
def test_each_kind_of_run_serves_the_engines_tokens(float_run, tmp_path, make):
    run = tmp_path / "run"
    make(float_run, run)
    engine = Engine.load(run, device="cpu", dtype="float32", compile_step=False)
    tok = engine.tokenizer
    prompt = [tok.eos_id] + tok.encode("今天天气")
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    expected = tok.decode(engine.generate([prompt], 12, greedy, stop_ids=(tok.eos_id,))[0])
    app, batcher = build(ServeJob(ckpt=str(run), model_name="m", device="cpu", dtype="float32"))
    try:
        with TestClient(app) as client:
            reply = client.post("/v1/completions", json={"model": "m", "prompt": "今天天气", "max_tokens": 12,
                                                         "temperature": 0, "repetition_penalty": 1.0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected
    finally:
        batcher.close()
