"""Preference alignment: `babyllama dpo` (on the one training loop, like sft)."""

from __future__ import annotations

import argparse

from babyllama.cli.flags import Default, add_config_flags, add_encoding_flag, add_lora_flags, add_on_error_flag, \
    add_run_flags

DPO_HELP = """Direct preference optimisation (or IPO) of an SFT model on (prompt, chosen, rejected) pairs.
The model as loaded is the reference: its log-probs of every reply are computed once, before
training. Logged: loss (ln 2 = 0.693 at the start, where the policy is the reference), the implicit
rewards of chosen and rejected replies (beta x log-ratio), their margin and the preference accuracy,
on the held-out pairs as val_*.

Layouts (--layout, or per file as FILE::LAYOUT; JSON lines or a JSON array):
  sharegpt  {"conversations": [{"from": "human", "value": ...}], "chosen": ..., "rejected": ...}
  alpaca    {"instruction", "input", "output": [chosen, rejected]}
  qa        {"question", "response_chosen", "response_rejected"}
  prompt    {"prompt", "chosen", "rejected"}, each a string or a list of {"role", "content"} messages
A malformed record stops the run with its file and line (--on-error skip counts it and goes on)."""


def _dpo_job() -> type:
    from babyllama.align.dpo import DPOJob

    return DPOJob


def cmd_dpo(args) -> None:
    from babyllama.align.dpo import DPOJob, default_dpo_train, dpo
    from babyllama.cli.train import report_run, sft_run_config

    cfg = sft_run_config(args, defaults=default_dpo_train)
    summary = dpo(DPOJob(ckpt=args.ckpt, data=args.data, out=args.out, beta=args.beta, loss=args.loss,
                         train=cfg.train, lora=cfg.lora, layout=args.layout, chat=args.chat,
                         val_fraction=args.val_fraction,
                         on_error=args.on_error, encoding=args.encoding, resume=args.resume,
                         overwrite=args.overwrite, stop_at_step=args.stop_at_step,
                         allow_unverified=args.allow_unverified))
    report_run(summary)


def add_parsers(sub) -> None:
    p = sub.add_parser("dpo", help="align an SFT model on preference pairs (DPO / IPO)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DPO_HELP)
    p.add_argument("--ckpt", required=True, help="the SFT run (or checkpoint): the policy and its reference")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="preference files (FILE or FILE::LAYOUT)")
    p.add_argument("--out", required=True, help="run directory for the aligned model")
    p.add_argument("--beta", type=float,
                   help="strength of the pull towards the reference (default 0.1; resuming: the run's)")
    p.add_argument("--loss", choices=["sigmoid", "ipo"],
                   help="sigmoid: DPO; ipo: IPO's squared loss on per-token log-ratios (default sigmoid; "
                        "resuming: the run's)")
    p.add_argument("--layout", default=Default(_dpo_job, "layout"),
                   help="record layout, unless given per file as FILE::LAYOUT (default %(default)s; see above)")
    p.add_argument("--val-fraction", type=float,
                   help="share of pairs held out (default 0.05; resuming: the run's)")
    p.add_argument("--no-chat", dest="chat", action="store_false",
                   help="plain-text pairs for a pretrained model: the prompt's text continued by each reply, "
                        "closed by end-of-text, no chat template")
    add_on_error_flag(p, _dpo_job)
    add_encoding_flag(p, _dpo_job)
    add_run_flags(p)
    add_config_flags(p, model=False)
    add_lora_flags(p, "preference alignment; without --lr, lr 5e-4 (full: 5e-6)")
    p.set_defaults(func=cmd_dpo)
    add_reward_parsers(sub)
    add_rl_parser(sub)


def _reward_job() -> type:
    from babyllama.align.reward import RewardJob

    return RewardJob


def cmd_reward_train(args) -> None:
    from babyllama.align.reward import RewardJob, default_reward_train, train_reward
    from babyllama.cli.train import report_run, sft_run_config

    cfg = sft_run_config(args, defaults=lambda lora: default_reward_train())
    summary = train_reward(RewardJob(ckpt=args.ckpt, data=args.data, out=args.out, train=cfg.train,
                                     layout=args.layout, val_fraction=args.val_fraction, on_error=args.on_error,
                                     encoding=args.encoding, resume=args.resume, overwrite=args.overwrite,
                                     stop_at_step=args.stop_at_step, allow_unverified=args.allow_unverified))
    report_run(summary)


