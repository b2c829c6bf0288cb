"""DPO training speed: our DPO step against TRL's `DPOTrainer` on the same model, batch and lengths.

One optimizer step of DPO (sigmoid loss, beta 0.1) is timed on each side, float32, the same number
of torch threads for everyone. Every pair is a prompt of P random tokens and two replies (chosen,
rejected) of R tokens each, the last one EOS; a step takes `pairs` pairs (no accumulation), so
2 x pairs sequences of P + R tokens go through the policy (ours feeds P + R - 1 positions, the last
token being only a target; TRL feeds all P + R and shifts: the same R reply tokens a sequence are
scored either way). All kinds start from the same weights (the same seed builds the same `Llama`)
and see the same token ids.

- ours: the real step of the training loop, `Trainer.train_step()` with the objective
  `PreferencePairs(beta=0.1)` (babyllama/align/dpo.py), fed from an in-memory batch source of
  `(tokens, targets, ref)` batches made by `collate_pairs` (data/preference.py) from `PairSample`s
  (labels -100 on the prompt). As `babyllama dpo` does, the reference log-probs are computed once
  before training (`reference_logps`, the model before any step) and travel in the batches: the
  step is one policy forward over the 2 x pairs sequences, the DPO loss, backward, clip to 1.0,
  AdamW step, zero_grad. Batches are collated before timing (TRL collates outside its timed window
  too, see below). The Trainer tunes glibc malloc (`tune_cpu_allocator`), as every CPU run of ours
  does.
- TRL (ref each step): a real `trl.DPOTrainer` on `to_hf_model(model)` (a stock
  `transformers.LlamaForCausalLM`, same weights), its default mode: `ref_model` a second copy of
  the same weights, run under no_grad on the batch at every step. The dataset is text over a
  word-level tokenizer ("w0".."w{V-4}" plus <pad>, </s>, <unk>: V = the model's vocabulary) whose
  tokenization is exactly our ids: the prompt P words, each reply R-1 words to which TRL appends
  EOS. Checked in every run: TRL's tokenized prompt and replies are exactly our ids.
- TRL (precomputed ref): the same with `precompute_ref_log_probs=True` and no `ref_model`: TRL
  computes the reference log-probs over the dataset in its constructor, like ours, and its step
  has no reference forward.

TRL's step is timed inside `trainer.train()` (max_steps = warm-up + timed steps) by a
`TrainerCallback`: wall time from `on_step_begin` to `on_step_end`, which covers `training_step`
(forward(s), loss, backward), gradient clipping, optimizer and scheduler step and `zero_grad`;
fetching and collating the batch comes before `on_step_begin`, logging after `on_step_end`, and
the dataset tokenization and reference precompute happen before `train()`: none of it is timed.
TRL runs with the stock allocator, as its users run it; gradient checkpointing (TRL's default) off,
as ours has none; dropout off on both sides; `use_cpu=True`, bf16/fp16 off, `report_to="none"`,
`save_strategy="no"`.

Optimizers: AdamW, fused, lr 5e-6 (our DPO default for full fine-tuning), betas (0.9, 0.95), eps
1e-8, no weight decay (DPO's default on our side, TRL's default too), grad-norm clipping to 1.0.
Learning-rate schedules differ (ours warm-up + cosine, TRL linear decay) and cost nothing.

Both sides run the LM head only where a reply token is scored: ours by its loss (model/loss.py),
TRL by the fused LM head it patches into the policy and reference (`add_fused_lm_head`: tiles over
the labelled positions, no full logits; for the policy it also computes the entropy, mean logit and
top-1 hit that feed its logged metrics, TRL's defaults, so part of its step). Both score exactly
the same reply tokens (`--check`).

Each measurement runs in its own fresh interpreter (mallopt is process-wide, and ru_maxrss then is
that run's own peak RSS: for TRL it includes the reference copy, the tokenized dataset and the
precompute); this parent process never imports torch. Rounds are interleaved, the order rotated
each round; warm-up steps are not timed, and the table shows the median of all timed steps of all
rounds. pairs/s = pairs per step / median step time.

Before timing, a one-off check in its own small process (also `--check` alone) builds a small
batch of random pairs both ways, asserts that TRL's tokenization and collation of the text give
exactly our (tokens, targets) from `collate_pairs`, and that with a policy perturbed away from the
reference our `PreferencePairs` loss and reference log-probs equal TRL's own (`_compute_loss`,
`compute_ref_log_probs`) to 1e-4: the two sides compute the same thing.

    python -m bench.dpo_vs_trl [--quick] [--check] [--configs demo original] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import NamedTuple

from bench.common import emit, markdown_table, median, peak_rss_mb, run_worker


class Setup(NamedTuple):
    shape: dict  # ModelConfig fields
    pairs: int  # preference pairs per optimizer step (2 x pairs sequences)
    prompt: int  # P: prompt tokens
    reply: int  # R: tokens of each reply, EOS included
    warmup: int  # untimed steps per process
    steps: int  # timed steps per process
    rounds: int  # processes per kind, interleaved


# `demo` is the shape `make demo` trains (at a 512-token window); `original` the original project's
# width and depth at an 8k vocabulary: seconds a step on 2 cores, hence few steps. The first steps
# fault in fresh memory (and TRL's build its optimizer state), so two untimed steps first.
CONFIGS = {
    "demo": Setup(dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, max_seq_len=512, tie_embeddings=True),
                  pairs=4, prompt=128, reply=128, warmup=2, steps=6, rounds=3),
    "original": Setup(dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, max_seq_len=512, tie_embeddings=True),
                      pairs=4, prompt=128, reply=128, warmup=2, steps=3, rounds=2),
}
KINDS = ("ours", "trl_ref", "trl_precomputed")
LABEL = {"ours": "ours", "trl_ref": "TRL (ref each step)", "trl_precomputed": "TRL (precomputed ref)"}
BETA = 0.1
LR, BETAS, EPS, GRAD_CLIP = 5e-6, (0.9, 0.95), 1e-8, 1.0
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2; word "w{i}" is id i + 3
PAD_ID, EOS_ID = 0, 1


# --- the data: the same random pairs as our samples and as TRL's text ----------------------------------

def random_pairs(vocab: int, n: int, prompt: int, reply: int, seed: int = 0) -> list[tuple[list, list, list]]:
    """n (prompt ids, chosen ids, rejected ids): random word ids, each reply ending in EOS."""
    import random

    rng = random.Random(seed)
    word = lambda: rng.randrange(len(SPECIALS), vocab)  # noqa: E731
    out = []
    for _ in range(n):
        p = [word() for _ in range(prompt)]
        c = [word() for _ in range(reply - 1)] + [EOS_ID]
        r = [word() for _ in range(reply - 1)] + [EOS_ID]
        out.append((p, c, r))
    return out


def our_samples(pairs) -> list:
    from babyllama.config import IGNORE_INDEX
    from babyllama.data.preference import PairSample

    return [PairSample(*[(p + reply, [IGNORE_INDEX] * len(p) + reply) for reply in (c, r)]) for p, c, r in pairs]


def _words(ids: list[int]) -> str:
    return " ".join(f"w{i - len(SPECIALS)}" for i in ids)


def trl_dataset(pairs):
    """TRL's text: the prompt, and each reply without its EOS (TRL appends it), with a leading space
    (TRL joins prompt and reply as text)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [_words(p) for p, _, _ in pairs],
                              "chosen": [" " + _words(c[:-1]) for _, c, _ in pairs],
                              "rejected": [" " + _words(r[:-1]) for _, _, r in pairs]})


