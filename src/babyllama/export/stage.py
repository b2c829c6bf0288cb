"""`babyllama export` and `babyllama import`: our runs out to Hugging Face and GGUF, and Hugging
Face Llama checkpoints in.

    export --format hf    a directory `AutoModelForCausalLM` / `AutoTokenizer` load with no custom
                          code: config.json, generation_config.json, model.safetensors, tokenizer.json,
                          tokenizer.model, tokenizer_config.json with the chat template
    export --format gguf  one .gguf file llama.cpp and Ollama load (export/gguf.py), and a Modelfile
    import                a transformers Llama directory -> a run directory every stage takes

What the run holds decides how it goes out: an adapter run is merged into its base (or, with
`--peft`, its base is exported and the adapter beside it as a PEFT directory); a quantized run goes
out as the float values of its codes, with a warning; a RoPE scaling the target cannot compute is
refused (export/hf.py, export/gguf.py), never dropped.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import babyllama.checkpoint as ckpt_io
from babyllama.config import ConfigError
from babyllama.outputs import HF_EXPORT, OutputError, check_inputs_outside, claim_output, staged_output, swap_in
from babyllama.rundir import tokenizer_dir

FORMATS = ("hf", "gguf")
HF_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass
class ExportJob:
    ckpt: str  # a run (its newest good checkpoint) or a checkpoint directory
    out: str  # hf: a directory; gguf: the .gguf file
    format: str = "hf"
    type: str | None = None  # hf: f32 (default) | f16 | bf16; gguf: f16 (default) | f32 | q8_0 | q4_0
    peft: bool = False  # an adapter run: export its base, and the adapter as a PEFT directory beside it
    base: str | None = None  # where an adapter run's base checkpoint is now, if it moved
    overwrite: bool = False
    allow_unverified: bool = False


@dataclass
class ImportJob:
    hf: str  # a transformers Llama directory: config.json, *.safetensors, tokenizer files
    out: str  # the run directory to write
    overwrite: bool = False


def export(job: ExportJob) -> Path:
    """Write the export; returns the directory (hf) or file (gguf) written."""
    from babyllama.tokenizer import load_tokenizer

    if job.format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {job.format!r}")
    ckpt = ckpt_io.find_checkpoint(job.ckpt, verify=True, allow_unverified=job.allow_unverified)
    meta = ckpt_io.read_meta(ckpt)
    if job.peft and not meta.get("base"):
        raise ConfigError(f"{ckpt} holds full weights, not an adapter: --peft exports adapter runs")
    tok = load_tokenizer(tokenizer_dir(ckpt))
    if job.peft:  # the base as the model, the adapter's own files beside it
        model, _ = ckpt_io.load_model(ckpt_io.find_base(ckpt, meta, job.base, job.allow_unverified))
    else:
        model, _ = ckpt_io.load_model(ckpt, base=job.base, merge=True, allow_unverified=job.allow_unverified)
    model = float_language_model(model, ckpt)
    out = Path(job.out)
    check_inputs_outside(out, [job.ckpt, job.base])
    if job.format == "gguf":
        return _export_gguf(model, tok, out, job)
    claim_output(out, HF_EXPORT, [], job.overwrite)
    work, lock = staged_output(out, "Hugging Face export")
    try:
        save_hf(model, tok, work, job.type or "f32")
        if job.peft:
            _copy_adapter(ckpt, work / "adapter", out)
        claim_output(out, HF_EXPORT, [], job.overwrite)  # again under the lock
        swap_in(work, out)
    finally:
        lock.release()
    return out


def float_language_model(model, ckpt: Path):
    """The model as plain float projections and an LM head, what both formats hold."""
    from babyllama.transforms import applied

    names = [r["name"] for r in applied(model)]
    if "scalar_head" in names:
        raise ConfigError(f"{ckpt} is a reward model (one score per position, no LM head); the formats export "
                          f"language models")
    if "lora" in names:  # only over quantized codes does a merge leave adapters in place
        raise ConfigError(f"{ckpt}: its adapter is over a quantized base and cannot be merged into codes; export "
                          f"with --peft (the base goes out dequantized, the adapter beside it)")
    if "quantize" in names or "bitnet" in names:
        from babyllama.quant.transform import to_float

        warnings.warn(f"{ckpt} is quantized: exported as the float values its codes stand for (float-sized "
                      f"files; outputs differ from the quantized model's by its activation rounding)")
        to_float(model)
    return model.float().eval()  # a PPO value head stays behind: the formats hold the LM's weights only


def save_hf(model, tok, out: Path, type_: str = "f32") -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files in `out`."""
    import torch
    import transformers

    from babyllama.export.hf import to_hf_model
    from babyllama.export.tokenizer import save_hf_tokenizer
    from babyllama.infer.sampling import SamplingConfig
    from babyllama.tokenizer import IM_END

    if type_ not in HF_TYPES:
        raise ConfigError(f"--type for --format hf must be one of {', '.join(HF_TYPES)}, got {type_!r}")
    vocab = save_hf_tokenizer(tok, out, model.config.max_seq_len)
    end_of_turn = vocab.turn_end if vocab else tok.special_tokens.get(IM_END)
    stops = [tok.eos_id] + ([end_of_turn] if end_of_turn is not None and end_of_turn != tok.eos_id else [])
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    hf = to_hf_model(model, **ids).to(getattr(torch, HF_TYPES[type_]))
    s = SamplingConfig()  # our defaults, chosen for small models (which loop under greedy decoding)
    hf.generation_config = transformers.GenerationConfig(
        **{**ids, "eos_token_id": stops}, do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        repetition_penalty=s.repetition_penalty)
    hf.save_pretrained(out, safe_serialization=True)


