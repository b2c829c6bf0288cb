"""LoRA fine-tuning speed: our LoRA step against Hugging Face PEFT on a stock LlamaForCausalLM.

One optimizer step is timed: forward, next-token cross-entropy summed and divided by the token
count, backward, gradient norm clipped to 1.0, AdamW step, gradients cleared. Batches are random
tokens, float32, the same number of torch threads for everyone. Three kinds are measured, and all
three start from the same weights (the same seed builds the same `Llama`):

- ours full: full fine-tuning, for scale. The real step of the training loop,
  `Trainer.train_step()`, fed from an in-memory batch source, as bench/train_vs_hf.py does.
- ours lora: the same Trainer step after `apply_transforms(model, [LoRA(rank=8, alpha=16,
  dropout=0.05)])`, which freezes the model and adapts its default eight targets: the LM head and the
  seven projections of every block (q, k, v, o, gate,
  up, down). Our projections stay fused (q/k/v in one matmul, gate/up in one), each target owning
  its rows; one dropout of the input serves every slice of a fused projection.
- peft lora: `to_hf_model` turns the same model into a stock `transformers.LlamaForCausalLM`
  (use_cache off), `peft.get_peft_model` adds the same adapters (r 8, alpha 16, dropout 0.05, the
  seven *_proj modules and lm_head); the step is `model(input_ids=x, labels=x).loss`, backward,
  `clip_grad_norm_` over the trainable parameters, optimizer step, `zero_grad(set_to_none=True)`.
  HF shifts the labels itself, so its loss covers 255 of the 256 positions against our 256: the
  forward and backward passes do the same work.

Optimizers: both sides use `torch.optim.AdamW` with `fused=True` (one kernel pass per tensor;
the foreach version where fused does not exist), lr 6e-4, betas (0.9, 0.95). Ours builds it the
way training does (babyllama/train/optim.py: weight decay 0.1 on matrices, none on vectors, over
the parameters that require grad); PEFT's gets the trainable parameters, weight decay 0.1 (all
LoRA parameters are matrices, so the same decay either way).

Allocator: our Trainer tunes glibc malloc (`tune_cpu_allocator`, freed memory stays in the
process), as every CPU run of ours does; PEFT runs with the stock allocator, which is how its
users run it. bench/train_vs_hf.py measures what that setting alone is worth for the plain model.

Each measurement runs in its own fresh interpreter (mallopt is process-wide, and ru_maxrss then
is that run's own peak RSS); this parent process never imports torch. Rounds are interleaved, the
order rotated each round; warm-up steps are not timed, and the table shows the median of all
timed steps of all rounds. Trainable parameters count the tied embedding/head once.

Before timing, a one-off check in its own small process (also `--check` alone) gives both LoRA
models the same nonzero adapter weights and asserts that they compute the same loss on the same
batch (to 1e-4, eval mode so no dropout) and have the same number of trainable parameters: the
two sides compute the same function, so the comparison is like for like.

    python -m bench.lora_vs_peft [--quick] [--check] [--configs demo original] [--rounds N] [--threads N]
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
from bench.train_vs_hf import RandomBatches  # the training loop's batch source over random tokens


class Setup(NamedTuple):
    shape: dict  # ModelConfig fields
    batch: int
    warmup: int  # untimed steps per process
    steps: int  # timed steps per process
    rounds: int  # processes per kind, interleaved


# `demo` is the model `make demo` trains; `original` the original project's shape (58.5M parameters,
# tied head, ChatGLM2's 64,794 vocabulary): seconds a step on 2 cores, hence few steps. Its first
# steps still fault in fresh memory, so two untimed steps first (bench/train_vs_hf.py takes three).
CONFIGS = {
    "demo": Setup(dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, max_seq_len=256, tie_embeddings=True),
                  batch=8, warmup=2, steps=4, rounds=3),
    "original": Setup(dict(vocab_size=64794, dim=512, n_layers=8, n_heads=8, max_seq_len=256, tie_embeddings=True),
                      batch=8, warmup=2, steps=2, rounds=2),
}
KINDS = ("ours_full", "ours_lora", "peft_lora")
LABEL = {"ours_full": "ours full", "ours_lora": "ours lora", "peft_lora": "peft lora"}
RANK, ALPHA, DROPOUT = 8, 16.0, 0.05
# our defaults: the seven projections of every block and the LM head (PEFT's lm_head)
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
LR, BETAS, WEIGHT_DECAY = 6e-4, (0.9, 0.95), 0.1  # TrainConfig's defaults, which ours trains with


def count_params(model) -> tuple[int, int]:
    """(trainable, total), each parameter once (a tied embedding and head are one tensor)."""
    from babyllama.adapters.lora import count_parameters

    return count_parameters(model)


def our_model(mcfg, lora: bool):
    from babyllama.adapters import LoRA
    from babyllama.model import Llama
    from babyllama.transforms import apply_transforms

    model = Llama(mcfg)
    if lora:
        apply_transforms(model, [LoRA(rank=RANK, alpha=ALPHA, dropout=DROPOUT)])
    return model


def peft_model(mcfg):
    """Our model (same seed, same weights) as a stock HF Llama with PEFT's LoRA on the same eight targets."""
    import gc

    import peft

    from babyllama.export.hf import to_hf_model
    from babyllama.model import Llama

    plain = Llama(mcfg)
    hf = to_hf_model(plain)  # the weights are copied: the plain model can go
    del plain
    gc.collect()
    hf.config.use_cache = False  # no KV cache built while training (in PEFT's favour)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=PEFT_TARGETS,
                          task_type="CAUSAL_LM")
    return peft.get_peft_model(hf, cfg).train()