def tokenizer(vocab: int):
    """Word level: "w0".."w{vocab-4}" after the three specials, so len(tokenizer) == vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *(f"w{i}" for i in range(vocab - len(SPECIALS)))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    assert len(tok) == vocab and tok.pad_token_id == PAD_ID and tok.eos_token_id == EOS_ID
    return tok


class FixedBatches:
    """The training loop's BatchSource over batches collated beforehand, in turn."""

    def __init__(self, batches: list):
        self.batches, self.i = batches, 0

    def next_batch(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --- the two sides ------------------------------------------------------------------------------------

def our_step(mcfg, setup: Setup, n_steps: int, out_dir: str):
    from babyllama.align.dpo import PreferencePairs, reference_logps
    from babyllama.config import TrainConfig
    from babyllama.data.preference import collate_pairs
    from babyllama.model import Llama
    from babyllama.train.loop import Trainer

    model = Llama(mcfg)
    samples = our_samples(random_pairs(mcfg.vocab_size, setup.pairs * n_steps, setup.prompt, setup.reply))
    reference_logps(model, samples, PAD_ID, batch_size=setup.pairs)  # once, before training, as `babyllama dpo`
    model.train()
    batches = [collate_pairs(samples[i:i + setup.pairs], PAD_ID) for i in range(0, len(samples), setup.pairs)]
    tokens, targets, ref = batches[0]
    width = setup.prompt + setup.reply - 1
    assert tokens.shape == targets.shape == (setup.pairs, 2, width) and ref.shape == (setup.pairs, 2), tokens.shape
    assert int((targets != -100).sum()) == setup.pairs * 2 * setup.reply  # every reply token, EOS included
    tcfg = TrainConfig(batch_size=setup.pairs, max_steps=n_steps, lr=LR, min_lr=LR / 10, warmup_steps=0,
                       weight_decay=0.0, beta1=BETAS[0], beta2=BETAS[1], grad_clip=GRAD_CLIP, device="cpu",
                       dtype="float32")
    trainer = Trainer(model, mcfg, tcfg, FixedBatches(batches), out_dir, progress=False,  # tune_cpu_allocator()
                      objective=PreferencePairs(beta=BETA))

    def step() -> float:
        return trainer.train_step()[0]

    return step


def dpo_args(out_dir: str, pairs: int, max_steps: int, precompute: bool, **extra):
    import dataclasses

    from trl import DPOConfig

    # transformers 5 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return DPOConfig(output_dir=out_dir, beta=BETA, loss_type=["sigmoid"], per_device_train_batch_size=pairs,
                     gradient_accumulation_steps=1, max_steps=max_steps, learning_rate=LR, adam_beta1=BETAS[0],
                     adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0, max_grad_norm=GRAD_CLIP,
                     optim="adamw_torch_fused", report_to="none", use_cpu=True, bf16=False, fp16=False,
                     precompute_ref_log_probs=precompute, max_length=None, disable_dropout=True, seed=0,
                     save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, **{checkpointing: False},
                     **extra)


