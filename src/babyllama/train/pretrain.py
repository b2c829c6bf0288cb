"""The pretraining stage: token shards in, a trained model (checkpoints) out."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from babyllama.config import ConfigError, RunConfig
from babyllama.data.loader import PretrainBatches, validation_batches
from babyllama.data.pretrain import dataset_fingerprint, load_manifest
from babyllama.corpus.readers import DataError
import babyllama.checkpoint as ckpt_io
from babyllama.train.objectives import NextToken
from babyllama.train.stage import StageParts, StageRun, attach_bitnet, attach_lora, describe_lora, run_stage


@dataclass
class PretrainJob:
    data: str
    out: str
    config: RunConfig = field(default_factory=RunConfig)
    resume: bool = False
    init: str | None = None  # start from the weights of this checkpoint (a new run, fresh optimizer)
    tokenizer: str | None = None  # only checked against the data's tokenizer
    progress: bool = True
    stop_at_step: int | None = None  # pause here with a checkpoint; --resume continues the same schedule
    overwrite: bool = False  # start over in an `out` that holds a run (babyllama's files only are removed)
    allow_unverified: bool = False  # accept checkpoints without checksums.json (--init, --resume)


def check_tokenizer(data_dir: Path, manifest: dict, tokenizer_path: str | None):
    from babyllama.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path or data_dir / "tokenizer")
    expected = manifest["tokenizer"]["fingerprint"]
    if tok.fingerprint != expected:
        raise DataError(f"{data_dir / 'manifest.json'}: shards were made with tokenizer {expected}, but "
                        f"{tokenizer_path or data_dir / 'tokenizer'} is {tok.fingerprint}; "
                        f"re-run `babyllama data pretrain` with this tokenizer")
    return tok


def fit_vocab(cfg: RunConfig, tok) -> None:
    """The model's vocabulary is the tokenizer's unless set larger (padding for faster GEMMs)."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} ids; leave it at 0 to take the tokenizer's size")


def resolve_rope(cfg: RunConfig, job: PretrainJob) -> None:
    """Record the length a RoPE scaling starts from: the --init checkpoint's trained length (from
    scratch: the context itself), so checkpoints never leave it to a guess."""
    m = cfg.model
    if m.rope_scaling == "none" or m.rope_original_len:
        return
    if job.init and not job.resume:
        init = ckpt_io.find_checkpoint(job.init, allow_unverified=True)
        m.rope_original_len = ckpt_io.read_model_config(init).trained_len
    else:
        m.rope_original_len = m.max_seq_len
    if cfg.lora is not None and m.rope_scaling == "clex":
        raise ConfigError("CLEX learns its scaling together with the whole model (its recipe is full "
                          "fine-tuning): drop --lora, or use --rope-scaling yarn/linear with LoRA")


def pretrain(job: PretrainJob) -> dict:
    if job.resume and not job.init:  # a run started from --init resumes from the same weights
        recorded = Path(job.out) / "run.json"
        init = json.loads(recorded.read_text(encoding="utf-8")).get("init") if recorded.is_file() else None
        if init:
            job = dataclasses.replace(job, init=init)
    cfg = job.config
    data_dir = Path(job.data)
    manifest = load_manifest(data_dir)  # the data and the tokenizer are checked before `out` is touched
    tok = check_tokenizer(data_dir, manifest, job.tokenizer)
    fit_vocab(cfg, tok)
    if cfg.lora is not None and not job.init:
        raise ConfigError("--lora trains adapters over a trained model: give it with --init CKPT "
                          "(continued pretraining); a model pretrained from scratch trains every weight")
    resolve_rope(cfg, job)
    run = StageRun.from_job(job, stage="pretrain", train=cfg.train, inputs=[data_dir, job.init, job.tokenizer],
                            retry_hint=f"or start a new run from its weights: --init {job.out}")
    return run_stage(run, lambda env: _build(job, cfg, manifest, tok, env, data_dir))


def _build(job: PretrainJob, cfg: RunConfig, manifest: dict, tok, env, data_dir: Path) -> StageParts:
    from babyllama.model import Llama

    torch.manual_seed(cfg.train.seed)
    model = Llama(cfg.model)
    base = None
    if job.init:
        init = ckpt_io.find_checkpoint(job.init, verify=True, allow_unverified=job.allow_unverified,
                                       warn=print if env.is_main else None)
        # CLEX's ODE is new to a model trained without it: it starts as NTK scaling
        ckpt_io.load_weights(model, init, fresh=("rope.clex.",) if cfg.model.rope_scaling == "clex" else ())
        attach_bitnet(model, cfg.train)
        base = attach_lora(model, cfg.lora, init, cfg.train.seed)
    else:
        attach_bitnet(model, cfg.train)
    seq = cfg.model.max_seq_len
    if cfg.train.s2_group_size:
        from babyllama.train.s2attn import apply_s2_attn

        if seq % cfg.train.s2_group_size:
            raise ConfigError(f"train.s2_group_size={cfg.train.s2_group_size} must divide the training length "
                              f"model.max_seq_len={seq} (--s2-group-size, --seq-len)")
        apply_s2_attn(model, cfg.train.s2_group_size)
    batches = PretrainBatches(data_dir, seq, cfg.train.batch_size, seed=cfg.train.seed, rank=env.rank,
                              world_size=env.world_size, vocab_limit=cfg.model.vocab_size)
    # validation batches are global: each rank evaluates its share of every one
    val = validation_batches(data_dir, seq, cfg.train.batch_size * env.world_size, cfg.train.eval_batches,
                             vocab_limit=cfg.model.vocab_size)

    m = cfg.model
    rope_note = "" if m.rope_scaling == "none" else \
        f"; RoPE {m.rope_scaling} x{m.rope_factor:g} from {m.rope_original_len} positions"

    def describe(trainer) -> str:
        return (f"model: {cfg.model.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, "
                f"dim {cfg.model.dim}, vocab {cfg.model.vocab_size}; device {trainer.device}, "
                f"{str(trainer.dtype).replace('torch.', '')}; {batches.windows.num_windows:,} training windows of "
                f"{seq} tokens" + rope_note
                + (f"; shifted sparse attention in groups of {cfg.train.s2_group_size}" if cfg.train.s2_group_size else "")
                + (f"; {env.world_size} processes ({'deepspeed' if cfg.train.deepspeed else cfg.train.parallel})"
                   if env.enabled else ""))

    return StageParts(model, NextToken(), batches, val,
                      data={"path": str(data_dir), "fingerprint": dataset_fingerprint(manifest)}, tokenizer=tok,
                      config=cfg, run_info={"init": job.init}, describe=lambda t: describe(t) + describe_lora(model),
                      base_checkpoint=base)
