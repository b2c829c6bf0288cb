"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023), as an
objective of the one training loop.

For a pair (chosen c, rejected r) after prompt x, with log-probabilities of the reply tokens only
under the policy (log pi) and under the reference (log ref, the model DPO starts from):

    ratio_c = log pi(c|x) - log ref(c|x),   ratio_r likewise
    sigmoid (DPO):  loss = -log sigmoid(beta * (ratio_c - ratio_r))
    ipo:            loss = (ratio_c / |c| - ratio_r / |r| - 1 / (2 beta))^2   (per-token averages, as TRL)

The implicit rewards are beta * ratio; the logged `reward_margin` is their difference and
`pref_accuracy` the share of pairs whose chosen reward is the higher. The reference never changes,
so its log-probabilities are computed once, before training, and travel in the batches: no second
model in memory. At the first step the policy is the reference, every ratio is 0 and the loss is
exactly ln 2 (sigmoid); a loss that stays there is a learning rate too small to move the policy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from babyllama.config import ConfigError, IGNORE_INDEX, LoraConfig, RunConfig, TrainConfig, check_float
from babyllama.train.objectives import Batch, Objective

DPO_LOSSES = ("sigmoid", "ipo")


class PreferencePairs(Objective):
    """DPO / IPO over batches (tokens, targets, ref) of data/preference.collate_pairs: the count is
    the number of pairs."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid"):
        check_float("--beta", beta, 0, low_open=True)
        if loss not in DPO_LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(DPO_LOSSES)}, got {loss!r}")
        self.beta, self.kind = beta, loss

    def count(self, batch: Batch) -> int:
        if len(batch) != 3 or batch[0].dim() != 3:
            raise ValueError("the DPO objective trains on (tokens, targets, ref) batches of pairs")
        return batch[0].shape[0]

    def tokens(self, batch: Batch) -> int:
        return batch[0].numel()

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, targets, ref = batch
        logps = sequence_logps(model, tokens, targets)
        ratio = logps - ref.to(logps.dtype)
        if self.kind == "sigmoid":
            losses = -F.logsigmoid(self.beta * (ratio[:, 0] - ratio[:, 1]))
        else:
            lengths = (targets != IGNORE_INDEX).sum(-1).clamp(min=1).to(ratio.dtype)
            per_token = ratio / lengths
            losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * self.beta)) ** 2
        rewards = self.beta * ratio.detach()
        metrics = {"reward_chosen": rewards[:, 0].sum(), "reward_rejected": rewards[:, 1].sum(),
                   "reward_margin": (rewards[:, 0] - rewards[:, 1]).sum(),
                   "pref_accuracy": (rewards[:, 0] > rewards[:, 1]).float().sum(),
                   "logp_chosen": logps[:, 0].detach().sum(), "logp_rejected": logps[:, 1].detach().sum()}
        return losses.sum(), metrics


def sequence_logps(model, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(pairs, 2) summed log-probabilities of the target tokens (the replies) of (pairs, 2, width)
    batches, in one forward pass over all 2 x pairs sequences."""
    pairs, sides, width = tokens.shape
    per_token = model(tokens.reshape(pairs * sides, width), targets.reshape(pairs * sides, width), reduction="none")
    return -per_token.sum(-1).view(pairs, sides)


@torch.no_grad()
def reference_logps(model, samples: list, pad_id: int, batch_size: int = 16, progress: bool = False) -> None:
    """Fill each PairSample's `ref` with the model's log-probs of its two replies (eval mode)."""
    from tqdm import tqdm

    from babyllama.data.preference import collate_pairs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].chosen[0]) + len(samples[i].rejected[0]))
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="reference log-probs",
                      unit="batch", leave=False):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        tokens, targets, _ = collate_pairs(chunk, pad_id)
        logps = sequence_logps(model, tokens.to(device), targets.to(device)).double().cpu()
        for sample, row in zip(chunk, logps.tolist()):
            sample.ref = (row[0], row[1])
    model.train(was_training)


# --- the stage ----------------------------------------------------------------------------------------

def default_dpo_train(lora: bool = False) -> TrainConfig:
    """DPO's defaults. The policy starts at the reference, so small steps matter: full fine-tuning
    at 5e-6 (TRL's 1e-6 barely moves a small model in a few hundred steps: the loss sits at ln 2),
    LoRA at 5e-4 (its updates start at zero)."""
    lr = 5e-4 if lora else 5e-6
    return TrainConfig(batch_size=8, max_steps=300, lr=lr, min_lr=lr / 10, warmup_steps=10, weight_decay=0.0,
                       eval_interval=50, eval_batches=8, log_interval=10, ckpt_interval=150)