def trl_trainer(policy, reference, pairs, setup_pairs: int, max_steps: int, precompute: bool, out_dir: str,
                callbacks=None, **extra):
    """A DPOTrainer over the text of `pairs`, checked to tokenize to exactly our lengths and ids."""
    from trl import DPOTrainer

    from babyllama.export.hf import to_hf_model

    vocab = policy.config.vocab_size
    trainer = DPOTrainer(model=to_hf_model(policy, use_cache=False),
                         ref_model=None if reference is None else to_hf_model(reference, use_cache=False),
                         args=dpo_args(out_dir, setup_pairs, max_steps, precompute, **extra),
                         train_dataset=trl_dataset(pairs), processing_class=tokenizer(vocab), callbacks=callbacks)
    data = trainer.train_dataset
    for i, (p, c, r) in enumerate(pairs):  # the same ids, hence the same lengths, as ours
        e = data[i]
        assert (e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) == (p, c, r), f"TRL tokenized pair {i} differently"
    return trainer


def trl_times(mcfg, setup: Setup, warmup: int, steps: int, precompute: bool, out_dir: str):
    import gc

    import torch
    from transformers import TrainerCallback

    from babyllama.model import Llama

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.threads, self.t0 = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.threads.append(torch.get_num_threads())

    model = Llama(mcfg)  # the same seed: the same weights as ours
    pairs = random_pairs(mcfg.vocab_size, setup.pairs * (warmup + steps), setup.prompt, setup.reply)
    timer = StepTimer()
    trainer = trl_trainer(model, None if precompute else model, pairs, setup.pairs, warmup + steps, precompute,
                          out_dir, callbacks=[timer], logging_strategy="steps", logging_steps=1)
    del model  # the weights were copied
    gc.collect()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(timer.times) == warmup + steps, f"{len(timer.times)} steps timed, expected {warmup + steps}"
    assert set(timer.threads) == {torch.get_num_threads()}, f"torch threads changed: {timer.threads}"
    return timer.times[warmup:], losses