def adamw(params):
    """AdamW as build_optimizer (babyllama/train/optim.py) makes ours: fused where it exists."""
    import inspect

    import torch

    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=1e-8, weight_decay=WEIGHT_DECAY,
                             **({"fused": True} if fused else {"foreach": True}))


def our_step(mcfg, batch: int, out_dir: str, lora: bool):
    from babyllama.config import TrainConfig
    from babyllama.train.loop import Trainer

    model = our_model(mcfg, lora)
    tcfg = TrainConfig(batch_size=batch, device="cpu", dtype="float32", grad_clip=1.0, lr=LR,
                       beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY)
    trainer = Trainer(model, mcfg, tcfg, RandomBatches(mcfg.vocab_size, batch, mcfg.max_seq_len), out_dir,
                      progress=False,  # calls tune_cpu_allocator()
                      base_checkpoint="bench-base" if lora else None)  # never saved: any name will do

    def step() -> float:
        return trainer.train_step()[0]

    return step, count_params(model)


def peft_step(mcfg, batch: int):
    import torch

    model = peft_model(mcfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(trainable)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randint(mcfg.vocab_size, (batch, mcfg.max_seq_len), generator=gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, count_params(model)


def worker(kind: str, config: str, threads: int, warmup: int, steps: int) -> dict:
    import torch

    from babyllama.config import ModelConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    setup = CONFIGS[config]
    mcfg = ModelConfig(**setup.shape)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "peft_lora":
            step, (trainable, total) = peft_step(mcfg, setup.batch)
        else:
            step, (trainable, total) = our_step(mcfg, setup.batch, tmp, lora=kind == "ours_lora")
        losses = [step() for _ in range(warmup)]
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t)
    return {"kind": kind, "trainable": trainable, "total": total, "step_s": times, "losses": losses,
            "tokens_per_step": setup.batch * mcfg.max_seq_len, "rss_mb": peak_rss_mb()}


def check(threads: int) -> dict:
    """Ours and PEFT's LoRA models, same base weights and same (nonzero) adapters: same loss, same counts."""
    import torch

    from babyllama.adapters.peft import to_peft_name
    from babyllama.config import ModelConfig

    torch.set_num_threads(threads)
    mcfg = ModelConfig(**CONFIGS["demo"].shape)
    torch.manual_seed(0)
    ours = our_model(mcfg, lora=True)
    torch.manual_seed(0)  # the same seed: the same base weights
    theirs = peft_model(mcfg)
    by_name = dict(theirs.named_parameters())
    copied = set()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_B." in name:  # B starts at zero: give it values, or the adapters would do nothing
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            # a loaded adapter's tensors carry the adapter name ("default") that saved files omit
            peft_name = to_peft_name(name).replace(".lora_A.weight", ".lora_A.default.weight") \
                                          .replace(".lora_B.weight", ".lora_B.default.weight")
            by_name[peft_name].copy_(p)
            copied.add(peft_name)
    left = {n for n, p in theirs.named_parameters() if p.requires_grad} - copied
    assert not left, f"PEFT parameters with no counterpart in ours: {sorted(left)[:3]}"
    ours.eval(), theirs.eval()
    t = torch.randint(mcfg.vocab_size, (2, 65), generator=gen)
    with torch.no_grad():
        loss_ours = float(ours(t[:, :-1], t[:, 1:])) / t[:, 1:].numel()  # our model returns the summed loss
        loss_peft = float(theirs(input_ids=t, labels=t).loss)  # HF shifts the labels itself
    counts_ours, counts_peft = count_params(ours), count_params(theirs)
    assert abs(loss_ours - loss_peft) < 1e-4, f"losses differ: ours {loss_ours:.6f} PEFT {loss_peft:.6f}"
    assert counts_ours == counts_peft, f"parameter counts differ: ours {counts_ours} PEFT {counts_peft}"
    return {"loss_ours": loss_ours, "loss_peft": loss_peft, "trainable": counts_ours[0], "total": counts_ours[1]}


def run_check(threads: int, log=print) -> dict:
    res = run_worker("bench.lora_vs_peft", "check", "demo", str(threads), "0", "0")
    log(f"  check: same loss on the same batch, ours {res['loss_ours']:.6f} PEFT {res['loss_peft']:.6f}; "
        f"{res['trainable']:,} of {res['total']:,} parameters trainable in both")
    return res


def bench_config(config: str, threads: int, rounds: int | None = None, steps: int | None = None,
                 log=print) -> dict:
    setup = CONFIGS[config]
    warmup, steps, rounds = setup.warmup, steps or setup.steps, rounds or setup.rounds
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(rounds):
        for kind in KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]:  # rotate who goes first
            res = run_worker("bench.lora_vs_peft", kind, config, str(threads), str(warmup), str(steps))
            runs[kind].append(res)
            log(f"  {config} round {r + 1}/{rounds} {kind:<9} {res['tokens_per_step'] / median(res['step_s']):8.0f} tok/s"
                f"  rss {res['rss_mb']:.0f} MB  loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}")
    out = {"config": config}
    for kind, results in runs.items():
        step_s = median([t for r in results for t in r["step_s"]])
        out[kind] = {"step_ms": step_s * 1e3, "tok_s": results[0]["tokens_per_step"] / step_s,
                     "rss_mb": max(r["rss_mb"] for r in results),
                     "trainable": results[0]["trainable"], "total": results[0]["total"]}
    return out


