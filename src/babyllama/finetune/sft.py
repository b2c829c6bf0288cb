"""Supervised fine-tuning: conversations in, an assistant out. Loss on assistant tokens only."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from babyllama.config import ConfigError, LoraConfig, RunConfig, TrainConfig, check_float
from babyllama.data.sft import (PackedSFTBatches, SFTBatches, SFTSample, SFTStats, build_sft_samples, collate,
                                collate_packed, fit_to_window, is_prepared_sft, load_prepared_sft,
                                samples_fingerprint)
from babyllama.tokenizer.chat import ChatTemplate
from babyllama.train.objectives import AssistantTokens
from babyllama.train.stage import StageParts, StageRun, attach_bitnet, attach_lora, describe_lora, run_stage


def default_sft_train(lora: bool = False) -> TrainConfig:
    """The fine-tuning defaults. LoRA's updates start at zero and are scaled by alpha / rank, so it
    wants a larger learning rate than full fine-tuning (its most reported failure is "LoRA does
    nothing" at a full fine-tuning rate); measured on the demo's task, README "LoRA"."""
    return TrainConfig(batch_size=16, max_steps=500, lr=LORA_LR if lora else 5e-4, min_lr=(LORA_LR if lora else 5e-4) / 10,
                       warmup_steps=20, weight_decay=0.0, eval_interval=100, eval_batches=10, log_interval=10,
                       ckpt_interval=250)


LORA_LR = 2e-3


@dataclass
class SFTJob:
    ckpt: str  # the pretrained run (or checkpoint) to start from
    data: list[str]  # SFT files (FILE or FILE::FORMAT) or directories from `babyllama data sft`
    out: str
    train: TrainConfig | None = None  # None: default_sft_train(lora=...)
    layout: str = "auto"
    val_fraction: float = 0.02
    resume: bool = False
    from_scratch: bool = False  # same shape, random weights: what pretraining bought, for comparison
    on_error: str = "skip"
    progress: bool = True
    pack: bool = False  # several short conversations per row (rows of max_seq_len tokens), kept apart
    stop_at_step: int | None = None  # pause here with a checkpoint; resume continues the same schedule
    dropout: float | None = None  # override the model's dropout while fine-tuning (small data overfits)
    overwrite: bool = False  # start over in an `out` that holds a run (babyllama's files only are removed)
    allow_unverified: bool = False  # accept checkpoints without checksums.json (--ckpt, --resume)
    encoding: str = "utf-8"  # of the SFT files (GB18030/GBK corpora: "gb18030")
    lora: LoraConfig | None = None  # train LoRA/DoRA adapters over the frozen model instead of every weight

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = default_sft_train(lora=self.lora is not None)
        if self.lora is not None and self.from_scratch:
            raise ConfigError("--lora adapts a trained model; it cannot start --from-scratch")
        check_float("--val-fraction", self.val_fraction, 0, 1, high_open=True)
        if self.dropout is not None:
            check_float("--dropout", self.dropout, 0, 1, high_open=True)
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"--on-error must be skip or raise, got {self.on_error!r}")
        if not self.data:
            raise ConfigError("--data: give at least one SFT file or prepared directory")


