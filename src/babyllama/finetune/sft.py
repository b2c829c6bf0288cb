"""Supervised fine-tuning: conversations in, an assistant out. Loss on assistant tokens only."""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from babyllama.config import RunConfig, TrainConfig
from babyllama.data.readers import DataError, ReadStats, split_input_spec
from babyllama.data.sft import SFTBatches, SFTStats, collate, read_conversations, tokenize_conversations
from babyllama.tokenizer.chat import ChatTemplate
from babyllama.train import checkpoint as ckpt_io
from babyllama.train.loop import Trainer


def default_sft_train() -> TrainConfig:
    return TrainConfig(batch_size=16, max_steps=500, lr=5e-4, min_lr=5e-5, warmup_steps=20, weight_decay=0.0,
                       eval_interval=100, eval_batches=10, log_interval=10, ckpt_interval=250)


@dataclass
class SFTJob:
    ckpt: str  # the pretrained run (or checkpoint) to start from
    data: list[str]  # SFT files, each optionally FILE::FORMAT
    out: str
    train: TrainConfig = field(default_factory=default_sft_train)
    layout: str = "auto"
    val_fraction: float = 0.02
    resume: bool = False
    from_scratch: bool = False  # same shape, random weights: what pretraining bought, for comparison
    on_error: str = "skip"
    progress: bool = True


def _is_val(msgs, fraction: float) -> bool:
    key = "\x00".join(m.content for m in msgs).encode("utf-8")
    return (zlib.crc32(key) % 1_000_000) < fraction * 1_000_000


def load_sft_samples(files: list[str], template: ChatTemplate, max_len: int, layout: str = "auto",
                     val_fraction: float = 0.02, on_error: str = "skip", verbose: bool = True):
    """(train samples, val samples, report). An empty result is an error, never an empty model."""
    read, cut = ReadStats(), SFTStats()
    train_convs, val_convs = [], []
    for spec in files:
        path, fmt = split_input_spec(spec, layout)
        for msgs in read_conversations(path, fmt, read, on_error):
            (val_convs if _is_val(msgs, val_fraction) else train_convs).append(msgs)
    train = tokenize_conversations(train_convs, template, max_len, cut)
    val = tokenize_conversations(val_convs, template, max_len, cut)
    report = {"conversations": read.documents, "skipped": read.skipped, "skipped_where": read.skipped_where,
              "train": len(train), "val": len(val), "truncated_prompt": cut.truncated_prompt,
              "truncated_reply": cut.truncated_reply}
    if verbose and read.skipped:
        print(f"skipped {read.skipped} malformed records; first: {'; '.join(read.skipped_where[:3])}")
    if not train:
        raise DataError(f"no usable conversations in {', '.join(files)}"
                        + (f" ({read.skipped} malformed; first: {read.skipped_where[0]})" if read.skipped else ""))
    return train, val, report


def sft(job: SFTJob) -> dict:
    from babyllama.infer.generate import load_for_inference

    model, tok, src_ckpt = load_for_inference(job.ckpt, "cpu")
    model.train()
    if job.from_scratch:
        torch.manual_seed(job.train.seed)
        model.reset_parameters()
    template = ChatTemplate(tok)
    cfg = model.config
    train, val, report = load_sft_samples(job.data, template, cfg.max_seq_len + 1, job.layout, job.val_fraction,
                                          job.on_error, job.progress)
    out = Path(job.out)
    has_checkpoint = (out / ckpt_io.CKPT_DIR / "latest").is_file()
    if has_checkpoint and not job.resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer")
    run = RunConfig(model=cfg, train=job.train)
    (out / "run_config.toml").write_text(run.to_toml(), encoding="utf-8")
    (out / "sft_data.json").write_text(json.dumps({**report, "source_checkpoint": str(src_ckpt)}, indent=2,
                                                  ensure_ascii=False), encoding="utf-8")
    batches = SFTBatches(train, job.train.batch_size, tok.pad_id, seed=job.train.seed)
    val_batches = [collate(val[i:i + job.train.batch_size], tok.pad_id)
                   for i in range(0, min(len(val), job.train.batch_size * job.train.eval_batches), job.train.batch_size)]
    trainer = Trainer(model, cfg, job.train, batches, out, val_batches=val_batches or None,
                      run_config=run.to_dict(), progress=job.progress)
    if job.resume:
        trainer.resume()
    if job.progress:
        print(f"SFT: {report['train']:,} training / {report['val']:,} validation conversations "
              f"({report['skipped']} skipped, {report['truncated_prompt']} prompts and "
              f"{report['truncated_reply']} replies truncated to {cfg.max_seq_len} tokens)")
    summary = trainer.fit()
    summary["data"] = report
    try:
        from babyllama.train.plot import plot_loss

        summary["plot"] = str(plot_loss(out / "metrics.jsonl", out / "loss.png", title="babyllama SFT"))
    except Exception as e:
        print(f"could not draw the loss curve: {e}")
    return summary