def add_reward_parsers(sub) -> None:
    group = sub.add_parser("reward", help="reward models: train one on preference pairs").add_subparsers(
        dest="action", metavar="ACTION")
    p = group.add_parser("train", help="a Bradley-Terry reward model: the model with a scalar head",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Trains the model (an SFT run, usually) with its LM head replaced by a scalar "
                                     "head, so that\nr(prompt + chosen) > r(prompt + rejected): loss "
                                     "-log sigmoid(r_chosen - r_rejected), the reward read\nat the reply's "
                                     "<|im_end|>. Logs the pairwise accuracy (reward_accuracy) on held-out pairs "
                                     "as\nval_reward_accuracy. Data: the layouts of `babyllama dpo --help`.")
    p.add_argument("--ckpt", required=True, help="the model to start from (an SFT run or checkpoint)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="preference files (FILE or FILE::LAYOUT)")
    p.add_argument("--out", required=True, help="run directory for the reward model")
    p.add_argument("--layout", default=Default(_reward_job, "layout"),
                   help="record layout, unless given per file as FILE::LAYOUT (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=Default(_reward_job, "val_fraction"),
                   help="share of pairs held out (default %(default)s)")
    add_on_error_flag(p, _reward_job)
    add_encoding_flag(p, _reward_job)
    add_run_flags(p)
    add_config_flags(p, model=False)
    p.set_defaults(func=cmd_reward_train)


def _rl_job() -> type:
    from babyllama.align.rl import RLJob

    return RLJob


RL_HELP = """Reinforcement learning from a reward, on rollouts of the current policy: --group-size
completions of each prompt, sampled with the inference engine's batched KV-cache decoding, each
rewarded. --batch-size counts prompts per micro-batch; --epochs optimisation steps per rollout.

  grpo  the rewards normalised within each prompt's group are the advantages; a clipped
        policy-gradient step with a KL penalty (--beta, default 0.04) to the model as loaded.
  ppo   a value head on the policy's own trunk; per-token rewards are the KL penalty to the model
        as loaded (--beta, default 0.05) plus the reward at the last token; GAE (--gamma, --lam)
        gives the advantages; clipped policy loss + --vf-coef x clipped value loss (--value-clip).

A reward is a Python function (prompt, completion) -> float (--reward-fn MODULE:FUNC or
path/file.py:FUNC; ready ones: babyllama.align.rewards:no_repetition, :ends_in_punctuation,
:tidy_answer) or a reward model (--reward RUN, from `babyllama reward train`).
Prompts: a .txt file (one a line) or JSON lines / array of {"prompt"}, {"question"},
{"instruction", "input"} or {"messages"} records. Logged: reward, kl, clip_fraction, entropy (the
mean -log p of the sampled tokens), completion_len, and PPO's value_loss."""


def cmd_rl(args) -> None:
    from babyllama.align.rl import RLJob, default_rl_train, rl
    from babyllama.cli.train import report_run, sft_run_config

    cfg = sft_run_config(args, defaults=default_rl_train)
    summary = rl(RLJob(ckpt=args.ckpt, prompts=args.prompts, out=args.out, algo=args.algo, reward_fn=args.reward_fn,
                       reward_model=args.reward, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, chat=args.chat, beta=args.beta, clip=args.clip, epochs=args.epochs,
                       gamma=args.gamma, lam=args.lam, vf_coef=args.vf_coef, value_clip=args.value_clip,
                       train=cfg.train, lora=cfg.lora, resume=args.resume, overwrite=args.overwrite,
                       stop_at_step=args.stop_at_step, allow_unverified=args.allow_unverified))
    report_run(summary)


def add_rl_parser(sub) -> None:
    p = sub.add_parser("rl", help="reinforcement learning from a reward (GRPO, PPO)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=RL_HELP)
    p.add_argument("--algo", choices=["grpo", "ppo"], default=Default(_rl_job, "algo"),
                   help="the algorithm (default %(default)s)")
    p.add_argument("--ckpt", required=True, help="the SFT run (or checkpoint): the policy and its reference")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompts to answer (see above)")
    p.add_argument("--out", required=True, help="run directory for the trained policy")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--reward-fn", metavar="MODULE:FUNC", help="a Python reward function (prompt, completion) -> float")
    g.add_argument("--reward", metavar="RUN", help="a reward model run (`babyllama reward train`)")
    p.add_argument("--group-size", type=int, default=Default(_rl_job, "group_size"),
                   help="completions sampled per prompt (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=Default(_rl_job, "max_new_tokens"),
                   help="tokens per completion at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=Default(_rl_job, "temperature"),
                   help="sampling temperature of the rollouts (default %(default)s)")
    p.add_argument("--beta", type=float,
                   help="weight of the KL penalty to the reference (default 0.04 for grpo, 0.05 for ppo)")
    p.add_argument("--clip", type=float, default=Default(_rl_job, "clip"),
                   help="ratio clipping epsilon (default %(default)s)")
    p.add_argument("--no-chat", dest="chat", action="store_false",
                   help="prompts are plain text that the model continues (a pretrained model), not chat turns; "
                        "a continuation ends at end-of-text")
    p.add_argument("--epochs", type=int, default=Default(_rl_job, "epochs"),
                   help="optimisation steps per rollout (default %(default)s)")
    ppo = p.add_argument_group("PPO")
    ppo.add_argument("--gamma", type=float, default=Default(_rl_job, "gamma"),
                     help="discount over a completion's tokens (default %(default)s)")
    ppo.add_argument("--lam", type=float, default=Default(_rl_job, "lam"),
                     help="GAE's lambda (default %(default)s)")
    ppo.add_argument("--vf-coef", type=float, default=Default(_rl_job, "vf_coef"),
                     help="weight of the value loss (default %(default)s)")
    ppo.add_argument("--value-clip", type=float, default=Default(_rl_job, "value_clip"),
                     help="how far a value may move from the rollout's before its loss is clipped "
                          "(default %(default)s)")
    add_run_flags(p)
    add_config_flags(p, model=False)
    add_lora_flags(p, "GRPO; without --lr, lr 5e-4 (full: 1e-5)")
    p.set_defaults(func=cmd_rl)
