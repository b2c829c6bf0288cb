"""GRPO (group relative policy optimisation, Shao et al. 2024): RL with a group of sampled answers
per prompt and no value model, as an objective of the one training loop.

Each micro-batch is a fresh rollout (`GroupRollouts`, a batch source): `prompts_per_batch` prompts,
`group_size` completions each, sampled by the inference Engine's batched KV-cache decoding from the
current policy; every completion is rewarded (a Python function or a reward model, align/rewards.py)
and its advantage is its reward normalised within its group,

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)          (std with Bessel's correction, as TRL)

The objective (`GroupPolicy`) then minimises, per completion token t, with ratio = pi / pi_old,

    -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta (exp(ref - logp) - (ref - logp) - 1)

(the clipped surrogate and the k3 estimate of KL(pi || ref)), averaged over each completion's tokens
and then over completions: TRL's `loss_type="grpo"`. One optimisation step is taken per rollout, so
pi_old is the policy itself (ratio 1, gradient A * grad log pi), as TRL's default. The reference
is the policy as loaded, frozen. Logged: reward, KL, the clip fraction, an entropy estimate (the
mean -log p of the sampled tokens, unbiased for the entropy at temperature 1) and completion length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from babyllama.config import ConfigError, IGNORE_INDEX, LoraConfig, RunConfig, TrainConfig, check_float, check_int
from babyllama.train.objectives import Batch, Objective


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps), rewards laid out group after group."""
    groups = rewards.double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1).float()


class GroupPolicy(Objective):
    """GRPO over batches (tokens, targets, advantages, ref_logps, rewards) of `GroupRollouts`:
    the count is the number of completions."""

    name = "grpo"

    def __init__(self, beta: float = 0.04, clip: float = 0.2):
        check_float("--beta", beta, 0)
        check_float("--clip", clip, 0, 1, low_open=True, high_open=True)
        self.beta, self.clip = beta, clip

    def count(self, batch: Batch) -> int:
        if len(batch) != 5:
            raise ValueError("the GRPO objective trains on rollouts (tokens, targets, advantages, ref_logps, rewards)")
        return batch[0].shape[0]

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, targets, advantages, ref_logps, rewards = batch
        mask = (targets != IGNORE_INDEX).float()
        logps = -model(tokens, targets, reduction="none")  # (rows, width), 0 where no target
        per_seq, metrics = grpo_loss(logps, logps.detach(), ref_logps, advantages, mask, self.beta, self.clip)
        lengths = mask.sum(-1)
        metrics.update(reward=rewards.sum(), completion_len=lengths.sum(),
                       entropy=((-logps.detach() * mask).sum(-1) / lengths.clamp(min=1)).sum())
        return per_seq.sum(), metrics


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-completion losses, summed metrics) from per-token log-probs (rows, width)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    surrogate = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    log_ref_ratio = ref_logps - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = surrogate + beta * kl
    lengths = mask.sum(-1).clamp(min=1)
    per_seq = (per_token * mask).sum(-1) / lengths
    clipped = ((ratio < 1 - clip) | (ratio > 1 + clip)).float()
    return per_seq, {"kl": ((kl.detach() * mask).sum(-1) / lengths).sum(),
                     "clip_fraction": ((clipped * mask).sum(-1) / lengths).sum()}


# --- prompts ----------------------------------------------------------------------------------------

def read_prompts(path: str) -> list[list]:
    """Prompts as conversations ending with a user turn: a .txt file (one prompt a line) or JSON lines
    / a JSON array of {"prompt": text | messages}, {"question"}, {"instruction", "input"},
    {"messages"} or {"conversations"} (a trailing assistant turn is dropped: its prompt is kept)."""
    from pathlib import Path

    from babyllama.corpus.readers import DataError, ReadStats, check_readable
    from babyllama.data.preference import _prompt
    from babyllama.data.sft import checked_records
    from babyllama.tokenizer.chat import Message

    path = Path(path)
    check_readable(path)
    if path.suffix == ".txt":
        return [[Message("user", line.strip())] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def convert(rec):
        if not isinstance(rec, dict):
            raise TypeError("a record is not a JSON object")
        if "prompt" in rec:
            msgs = _prompt(rec["prompt"])
        elif "question" in rec:
            msgs = _prompt(rec["question"])
        elif "instruction" in rec:
            msgs = _prompt(rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else ""))
        elif "messages" in rec or "conversations" in rec:
            msgs = _prompt(rec.get("messages", rec.get("conversations")))
        else:
            raise KeyError("prompt")
        while msgs and msgs[-1].role == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1].role != "user" or not msgs[-1].content.strip():
            raise ValueError("no user turn to answer")
        return msgs

    out = [msgs for _, msgs in checked_records(path, "auto", ReadStats(), "raise", "utf-8", convert)]
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


