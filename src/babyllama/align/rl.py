"""Reinforcement learning from a reward, `babyllama rl --algo grpo|ppo`: one stage, one rollout path.

A rollout (`Rollouts`, the stage's batch source) samples `group_size` completions of each of
`prompts_per_batch` prompts from the current policy with the inference Engine's batched KV-cache
decoding, rewards each (a Python function or a reward model, align/rewards.py), and scores every
completion token under the policy as it sampled (pi_old; and PPO's values, from the same forward)
and under the frozen reference. The algorithm turns that into its batch and its objective:
GRPO (align/grpo.py) normalises the rewards within each group, PPO (align/ppo.py) runs GAE over
KL-penalised token rewards with a value head. Both train on the one Trainer like every stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial

import torch

from babyllama.config import ConfigError, IGNORE_INDEX, LoraConfig, RunConfig, TrainConfig, check_float, check_int

ALGOS = ("grpo", "ppo")


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

class Rollouts:
    """A batch source whose batches are rollouts of the current policy (see the module doc), each
    served `epochs` times in a row (a pending rollout is kept in the checkpoint's data state).

    `to_batch(policy, tokens, targets, old_logps, ref_logps, rewards)` makes the algorithm's batch.
    Prompts come in a shuffled, resumable order (the same as SFT's batches); each rollout's sampling
    seed follows from the run's seed and the rollout's place in that order, so a resumed run
    samples what the uninterrupted one did."""

    def __init__(self, policy, reference, tokenizer, prompts: list, reward, to_batch, group_size: int = 8,
                 prompts_per_batch: int = 2, max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                 epochs: int = 1, rank: int = 0, world_size: int = 1, chat: bool = True):
        from babyllama.data.batches import ShuffledBatches
        from babyllama.tokenizer.chat import ChatTemplate, PlainText

        self.policy, self.reference, self.tok, self.reward = policy, reference, tokenizer, reward
        self.to_batch = to_batch
        # chat: a prompt is a conversation and a completion ends with <|im_end|>; otherwise the prompt's
        # text is continued as the model was pretrained, up to an end-of-text
        self.template = ChatTemplate(tokenizer) if chat else PlainText(tokenizer)
        self.prompts, self.group_size, self.max_new_tokens = prompts, group_size, max_new_tokens
        self.temperature, self.seed, self.epochs = temperature, seed, epochs
        self.stop_id = self.template.end_id
        self.current, self.left = None, 0
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
        if self.left == 0:
            self.current, self.left = self.order.next_batch(), self.epochs
        self.left -= 1
        return self.current

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "left": self.left,
                "pending": list(self.current) if self.left else None}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.left = int(state["left"])
        self.current = tuple(state["pending"]) if self.left else None

    @torch.no_grad()
    def rollout(self, prompt_indices: list[int], where: int) -> tuple:
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
            outs = engine.generate(rows, min(self.max_new_tokens, room), sampling, stop_ids=[self.stop_id])
        self.policy.train(training)
        completions = []
        for ids in outs:  # a reply that ended closes with its stop token, learned like every reply token
            ended = len(ids) < min(self.max_new_tokens, room)
            completions.append(list(ids) + ([self.stop_id] if ended else []))
        texts = [self.tok.decode([t for t in c if t != self.stop_id]) for c in completions]
        rewards = torch.tensor(self._rewards(convs, rows, completions, texts), dtype=torch.float32)
        width = max(len(p) + len(c) for p, c in zip(rows, completions)) - 1
        tokens = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (p, c) in enumerate(zip(rows, completions)):
            seq = p + c
            tokens[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            if c:
                targets[r, len(p) - 1:len(seq) - 1] = torch.tensor(c)
        device = next(self.policy.parameters()).device
        tokens, targets = tokens.to(device), targets.to(device)
        # pi_old: the policy as it sampled, in the mode it trains in (PPO's value head records then)
        old_logps = -self.policy(tokens, targets, reduction="none")
        ref_logps = -self.reference(tokens, targets, reduction="none")
        batch = self.to_batch(self.policy, tokens, targets, old_logps, ref_logps, rewards.to(device))
        return tuple(t.cpu() for t in batch)

    def _rewards(self, convs, rows, completions, texts) -> list[float]:
        if hasattr(self.reward, "score"):  # a reward model: prompt + completion, scored at its end
            return self.reward.score([p + c for p, c in zip(rows, completions)], self.tok.pad_id)
        prompts = [conv[-1].content for conv in convs for _ in range(self.group_size)]
        return [float(self.reward(p, t)) for p, t in zip(prompts, texts)]


def grpo_parts(job: "RLJob"):
    from babyllama.align.grpo import GroupPolicy, group_batch

    return GroupPolicy(job.beta, job.clip), partial(group_batch, group_size=job.group_size)


def ppo_parts(job: "RLJob"):
    from babyllama.adapters.heads import value_tap
    from babyllama.align.ppo import ClippedPolicyValue, value_batch

    def to_batch(policy, tokens, targets, old_logps, ref_logps, rewards):
        return value_batch(policy, tokens, targets, old_logps, ref_logps, rewards,
                           old_values=value_tap(policy).take(), beta=job.beta, gamma=job.gamma, lam=job.lam)

    return ClippedPolicyValue(job.clip, job.value_clip, job.vf_coef), to_batch


# --- the stage --------------------------------------------------------------------------------------

def default_rl_train(lora: bool = False) -> TrainConfig:
    """batch_size counts prompts per micro-batch (each gives group_size completions)."""
    lr = 5e-4 if lora else 1e-5
    return TrainConfig(batch_size=2, max_steps=200, lr=lr, min_lr=lr / 10, warmup_steps=5, weight_decay=0.0,
                       eval_interval=10_000, eval_batches=1, log_interval=5, ckpt_interval=50, grad_clip=1.0)


DEFAULT_BETA = {"grpo": 0.04, "ppo": 0.05}  # TRL's defaults: GRPO's KL weight, PPO's kl_coef


@dataclass
class RLJob:
    ckpt: str  # the SFT run (policy and reference)
    prompts: str  # a prompts file
    out: str
    algo: str = "grpo"
    reward_fn: str | None = None  # MODULE:FUNC
    reward_model: str | None = None  # a reward model run
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    chat: bool = True  # False: prompts are plain text a pretrained model continues
    beta: float | None = None  # the KL weight (GRPO: in the loss; PPO: in the reward); None: DEFAULT_BETA
    clip: float = 0.2
    epochs: int = 1  # optimisation steps per rollout
    gamma: float = 1.0  # PPO: discount
    lam: float = 0.95  # PPO: GAE's lambda
    vf_coef: float = 0.1  # PPO: weight of the value loss
    value_clip: float = 0.2  # PPO: how far a value may move from the rollout's before its loss is clipped
    train: TrainConfig | None = None
    lora: LoraConfig | None = None
    resume: bool = False
    overwrite: bool = False
    stop_at_step: int | None = None
    allow_unverified: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo {self.algo!r}: choose one of {', '.join(ALGOS)}")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.algo]
        if self.train is None:
            self.train = default_rl_train(lora=self.lora is not None)
        if (self.reward_fn is None) == (self.reward_model is None):
            raise ConfigError("give one reward: --reward-fn MODULE:FUNC or --reward REWARD_MODEL_RUN")
        if self.algo == "ppo" and self.lora is not None:
            raise ConfigError("PPO trains its value head on the policy's own trunk: full fine-tuning only "
                              "(drop --lora, or use --algo grpo, which has no value model)")
        check_int("--group-size", self.group_size, 1 if self.algo == "ppo" else 2)
        check_int("--max-new-tokens", self.max_new_tokens, 1)
        check_int("--epochs", self.epochs, 1)
        check_float("--temperature", self.temperature, 0, low_open=True)
        check_float("--gamma", self.gamma, 0, 1)
        check_float("--lam", self.lam, 0, 1)
        (ppo_parts if self.algo == "ppo" else grpo_parts)(self)  # checks the objective's settings

    def settings(self) -> dict:
        """What run.json records of the algorithm."""
        keep = ["group_size", "beta", "clip", "epochs", "max_new_tokens", "temperature", "chat"]
        if self.algo == "ppo":
            keep += ["gamma", "lam", "vf_coef", "value_clip"]
        return {"algo": self.algo, "reward": self.reward_fn or f"reward model {self.reward_model}",
                **{k: getattr(self, k) for k in keep}}


def rl(job: RLJob) -> dict:
    from babyllama.train.stage import StageRun, run_stage

    run = StageRun.from_job(job, stage=job.algo, train=job.train,
                            inputs=[job.prompts, job.ckpt, job.reward_model],
                            retry_hint=f"or continue in a new run: --ckpt {job.out}",
                            plot_title=f"babyllama {job.algo.upper()}")
    return run_stage(run, lambda env: _build(job, env))


def _build(job: RLJob, env):
    import copy
    import hashlib

    from babyllama.align.rewards import ModelReward, load_reward_fn
    from babyllama.infer.generate import load_for_inference
    from babyllama.tokenizer.chat import ChatTemplate
    from babyllama.train.stage import StageParts, attach_lora, describe_lora

    if env.world_size > 1 and job.train.parallel == "fsdp":
        raise ConfigError("RL generates with the whole policy on every rank: use --parallel ddp (the default)")
    if env.world_size > 1 and job.epochs > 1:
        raise ConfigError("--epochs > 1 keeps each rank's rollout for the next steps, which a checkpoint "
                          "holds for one process only: use --epochs 1 with several processes")
    model, tok, src_ckpt = load_for_inference(job.ckpt, "cpu", for_decoding=False,
                                              allow_unverified=job.allow_unverified)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if job.algo == "ppo":
        from babyllama.adapters.heads import ValueHead
        from babyllama.transforms import applied, apply_transforms

        if ValueHead.name not in {r["name"] for r in applied(model)}:  # a PPO run continued keeps its own
            apply_transforms(model, [ValueHead()])
    reward = load_reward_fn(job.reward_fn) if job.reward_fn else ModelReward(job.reward_model,
                                                                              allow_unverified=job.allow_unverified)
    prompts = read_prompts(job.prompts)
    template = ChatTemplate(tok) if job.chat else None
    model.train()
    base = attach_lora(model, job.lora, src_ckpt, job.train.seed,
                       chat_ids=(template.start_id, template.end_id) if template else ())
    objective, to_batch = (ppo_parts if job.algo == "ppo" else grpo_parts)(job)
    device = None

    class OnDevice(Rollouts):  # the Trainer moves the model; the reference and reward model follow it
        def rollout(self, indices, where):
            nonlocal device
            here = next(self.policy.parameters()).device
            if device != here:
                self.reference.to(here)
                if hasattr(self.reward, "model"):
                    self.reward.model.to(here)
                device = here
            return super().rollout(indices, where)

    batches = OnDevice(model, reference, tok, prompts, reward, to_batch, job.group_size, job.train.batch_size,
                       job.max_new_tokens, job.temperature, job.train.seed, job.epochs, env.rank, env.world_size,
                       job.chat)
    settings = job.settings()
    description = (f"{job.algo.upper()}: {len(prompts):,} prompts, {job.train.batch_size} per micro-batch x "
                   f"{job.group_size} {'completions' if job.chat else 'continuations'} (<= {job.max_new_tokens} tokens, "
                   f"temperature {job.temperature:g}), "
                   f"{job.epochs} step(s) per rollout; reward {settings['reward']}; beta {job.beta:g}, clip {job.clip:g}")
    fingerprint = hashlib.sha256(json.dumps([[(m.role, m.content) for m in p] for p in prompts],
                                            ensure_ascii=False).encode()).hexdigest()[:16]
    return StageParts(model, objective, batches, None,
                      data={"path": job.prompts, "fingerprint": fingerprint}, tokenizer=tok,
                      config=RunConfig(model=model.config, train=job.train, lora=job.lora),
                      run_info={"source_checkpoint": str(src_ckpt), job.algo: settings},
                      describe=lambda trainer: description + describe_lora(model), base_checkpoint=base)