@dataclass
class DPOJob:
    ckpt: str  # the SFT run (or checkpoint): policy and reference
    data: list[str]  # preference files (FILE or FILE::LAYOUT)
    out: str
    beta: float | None = None  # None: the resumed run's, else 0.1
    loss: str | None = None  # sigmoid (DPO) | ipo; None: the resumed run's, else sigmoid
    train: TrainConfig | None = None  # None: default_dpo_train(lora=...)
    lora: LoraConfig | None = None
    layout: str = "auto"
    chat: bool = True  # False: plain-text pairs (a prompt and two continuations) for a pretrained model
    val_fraction: float | None = None  # None: the resumed run's, else 0.05
    on_error: str = "skip"  # preference sets are messy (the shared one has pairs with chosen == rejected)
    encoding: str = "utf-8"
    resume: bool = False
    overwrite: bool = False
    stop_at_step: int | None = None
    allow_unverified: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = default_dpo_train(lora=self.lora is not None)
        self._settings_of_the_run()
        PreferencePairs(self.beta, self.loss)  # checks beta and loss
        check_float("--val-fraction", self.val_fraction, 0, 1, high_open=True)
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"--on-error must be skip or raise, got {self.on_error!r}")
        if not self.data:
            raise ConfigError("--data: give at least one preference file")


    def _settings_of_the_run(self) -> None:
        """A resumed run keeps its beta, loss and held-out split (run.json records them): left
        unset they are taken from there, and set to something else they are refused."""
        from pathlib import Path

        recorded = {}
        run_json = Path(self.out) / "run.json"
        if self.resume and run_json.is_file():
            recorded = json.loads(run_json.read_text(encoding="utf-8")).get("dpo", {})
        for name, flag, default in (("beta", "--beta", 0.1), ("loss", "--loss", "sigmoid"),
                                    ("val_fraction", "--val-fraction", 0.05)):
            mine, theirs = getattr(self, name), recorded.get(name)
            if mine is None:
                setattr(self, name, theirs if theirs is not None else default)
            elif theirs is not None and mine != theirs:
                raise ConfigError(f"{flag} {mine} differs from the run's {theirs}: a resumed run keeps its "
                                  f"settings (leave {flag} out, or start a new run)")


def dpo(job: DPOJob) -> dict:
    from babyllama.train.stage import StageRun, run_stage

    run = StageRun.from_job(job, stage="dpo", train=job.train, inputs=[*job.data, job.ckpt],
                            retry_hint=f"or align further in a new run: --ckpt {job.out}", plot_title="babyllama DPO")
    return run_stage(run, lambda env: _build(job, env))


def _build(job: DPOJob, env):
    from babyllama.data.preference import PairBatches, build_pairs, collate_pairs
    from babyllama.infer.generate import load_for_inference
    from babyllama.tokenizer.chat import ChatTemplate, PlainText
    from babyllama.train.stage import StageParts, attach_lora, describe_lora

    show = job.progress and env.is_main
    model, tok, src_ckpt = load_for_inference(job.ckpt, "cpu", for_decoding=False,
                                              allow_unverified=job.allow_unverified)
    template = ChatTemplate(tok) if job.chat else PlainText(tok)
    cfg = model.config
    train, val, report = build_pairs(job.data, template, cfg.max_seq_len + 1, job.layout, job.val_fraction,
                                     job.on_error, job.encoding, verbose=show)
    # the reference is the model as loaded: its log-probs once, before any adapter or step changes
    # it, on the device training will use (the Trainer moves the model there anyway)
    from babyllama.runtime import pick_device
    from babyllama.train.distributed import rank_device

    model.to(rank_device(pick_device(job.train.device), env))
    reference_logps(model, train + val, tok.pad_id, progress=show)
    model.train()
    base = attach_lora(model, job.lora, src_ckpt, job.train.seed,
                       chat_ids=(template.start_id, template.end_id) if job.chat else ())
    bs = job.train.batch_size
    vbs = bs * env.world_size
    val_rows = val[:vbs * job.train.eval_batches]
    batches = PairBatches(train, bs, tok.pad_id, seed=job.train.seed, rank=env.rank, world_size=env.world_size)
    val_batches = [collate_pairs(val_rows[i:i + vbs], tok.pad_id) for i in range(0, len(val_rows), vbs)]
    description = (f"DPO ({job.loss}, beta {job.beta:g}): {report['train']:,} training / {report['val']:,} held-out "
                   f"pairs ({report['skipped']} skipped, {report['truncated_prompt']} prompts and "
                   f"{report['truncated_reply']} replies truncated to {cfg.max_seq_len} tokens); reference "
                   f"log-probs cached; a first loss of {math.log(2):.4f} (ln 2) is the policy equal to it")
    fingerprint = _pairs_fingerprint(train, val)
    return StageParts(model, PreferencePairs(job.beta, job.loss), batches, val_batches,
                      data={"path": ", ".join(job.data), "fingerprint": fingerprint}, tokenizer=tok,
                      config=RunConfig(model=cfg, train=job.train, lora=job.lora),
                      run_info={"source_checkpoint": str(src_ckpt),
                                "dpo": {"beta": job.beta, "loss": job.loss, "val_fraction": job.val_fraction,
                                        "chat": job.chat}},
                      files={"dpo_data.json": json.dumps({**report, "source_checkpoint": str(src_ckpt)}, indent=2,
                                                         ensure_ascii=False)},
                      describe=lambda trainer: description + describe_lora(model), summary={"data": report},
                      base_checkpoint=base)


def _pairs_fingerprint(train: list, val: list) -> str:
    import hashlib

    h = hashlib.sha256()
    for split in (train, val):
        for s in split:
            h.update(json.dumps([s.chosen[0], s.rejected[0]]).encode())
        h.update(b"|")
    return h.hexdigest()[:16]