def _copy_adapter(ckpt: Path, where: Path, final: Path) -> None:
    from babyllama.adapters.peft import CONFIG, WEIGHTS

    where.mkdir()
    shutil.copyfile(ckpt / WEIGHTS, where / WEIGHTS)
    config = json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(final.resolve())  # the exported base, not our checkpoint
    (where / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def _export_gguf(model, tok, out: Path, job: ExportJob) -> Path:
    from babyllama.export.gguf import GGUF_TYPES, write_gguf
    from babyllama.export.tokenizer import vocabulary

    type_ = job.type or "f16"
    if type_ not in GGUF_TYPES:
        raise ConfigError(f"--type for --format gguf must be one of {', '.join(GGUF_TYPES)}, got {type_!r}")
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: a GGUF export is one file; name it FILE.gguf")
    if out.exists() and not job.overwrite:
        raise OutputError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    if out.is_dir():
        raise OutputError(f"--out {out} is a directory; name the file, e.g. {out / 'model.gguf'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = write_gguf(model, vocabulary(tok), out, type_, name=Path(job.ckpt).resolve().name)
    if summary["fallback_f16"]:
        warnings.warn(f"{len(summary['fallback_f16'])} matrices have rows that are not a multiple of 32, which "
                      f"{type_} blocks need: written f16 ({', '.join(summary['fallback_f16'][:3])}"
                      f"{', ...' if len(summary['fallback_f16']) > 3 else ''})")
    return out


def import_hf(job: ImportJob) -> Path:
    """A transformers Llama directory as a run of ours (one checkpoint, step 0); returns it."""
    import torch

    from babyllama.export.hf import model_config_from_hf, state_dict_from_hf
    from babyllama.model import Llama
    from babyllama.rundir import open_run_dir, write_checkpoint_run
    from babyllama.tokenizer import load_tokenizer

    src = Path(job.hf)
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src}: no config.json; --hf takes a Hugging Face model directory (save_pretrained's)")
    try:
        hf_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{src / 'config.json'}: not JSON ({e})") from None
    config = model_config_from_hf(hf_config, str(src / "config.json"))
    tok = load_tokenizer(src)
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"{src}: the tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size} rows")
    state = state_dict_from_hf(read_safetensors(src), config)
    model = Llama(config)
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    out = Path(job.out)
    run = open_run_dir(out, resume=False, overwrite=job.overwrite, inputs=[src])
    try:
        return write_checkpoint_run(out, "import", model.eval(), src, 0, {"hf": str(src.resolve())}, tokenizer=tok)
    finally:
        run.close()


def read_safetensors(src: Path) -> dict:
    """Every tensor of a Hugging Face directory's weights (one file or shards); pickles are refused."""
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        raise ConfigError(f"{src}: no model.safetensors" + (f" (only {', '.join(pickles[:2])}: pickles, which "
                          f"babyllama does not load; save the model with save_pretrained(..., safe_serialization=True))"
                          if pickles else ""))
    tensors = {}
    for name in files:
        tensors.update(load_file(str(src / name)))
    return tensors