# --- rollouts ---------------------------------------------------------------------------------------

class GroupRollouts:
    """A batch source whose batches are fresh rollouts of the current policy (see the module doc).

    Prompts come in a shuffled, resumable order (the same as SFT's batches); each rollout's
    sampling seed follows from the run's seed and the rollout's place in that order, so a resumed
    run samples what the uninterrupted one did."""

    def __init__(self, policy, reference, tokenizer, prompts: list, reward, group_size: int = 8,
                 prompts_per_batch: int = 2, max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        from babyllama.data.batches import ShuffledBatches
        from babyllama.tokenizer.chat import ChatTemplate

        self.policy, self.reference, self.tok, self.reward = policy, reference, tokenizer, reward
        self.template = ChatTemplate(tokenizer)
        self.prompts, self.group_size, self.max_new_tokens = prompts, group_size, max_new_tokens
        self.temperature, self.seed = temperature, seed
        source = self

        class Order(ShuffledBatches):
            num_items = len(prompts)

            def make_batch(self, indices):
                return source.rollout([int(i) for i in indices], self.epoch * 1_000_003 + self.cursor)

        if len(prompts) < prompts_per_batch * world_size:
            raise ConfigError(f"{len(prompts)} prompts are fewer than one batch ({prompts_per_batch * world_size})")
        self.order = Order(prompts_per_batch, seed, rank, world_size)
        self.rank = rank

    def next_batch(self):
        return self.order.next_batch()

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)

    @torch.no_grad()
    def rollout(self, prompt_indices: list[int], where: int):
        from babyllama.infer.engine import Engine
        from babyllama.infer.sampling import SamplingConfig

        G = self.group_size
        convs = [self.prompts[i] for i in prompt_indices]
        prompt_ids = [self.template.prompt_ids(c) for c in convs]
        rows = [ids for ids in prompt_ids for _ in range(G)]
        seed = (self.seed * 7_919 + where * 104_729 + self.rank * 15_485_863) % 2**62
        sampling = SamplingConfig(temperature=self.temperature, top_k=0, top_p=1.0, repetition_penalty=1.0)
        training = self.policy.training
        engine = Engine(self.policy, self.tok, compile_step=False)  # puts the policy in eval mode
        room = max(1, self.policy.config.max_seq_len - max(len(r) for r in rows))
        # one draw for the whole batch per step, from a generator seeded by the rollout's place:
        # the rows of a group differ, and a resumed run samples what the uninterrupted one did
        devices = [self.policy.rope.cos.device] if self.policy.rope.cos.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            outs = engine.generate(rows, min(self.max_new_tokens, room), sampling, stop_ids=[self.template.end_id])
        self.policy.train(training)
        completions = []
        for ids in outs:  # a reply that ended closes with <|im_end|>, learned like every reply token
            ended = len(ids) < min(self.max_new_tokens, room)
            completions.append(list(ids) + ([self.template.end_id] if ended else []))
        texts = [self.tok.decode([t for t in c if t != self.template.end_id]) for c in completions]
        rewards = torch.tensor(self._rewards(convs, rows, completions, texts), dtype=torch.float32)
        advantages = group_advantages(rewards, G)
        width = max(len(p) + len(c) for p, c in zip(rows, completions)) - 1
        tokens = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (p, c) in enumerate(zip(rows, completions)):
            seq = p + c
            tokens[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            if c:
                targets[r, len(p) - 1:len(seq) - 1] = torch.tensor(c)
        where_ref = next(self.reference.parameters()).device
        ref_logps = -self.reference(tokens.to(where_ref), targets.to(where_ref), reduction="none").cpu()
        return tokens, targets, advantages, ref_logps, rewards

    def _rewards(self, convs, rows, completions, texts) -> list[float]:
        if hasattr(self.reward, "score"):  # a reward model: prompt + completion, scored at its end
            return self.reward.score([p + c for p, c in zip(rows, completions)], self.tok.pad_id)
        prompts = [conv[-1].content for conv in convs for _ in range(self.group_size)]
        return [float(self.reward(p, t)) for p, t in zip(prompts, texts)]


# --- the stage --------------------------------------------------------------------------------------

def default_grpo_train(lora: bool = False) -> TrainConfig:
    """batch_size counts prompts per micro-batch (each gives group_size completions)."""
    lr = 5e-4 if lora else 1e-5
    return TrainConfig(batch_size=2, max_steps=200, lr=lr, min_lr=lr / 10, warmup_steps=5, weight_decay=0.0,
                       eval_interval=10_000, eval_batches=1, log_interval=5, ckpt_interval=50, grad_clip=1.0)


@dataclass
class GRPOJob:
    ckpt: str  # the SFT run (policy and reference)
    prompts: str  # a prompts file
    out: str
    reward_fn: str | None = None  # MODULE:FUNC
    reward_model: str | None = None  # a reward model run
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    beta: float = 0.04
    clip: float = 0.2
    train: TrainConfig | None = None
    lora: LoraConfig | None = None
    resume: bool = False
    overwrite: bool = False
    stop_at_step: int | None = None
    allow_unverified: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = default_grpo_train(lora=self.lora is not None)
        if (self.reward_fn is None) == (self.reward_model is None):
            raise ConfigError("give one reward: --reward-fn MODULE:FUNC or --reward REWARD_MODEL_RUN")
        check_int("--group-size", self.group_size, 2)
        check_int("--max-new-tokens", self.max_new_tokens, 1)
        check_float("--temperature", self.temperature, 0, low_open=True)
        GroupPolicy(self.beta, self.clip)


def grpo(job: GRPOJob) -> dict:
    from babyllama.train.stage import StageRun, run_stage

    run = StageRun.from_job(job, stage="grpo", train=job.train,
                            inputs=[job.prompts, job.ckpt, job.reward_model],
                            retry_hint=f"or continue in a new run: --ckpt {job.out}", plot_title="babyllama GRPO")
    return run_stage(run, lambda env: _build(job, env))


def _build(job: GRPOJob, env):
    import copy
    import hashlib

    from babyllama.align.rewards import ModelReward, load_reward_fn
    from babyllama.infer.generate import load_for_inference
    from babyllama.tokenizer.chat import ChatTemplate
    from babyllama.train.stage import StageParts, attach_lora, describe_lora

    if env.world_size > 1 and job.train.parallel == "fsdp":
        raise ConfigError("GRPO generates with the whole policy on every rank: use --parallel ddp (the default)")
    model, tok, src_ckpt = load_for_inference(job.ckpt, "cpu", for_decoding=False,
                                              allow_unverified=job.allow_unverified)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    reward = load_reward_fn(job.reward_fn) if job.reward_fn else ModelReward(job.reward_model,
                                                                              allow_unverified=job.allow_unverified)
    prompts = read_prompts(job.prompts)
    template = ChatTemplate(tok)
    model.train()
    base = attach_lora(model, job.lora, src_ckpt, job.train.seed, chat_ids=(template.start_id, template.end_id))
    device = None

    class OnDevice(GroupRollouts):  # the Trainer moves the model; the rollout follows it
        def rollout(self, indices, where):
            nonlocal device
            here = next(self.policy.parameters()).device
            if device != here:
                self.reference.to(here)
                if hasattr(self.reward, "model"):
                    self.reward.model.to(here)
                device = here
            return [t.cpu() for t in super().rollout(indices, where)]

    batches = OnDevice(model, reference, tok, prompts, reward, job.group_size, job.train.batch_size,
                       job.max_new_tokens, job.temperature, job.train.seed, env.rank, env.world_size)
    reward_name = job.reward_fn or f"reward model {job.reward_model}"
    description = (f"GRPO: {len(prompts):,} prompts, {job.train.batch_size} per micro-batch x {job.group_size} "
                   f"completions (<= {job.max_new_tokens} tokens, temperature {job.temperature:g}); reward "
                   f"{reward_name}; beta {job.beta:g}, clip {job.clip:g}")
    fingerprint = hashlib.sha256(json.dumps([[(m.role, m.content) for m in p] for p in prompts],
                                            ensure_ascii=False).encode()).hexdigest()[:16]
    return StageParts(model, GroupPolicy(job.beta, job.clip), batches, None,
                      data={"path": job.prompts, "fingerprint": fingerprint}, tokenizer=tok,
                      config=RunConfig(model=model.config, train=job.train, lora=job.lora),
                      run_info={"source_checkpoint": str(src_ckpt),
                                "grpo": {"reward": reward_name, "group_size": job.group_size, "beta": job.beta,
                                         "clip": job.clip, "max_new_tokens": job.max_new_tokens,
                                         "temperature": job.temperature}},
                      describe=lambda trainer: description + describe_lora(model), base_checkpoint=base)