def load_sft_samples(data: list[str], template: ChatTemplate, max_len: int, layout: str = "auto",
                     val_fraction: float = 0.02, on_error: str = "skip", verbose: bool = True,
                     encoding: str = "utf-8"):
    """(train, val, report) from SFT files (read and tokenized now) and/or directories that
    `babyllama data sft` prepared (checked against the model's tokenizer)."""
    prepared = [d for d in data if is_prepared_sft(d)]
    files = [d for d in data if d not in prepared]
    train, val, report = build_sft_samples(files, template, max_len, layout, val_fraction, on_error, verbose,
                                           encoding=encoding) \
        if files else ([], [], {"conversations": 0, "skipped": 0, "skipped_where": [], "fixed": 0,
                                 "truncated_prompt": 0, "truncated_reply": 0})
    for directory in prepared:
        t, v, m = load_prepared_sft(directory, template.tok.fingerprint)
        cut = SFTStats()  # prepared for a longer window than this model's: the same policy again
        t, v = ([SFTSample(*fit_to_window(s.ids, s.labels, max_len, cut, template.header_len)) for s in split]
                for split in (t, v))
        train, val = train + t, val + v
        for key in ("conversations", "skipped", "fixed", "truncated_prompt", "truncated_reply"):
            report[key] = report.get(key, 0) + m.get(key, 0) + getattr(cut, key, 0)
    report.update(train=len(train), val=len(val), max_len=max_len)
    return train, val, report


def sft(job: SFTJob) -> dict:
    run = StageRun.from_job(job, stage="sft", train=job.train, inputs=[*job.data, job.ckpt],
                            retry_hint=f"or fine-tune further in a new run: --ckpt {job.out}",
                            plot_title="babyllama SFT")
    return run_stage(run, lambda env: _build(job, env))


def _build(job: SFTJob, env) -> StageParts:
    from babyllama.infer.generate import load_for_inference

    show = job.progress and env.is_main
    model, tok, src_ckpt = load_for_inference(job.ckpt, "cpu", for_decoding=False,
                                              allow_unverified=job.allow_unverified)
    if job.dropout is not None and job.dropout != model.config.dropout:
        import dataclasses

        from babyllama.model import Llama

        tuned = Llama(dataclasses.replace(model.config, dropout=job.dropout))
        tuned.load_state_dict(model.state_dict())
        model = tuned
    model.train()
    if job.from_scratch:
        torch.manual_seed(job.train.seed)
        model.reset_parameters()
    template = ChatTemplate(tok)
    attach_bitnet(model, job.train)
    base = attach_lora(model, job.lora, src_ckpt, job.train.seed, chat_ids=(template.start_id, template.end_id))
    cfg = model.config
    train, val, report = load_sft_samples(job.data, template, cfg.max_seq_len + 1, job.layout, job.val_fraction,
                                          job.on_error, show, encoding=job.encoding)
    bs = job.train.batch_size
    vbs = bs * env.world_size  # validation batches are global: each rank evaluates its share
    val_rows = val[:vbs * job.train.eval_batches]
    if job.pack:
        batches = PackedSFTBatches(train, bs, tok.pad_id, capacity=cfg.max_seq_len, seed=job.train.seed,
                                   rank=env.rank, world_size=env.world_size)
        val_batches = [collate_packed([[s] for s in val_rows[i:i + vbs]], tok.pad_id)
                       for i in range(0, len(val_rows), vbs)]
    else:
        batches = SFTBatches(train, bs, tok.pad_id, seed=job.train.seed, rank=env.rank, world_size=env.world_size)
        val_batches = [collate(val_rows[i:i + vbs], tok.pad_id) for i in range(0, len(val_rows), vbs)]
    description = (f"SFT: {report['train']:,} training / {report['val']:,} validation conversations "
                   f"({report['skipped']} skipped, {report.get('fixed', 0)} fixed, {report['truncated_prompt']} "
                   f"prompts and {report['truncated_reply']} replies truncated to {cfg.max_seq_len} tokens)")
    return StageParts(model, AssistantTokens(), batches, val_batches,
                      data={"path": ", ".join(job.data), "fingerprint": samples_fingerprint(train, val)},
                      tokenizer=tok, config=RunConfig(model=cfg, train=job.train, lora=job.lora),
                      run_info={"source_checkpoint": str(src_ckpt)},
                      files={"sft_data.json": json.dumps({**report, "source_checkpoint": str(src_ckpt)}, indent=2,
                                                         ensure_ascii=False)},
                      describe=lambda trainer: description + describe_lora(model), summary={"data": report},
                      base_checkpoint=base)