def worker(kind: str, config: str, threads: int, warmup: int, steps: int) -> dict:
    import torch

    from babyllama.config import ModelConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    setup = CONFIGS[config]
    mcfg = ModelConfig(**setup.shape)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "ours":
            step = our_step(mcfg, setup, warmup + steps, tmp)
            losses = [step() for _ in range(warmup)]
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                losses.append(step())
                times.append(time.perf_counter() - t)
        else:
            times, losses = trl_times(mcfg, setup, warmup, steps, kind == "trl_precomputed", tmp)
    return {"kind": kind, "step_s": times, "losses": losses, "pairs_per_step": setup.pairs,
            "threads": torch.get_num_threads(), "rss_mb": peak_rss_mb()}


# --- the check: same batch, same loss ------------------------------------------------------------------

def trl_batch_as_ours(batch: dict, pad_id: int):
    """TRL's collated batch (chosen rows, then rejected rows; right-padded) as our (tokens, targets)
    (also used by tests/align/test_dpo_vs_trl.py)."""
    import torch

    from babyllama.config import IGNORE_INDEX

    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    n = ids.shape[0] // 2
    width = int(attn.sum(-1).max()) - 1
    tokens = torch.full((n, 2, width), pad_id, dtype=torch.long)
    targets = torch.full((n, 2, width), IGNORE_INDEX, dtype=torch.long)
    for i in range(n):
        for side in range(2):
            row = side * n + i
            length = int(attn[row].sum())
            assert attn[row, :length].all() and not attn[row, length:].any(), "TRL padded on the left"
            seq, reply = ids[row, :length], comp[row, :length].bool()
            tokens[i, side, :length - 1] = seq[:-1]
            targets[i, side, :length - 1] = seq[1:].masked_fill(~reply[1:], IGNORE_INDEX)
    return tokens, targets


def check(threads: int) -> dict:
    """A small batch both ways: TRL's collation is our collate_pairs, TRL's loss and reference log-probs ours."""
    import copy

    import torch

    from babyllama.align.dpo import PreferencePairs, reference_logps
    from babyllama.config import ModelConfig
    from babyllama.data.preference import collate_pairs
    from babyllama.model import Llama

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mcfg = ModelConfig(**CONFIGS["demo"].shape)
    n, prompt, reply = 3, 12, 9
    reference = Llama(mcfg).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            if p.dim() >= 2:
                p.add_(0.05 * torch.randn_like(p))  # log-ratios well away from 0: a beta or length slip shows
    pairs = random_pairs(mcfg.vocab_size, n, prompt, reply, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(policy, reference, pairs, n, 1, False, tmp, logging_strategy="no")
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        trainer.model.train()
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False).item()
        trl_ref = torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, batch), dim=1).float()

    samples = our_samples(pairs)
    reference_logps(reference, samples, PAD_ID, batch_size=n)
    tokens, targets, ref = collate_pairs(samples, PAD_ID)
    trl_tokens, trl_targets = trl_batch_as_ours(batch, PAD_ID)
    assert torch.equal(tokens, trl_tokens) and torch.equal(targets, trl_targets), "TRL's batch is not ours"
    policy.train()
    with torch.no_grad():
        ours = PreferencePairs(beta=BETA).loss(policy, (tokens, targets, ref))[0].item() / n
    assert abs(ours - 0.6931) > 1e-3, "the policy equals the reference: the check would prove nothing"
    torch.testing.assert_close(ref, trl_ref, atol=1e-4, rtol=0)
    assert abs(ours - trl_loss) < 1e-4, f"losses differ: ours {ours:.6f} TRL {trl_loss:.6f}"
    return {"loss_ours": ours, "loss_trl": trl_loss, "pairs": n, "width": tokens.shape[-1]}


def run_check(threads: int, log=print) -> dict:
    res = run_worker("bench.dpo_vs_trl", "check", "demo", str(threads), "0", "0")
    log(f"  check: TRL collates the same (tokens, targets) for {res['pairs']} pairs of width {res['width']}; same DPO "
        f"loss, ours {res['loss_ours']:.6f} TRL {res['loss_trl']:.6f}, and the same reference log-probs")
    return res


