"""Reward models: our model with a scalar head (adapters/heads.py), trained on preference pairs with
the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)), as an objective of the one loop.

A sequence's reward is the head's output at its last token, the `<|im_end|>` that closes the reply:
the model has read the prompt and the whole reply there. Logged: the loss, `reward_accuracy` (the
share of pairs scored the right way round, on the held-out pairs as val_reward_accuracy), the mean
margin and the mean rewards of chosen and rejected replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from babyllama.config import ConfigError, IGNORE_INDEX, RunConfig, TrainConfig, check_float
from babyllama.train.objectives import Batch, Objective


class PairwiseReward(Objective):
    """Bradley-Terry over batches (tokens, last) of `collate_scored`: the count is the pairs."""

    name = "reward"

    def count(self, batch: Batch) -> int:
        if len(batch) != 2 or batch[0].dim() != 3:
            raise ValueError("the reward objective trains on (tokens, last) batches of pairs")
        return batch[0].shape[0]

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, last = batch
        rewards = sequence_rewards(model, tokens, last)
        margin = rewards[:, 0] - rewards[:, 1]
        detached = rewards.detach()
        return -F.logsigmoid(margin).sum(), {
            "reward_accuracy": (margin.detach() > 0).float().sum(), "reward_margin": margin.detach().sum(),
            "reward_chosen": detached[:, 0].sum(), "reward_rejected": detached[:, 1].sum()}


def sequence_rewards(model, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(pairs, 2) rewards of (pairs, 2, width) token batches, read at each sequence's `last` index."""
    pairs, sides, width = tokens.shape
    scores = model(tokens.reshape(pairs * sides, width)).float().squeeze(-1)  # (rows, width)
    return scores.gather(1, last.reshape(pairs * sides, 1)).view(pairs, sides)


def scored_ids(ids: list[int], labels: list[int]) -> list[int]:
    """A prompt + reply sequence cut after the reply's last scored token (`<|im_end|>`)."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:end + 1]


def collate_scored(samples: list, pad_id: int):
    """(tokens (pairs, 2, width) right-padded, last (pairs, 2): the index of each sequence's last token)."""
    seqs = [[scored_ids(*s.chosen), scored_ids(*s.rejected)] for s in samples]
    width = max(len(x) for pair in seqs for x in pair)
    tokens = torch.full((len(samples), 2, width), pad_id, dtype=torch.long)
    last = torch.zeros(len(samples), 2, dtype=torch.long)
    for row, pair in enumerate(seqs):
        for side, ids in enumerate(pair):
            tokens[row, side, :len(ids)] = torch.tensor(ids)
            last[row, side] = len(ids) - 1
    return tokens, last


def default_reward_train() -> TrainConfig:
    return TrainConfig(batch_size=8, max_steps=300, lr=5e-5, min_lr=5e-6, warmup_steps=10, weight_decay=0.0,
                       eval_interval=50, eval_batches=8, log_interval=10, ckpt_interval=150)


@dataclass
class RewardJob:
    ckpt: str  # the model to start from (an SFT run, usually)
    data: list[str]  # preference files (FILE or FILE::LAYOUT)
    out: str
    train: TrainConfig | None = None
    layout: str = "auto"
    val_fraction: float = 0.05
    on_error: str = "skip"
    encoding: str = "utf-8"
    resume: bool = False
    overwrite: bool = False
    stop_at_step: int | None = None
    allow_unverified: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = default_reward_train()
        check_float("--val-fraction", self.val_fraction, 0, 1, high_open=True)
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"--on-error must be skip or raise, got {self.on_error!r}")
        if not self.data:
            raise ConfigError("--data: give at least one preference file")


def train_reward(job: RewardJob) -> dict:
    from babyllama.train.stage import StageRun, run_stage

    run = StageRun.from_job(job, stage="reward", train=job.train, inputs=[*job.data, job.ckpt],
                            retry_hint=f"or start a new run from it: --ckpt {job.out}",
                            plot_title="babyllama reward model")
    return run_stage(run, lambda env: _build(job, env))


def _build(job: RewardJob, env):
    from babyllama.adapters.heads import ScalarHead
    from babyllama.data.preference import PairBatches, build_pairs
    from babyllama.infer.generate import load_for_inference
    from babyllama.tokenizer.chat import ChatTemplate
    from babyllama.transforms import apply_transforms
    from babyllama.train.stage import StageParts

    model, tok, src_ckpt = load_for_inference(job.ckpt, "cpu", for_decoding=False,
                                              allow_unverified=job.allow_unverified)
    torch.manual_seed(job.train.seed)
    apply_transforms(model, [ScalarHead()])
    model.train()
    cfg = model.config
    train, val, report = build_pairs(job.data, ChatTemplate(tok), cfg.max_seq_len, job.layout, job.val_fraction,
                                     job.on_error, job.encoding, verbose=job.progress and env.is_main)
    bs = job.train.batch_size
    vbs = bs * env.world_size
    val_rows = val[:vbs * job.train.eval_batches]
    batches = PairBatches(train, bs, tok.pad_id, seed=job.train.seed, rank=env.rank, world_size=env.world_size,
                          collate=collate_scored)
    val_batches = [collate_scored(val_rows[i:i + vbs], tok.pad_id) for i in range(0, len(val_rows), vbs)]
    description = (f"reward model (Bradley-Terry): {report['train']:,} training / {report['val']:,} held-out pairs "
                   f"({report['skipped']} skipped, {report['truncated_prompt']} prompts and "
                   f"{report['truncated_reply']} replies truncated to {cfg.max_seq_len} tokens)")
    from babyllama.align.dpo import _pairs_fingerprint

    return StageParts(model, PairwiseReward(), batches, val_batches,
                      data={"path": ", ".join(job.data), "fingerprint": _pairs_fingerprint(train, val)}, tokenizer=tok,
                      config=RunConfig(model=cfg, train=job.train),
                      run_info={"source_checkpoint": str(src_ckpt)},
                      files={"reward_data.json": json.dumps({**report, "source_checkpoint": str(src_ckpt)},
                                                            indent=2, ensure_ascii=False)},
                      describe=lambda trainer: description, summary={"data": report})