def table(results: list[dict], threads: int) -> str:
    rows = []
    for r in results:
        peft_tok_s = r["peft_lora"]["tok_s"]
        for kind in KINDS:
            k = r[kind]
            rows.append([r["config"], LABEL[kind], f"{k['step_ms']:,.0f}", f"{k['tok_s']:,.0f}",
                         f"{k['tok_s'] / peft_tok_s:.2f}x", f"{k['rss_mb']:,.0f}",
                         f"{k['trainable']:,} ({k['trainable'] / k['total']:.2%})"])
    headers = ["config", "kind", "step ms", "tok/s", "vs peft lora", "peak RSS MB", "trainable params (share)"]
    from babyllama.machine import cpu_model  # no torch

    return (f"### LoRA fine-tuning step: ours vs PEFT {_version('peft')} (transformers {_version('transformers')}), "
            f"float32, {threads} threads, {cpu_model()} ({platform.machine()}, {os.cpu_count()} CPUs); "
            f"LoRA r {RANK}, alpha {ALPHA:g}, dropout {DROPOUT} on q,k,v,o,gate,up,down,head; median of all timed steps "
            f"(each kind in its own process, rounds interleaved; goal: ours lora >= 1.3x peft lora)\n\n"
            + markdown_table(headers, rows))


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
    p.add_argument("--check", action="store_true", help="only check that both LoRA models compute the same loss")
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