# --- the parent: no torch here -------------------------------------------------------------------------

def bench_config(config: str, threads: int, rounds: int | None = None, steps: int | None = None,
                 log=print) -> dict:
    setup = CONFIGS[config]
    warmup, steps, rounds = setup.warmup, steps or setup.steps, rounds or setup.rounds
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    started = time.perf_counter()
    for r in range(rounds):
        for kind in KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]:  # rotate who goes first
            t = time.perf_counter()
            res = run_worker("bench.dpo_vs_trl", kind, config, str(threads), str(warmup), str(steps))
            assert res["threads"] == threads, f"{kind} ran on {res['threads']} threads, not {threads}"
            runs[kind].append(res)
            pairs_s = res["pairs_per_step"] / median(res["step_s"])
            log(f"  {config} round {r + 1}/{rounds} {kind:<15} {pairs_s:7.2f} pairs/s"
                f"  rss {res['rss_mb']:.0f} MB  loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}"
                f"  ({time.perf_counter() - t:.0f} s in all)")
    log(f"  {config}: {time.perf_counter() - started:.0f} s")
    out = {"config": config}
    for kind, results in runs.items():
        step_s = median([t for r in results for t in r["step_s"]])
        out[kind] = {"step_ms": step_s * 1e3, "pairs_s": results[0]["pairs_per_step"] / step_s,
                     "rss_mb": max(r["rss_mb"] for r in results)}
    return out


def table(results: list[dict], threads: int) -> str:
    rows = []
    for r in results:
        ref_each, precomputed = r["trl_ref"]["pairs_s"], r["trl_precomputed"]["pairs_s"]
        for kind in KINDS:
            k = r[kind]
            rows.append([r["config"], LABEL[kind], f"{k['step_ms']:,.0f}", f"{k['pairs_s']:.2f}",
                         f"{k['pairs_s'] / ref_each:.2f}x", f"{k['pairs_s'] / precomputed:.2f}x", f"{k['rss_mb']:,.0f}"])
    headers = ["config", "kind", "step ms", "pairs/s", "vs TRL (ref each step)", "vs TRL (precomputed ref)",
               "peak RSS MB"]
    from babyllama.machine import cpu_model  # no torch

    s = CONFIGS[results[0]["config"]] if results else CONFIGS["demo"]
    return (f"### DPO training step: ours vs TRL {_version('trl')} DPOTrainer (transformers {_version('transformers')}, "
            f"torch {_version('torch')}), float32, {threads} threads, {cpu_model()} ({platform.machine()}, "
            f"{os.cpu_count()} CPUs); {s.pairs} pairs a step, prompt {s.prompt} + replies {s.reply} tokens, sigmoid "
            f"loss beta {BETA:g}; median of all timed steps (each kind in its own process, rounds interleaved; "
            f"goal: ours >= 1.5x TRL)\n\n" + markdown_table(headers, rows))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def main(quick: bool = False, configs: list[str] | None = None, rounds: int | None = None,
         threads: int = 2, log=print) -> str:
    configs = configs or (["demo"] if quick else list(CONFIGS))
    steps = 3 if quick else None
    rounds = rounds or (2 if quick else None)
    run_check(threads, log)
    return table([bench_config(c, threads, rounds, steps, log) for c in configs], threads)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=5, metavar=("KIND", "CONFIG", "THREADS", "WARMUP", "STEPS"))
    p.add_argument("--quick", action="store_true", help="demo config only, 2 rounds, 3 timed steps")
    p.add_argument("--check", action="store_true", help="only check that both sides collate and compute the same loss")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, help="interleaved rounds per kind (default: 3 demo, 2 original)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress, kept out of the table
    if args.worker:
        kind, config, threads, warmup, steps = args.worker
        emit(check(int(threads)) if kind == "check" else worker(kind, config, int(threads), int(warmup), int(steps)))
    elif args.check:
        run_check(args.threads, log)
    else:
        print(main(args.quick, args.configs, args.rounds, args.threads, log=log))


if __name__ == "__main__":
    cli()
