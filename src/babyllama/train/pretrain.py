"""The pretraining stage: token shards in, a trained model (checkpoints) out."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from babyllama.config import RunConfig
from babyllama.data.loader import PretrainBatches, validation_batches
from babyllama.data.pretrain import load_manifest
from babyllama.data.readers import DataError
from babyllama.train import checkpoint as ckpt_io
from babyllama.train.loop import Trainer


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


def check_tokenizer(data_dir: Path, manifest: dict, tokenizer_path: str | None):
    from babyllama.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path or data_dir / "tokenizer")
    expected = manifest["tokenizer"]["fingerprint"]
    if tok.fingerprint != expected:
        raise DataError(f"{data_dir / 'manifest.json'}: shards were made with tokenizer {expected}, but "
                        f"{tokenizer_path or data_dir / 'tokenizer'} is {tok.fingerprint}; "
                        f"re-run `babyllama data pretrain` with this tokenizer")
    return tok


def pretrain(job: PretrainJob) -> dict:
    cfg = job.config
    data_dir, out = Path(job.data), Path(job.out)
    manifest = load_manifest(data_dir)
    tok = check_tokenizer(data_dir, manifest, job.tokenizer)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")

    has_checkpoint = (out / ckpt_io.CKPT_DIR / "latest").is_file()
    if has_checkpoint and not job.resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if job.resume and not has_checkpoint:
        raise ckpt_io.CheckpointError(f"{out}: nothing to resume (no checkpoint yet)")

    from babyllama.model import Llama

    from babyllama.train.distributed import distributed_env
    from babyllama.train.runtime import pick_device

    env = distributed_env(pick_device(cfg.train.device).type)
    torch.manual_seed(cfg.train.seed)
    model = Llama(cfg.model)
    if job.init:
        init = ckpt_io.find_checkpoint(job.init)
        ckpt_io.load_weights(model, init)
    seq = cfg.model.max_seq_len
    batches = PretrainBatches(data_dir, seq, cfg.train.batch_size, seed=cfg.train.seed, rank=env.rank,
                              world_size=env.world_size)
    # validation batches are global: each rank evaluates its share of every one
    val = validation_batches(data_dir, seq, cfg.train.batch_size * env.world_size, cfg.train.eval_batches)

    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        (out / "run_config.toml").write_text(cfg.to_toml(), encoding="utf-8")
        if not (out / "tokenizer").exists():
            shutil.copytree(data_dir / "tokenizer", out / "tokenizer")
    trainer = Trainer(model, cfg.model, cfg.train, batches, out, val_batches=val,
                      run_config=cfg.to_dict(), progress=job.progress and env.is_main)
    if job.resume:
        trainer.resume()
    if job.progress and env.is_main:
        n = cfg.model.num_params()
        print(f"model: {n / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, dim {cfg.model.dim}, "
              f"vocab {cfg.model.vocab_size}; device {trainer.device}, {str(trainer.dtype).replace('torch.', '')}; "
              f"{batches.windows.num_windows:,} training windows of {seq} tokens"
              + (f"; {env.world_size} processes ({'deepspeed' if cfg.train.deepspeed else cfg.train.parallel})"
                 if env.enabled else ""))
    summary = trainer.fit(job.stop_at_step)
    if not env.is_main:
        return summary
    try:
        from babyllama.train.plot import plot_loss

        summary["plot"] = str(plot_loss(out / "metrics.jsonl", out / "loss.png"))
    except Exception as e:  # a missing plot must not fail a finished run
        print(f"could not draw the loss curve: {e}")
    return summary
