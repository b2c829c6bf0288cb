"""Generation quality: answer held-out prompts and score the answers against the references.

The data is SFT conversations in any layout the `sft` stage reads. In each conversation the prompt
is everything up to the last assistant turn (system prompt and earlier turns included) and the
reference is that last assistant turn. Decoding is greedy without a repetition penalty by default,
so that a model that loops is seen looping, not hidden by the sampler.

What is measured, every number a fraction in [0, 1]:

- BLEU: sacrebleu's corpus BLEU with tokenize="zh" (every Chinese character one token, other text
  split as 13a does), divided by 100. Effective order: a corpus of answers all shorter than four
  tokens is scored on the n-gram orders it has, instead of a flat 0.
- ROUGE-L: F1 of the longest common subsequence of characters, per answer, averaged. rouge-score's
  default tokenizer keeps only [a-z0-9] runs, so Chinese text has no tokens and scores 0: it is
  given a character tokenizer here.
- exact match: the share of answers equal to their reference (surrounding whitespace ignored).
- distinct-n: distinct character n-grams over all n-grams of all answers (Li et al., 2016): low
  when the model says the same thing whatever it is asked.
- repeated n-gram rate: the share of each answer's character n-grams that repeat an earlier one of
  the same answer, over all answers: high when answers loop ("好的好的好的...").

Characters are the unit throughout (whitespace dropped): Chinese has no spaces to split words on,
and the tokenizer's pieces would make runs with different vocabularies incomparable.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from babyllama.config import ConfigError, RopeScaling, check_int
from babyllama.eval.perplexity import eval_output_path
from babyllama.infer.sampling import MAX_NEW_TOKENS, SamplingConfig, check_max_new_tokens

if TYPE_CHECKING:
    from babyllama.tokenizer.chat import Message


@dataclass
class GenerationEvalConfig:
    ckpt: str  # run directory (its newest good checkpoint) or checkpoint directory
    data: list[str]  # SFT files (FILE or FILE::LAYOUT)
    max_new_tokens: int = MAX_NEW_TOKENS  # per answer (the engine keeps at most half the context for it)
    max_samples: int = 200  # the first conversations of the data, in order
    batch_size: int = 16  # prompts generated together
    layout: str = "auto"  # of every file unless given as FILE::LAYOUT
    encoding: str = "utf-8"
    on_error: str = "raise"  # a malformed record stops the evaluation (skip: count it and go on)
    device: str = "auto"
    dtype: str = "auto"  # bf16 on GPUs that have it, float32 on CPUs (as `generate` and `chat`)
    allow_unverified: bool = False
    out: str | None = None  # JSON results; None: RUN/eval/gen-DATA.json when --ckpt is a run directory
    progress: bool = True
    # sampling: greedy and no repetition penalty, so looping is measured rather than hidden
    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    rope: RopeScaling | None = None  # replaces the checkpoint's RoPE scaling (--rope-scaling ...)

    def __post_init__(self) -> None:
        from babyllama.corpus.readers import DataError
        from babyllama.data.sft import check_format

        if not self.data:
            raise ConfigError("--data: give one or more SFT files")
        check_max_new_tokens(self.max_new_tokens)
        check_int("--max-samples", self.max_samples, 1)
        check_int("--batch-size", self.batch_size, 1)
        try:
            check_format(self.layout)
        except DataError as e:
            raise ConfigError(f"--layout: {e}") from None
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"--on-error must be raise or skip, got {self.on_error!r}")
        if self.out is not None and Path(self.out).suffix == ".jsonl":
            raise ConfigError(f"--out {self.out}: name the JSON summary (FILE.json); the answers go beside it "
                              f"as FILE.jsonl")
        self.sampling()  # a bad --temperature etc. is refused before the model loads

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)


# --- metrics: pure functions of strings ------------------------------------------------------------

def _check_pairs(hyps: list[str], refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} answers for {len(refs)} references")


def bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU in [0, 1] with sacrebleu's Chinese tokenization (one token per character)."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hyps, refs)
    if not hyps:
        return 0.0
    # effective_order only drops n-gram orders no answer is long enough to have (see the docstring)
    metric = BLEU(tokenize="zh", effective_order=True)
    return _fraction(metric.corpus_score(list(hyps), [list(refs)]).score)


def sentence_bleu(hyp: str, ref: str) -> float:
    """BLEU of one answer in [0, 1] (noisy on its own: for looking at single answers)."""
    from sacrebleu.metrics import BLEU

    return _fraction(BLEU(tokenize="zh", effective_order=True).sentence_score(hyp, [ref]).score)


def _fraction(score: float) -> float:
    """sacrebleu's 0..100 as 0..1; identical texts come out as 100.00000000000004 (exp of a log)."""
    return min(score / 100, 1.0)


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _char_tokenizer():
    """A rouge-score tokenizer object that splits text into characters (its default one would
    drop every Chinese character)."""
    from rouge_score.tokenizers import Tokenizer

    class CharTokenizer(Tokenizer):
        def tokenize(self, text):
            return _chars(text)

    return CharTokenizer()


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    """Mean character-level ROUGE-L F1 in [0, 1]."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(hyps, refs)
    if not hyps:
        return 0.0
    scorer = RougeScorer(["rougeL"], tokenizer=_char_tokenizer())
    return sum(scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hyps, refs)) / len(hyps)


def exact_match(hyps: list[str], refs: list[str]) -> float:
    _check_pairs(hyps, refs)
    return sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(len(hyps), 1)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    chars = _chars(text)
    return [tuple(chars[i:i + n]) for i in range(len(chars) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct character n-grams / all character n-grams, over all texts together (0 if none)."""
    grams = [g for text in texts for g in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(texts: list[str], n: int) -> float:
    """The share of n-grams that repeat an earlier n-gram of the same text, over all texts (0 if none).
    Repeats across different texts do not count: this measures looping, not a shared phrase."""
    repeats = total = 0
    for text in texts:
        grams = _ngrams(text, n)
        repeats += len(grams) - len(set(grams))
        total += len(grams)
    return repeats / total if total else 0.0


def generation_metrics(hyps: list[str], refs: list[str]) -> dict:
    return {"bleu": bleu(hyps, refs), "rouge_l": rouge_l(hyps, refs), "exact_match": exact_match(hyps, refs),
            "distinct_1": distinct_n(hyps, 1), "distinct_2": distinct_n(hyps, 2),
            "repeated_4gram_rate": repeated_ngram_rate(hyps, 4),
            "mean_answer_chars": sum(map(len, hyps)) / max(len(hyps), 1),
            "mean_reference_chars": sum(map(len, refs)) / max(len(refs), 1)}


# --- data, generation, results ---------------------------------------------------------------------

@dataclass
class Sample:
    prompt: list[Message]  # the turns before the last assistant turn
    reference: str  # the last assistant turn


def read_samples(data: list[str], layout: str = "auto", encoding: str = "utf-8", max_samples: int = 200,
                 on_error: str = "raise"):
    """(the first `max_samples` samples of the files, ReadStats). Errors name the file and line."""
    from babyllama.corpus.readers import DataError, ReadStats, split_input_spec
    from babyllama.data.sft import read_conversations

    stats, samples = ReadStats(), []
    for spec in data:
        path, fmt = split_input_spec(spec, layout)
        for msgs in read_conversations(path, fmt, stats, on_error, encoding):
            # read_conversations drops trailing user turns: the last turn is the assistant's
            samples.append(Sample(msgs[:-1], msgs[-1].content))
            if len(samples) == max_samples:
                return samples, stats
    if not samples:
        skipped = f" ({stats.skipped} skipped; first: {stats.skipped_where[0]})" if stats.skipped else ""
        raise DataError(f"no conversations to evaluate in {', '.join(data)}{skipped}")
    return samples, stats


_CUT_WARNING = r".* were dropped"  # the end of infer.generate.prompt_cut_warning's message


def generate_answers(engine, prompts: list[list[Message]], max_new_tokens: int, sampling: SamplingConfig,
                     batch_size: int = 16, progress: bool = False) -> tuple[list[str], int]:
    """(the engine's answer to each prompt, in order; how many prompts were cut to fit the context).
    Prompts of similar length share a batch, so little of each batch is padding."""
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: sum(len(m.content) for m in prompts[i]))
    answers: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    with warnings.catch_warnings(record=True) as caught:
        # every cut prompt is caught, to be counted in one line rather than warned about one by one
        warnings.filterwarnings("always", message=_CUT_WARNING)
        for start in tqdm(starts, disable=not progress, desc="generating", unit="batch", leave=False):
            rows = order[start:start + batch_size]
            for i, answer in zip(rows, engine.reply_batch([prompts[i] for i in rows], max_new_tokens, sampling)):
                answers[i] = answer
    cut = 0
    for w in caught:
        if re.match(_CUT_WARNING, str(w.message)):
            cut += 1
        else:  # anything else is still said
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return answers, cut


def _message_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def evaluate_generation(cfg: GenerationEvalConfig) -> dict:
    """Answer the prompts, score the answers; write the summary (JSON) and every prompt, answer and
    reference (JSON lines beside it). Returns the summary, with `written_to`."""
    from babyllama.infer import Engine, load_for_inference

    t0 = time.perf_counter()
    out = eval_output_path(cfg.ckpt, cfg.out, "gen", cfg.data)  # nowhere to write: fail before any work
    samples, stats = read_samples(cfg.data, cfg.layout, cfg.encoding, cfg.max_samples, cfg.on_error)
    model, tokenizer, ckpt = load_for_inference(cfg.ckpt, cfg.device, for_decoding=True,
                                                allow_unverified=cfg.allow_unverified, dtype=cfg.dtype, rope=cfg.rope)
    engine = Engine(model, tokenizer)
    sampling = cfg.sampling()
    answers, cut = generate_answers(engine, [s.prompt for s in samples], cfg.max_new_tokens, sampling,
                                    cfg.batch_size, cfg.progress)
    refs = [s.reference for s in samples]
    result = {"kind": "gen", "checkpoint": str(ckpt), "data": list(cfg.data), "samples": len(samples),
              "max_new_tokens": cfg.max_new_tokens, "sampling": asdict(sampling),
              "metrics": generation_metrics(answers, refs), "outputs": out.with_suffix(".jsonl").name,
              "prompts_cut": cut, "skipped": stats.skipped, "context": engine.context}
    result["seconds"] = time.perf_counter() - t0
    records = [{"prompt": _message_dicts(s.prompt), "answer": a, "reference": s.reference}
               for s, a in zip(samples, answers)]
    _write_results(result, records, out)
    return result


def _write_results(result: dict, records: list[dict], out: Path) -> None:
    from babyllama.outputs import write_text_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    # the answers first: a summary on disk always has its answers beside it
    write_text_atomic(out.with_suffix(".jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text_atomic(out, json.dumps(result, indent=2, ensure_ascii=False))
    result["written_to"] = str(out)


def _sampling_text(s: dict) -> str:
    text = "greedy" if s["temperature"] <= 0 else f"temperature {s['temperature']:g}, top-k {s['top_k']}, " \
                                                  f"top-p {s['top_p']:g}"
    return text + (f", repetition penalty {s['repetition_penalty']:g}" if s["repetition_penalty"] != 1 else "")


def _budget_text(result: dict) -> str:
    from babyllama.infer.generate import reply_room

    room = reply_room(result["context"], result["max_new_tokens"])  # what the engine actually allows
    cap = f" ({room}: half the context)" if room < result["max_new_tokens"] else ""
    return f"at most {result['max_new_tokens']} new tokens{cap}"


def format_summary(result: dict) -> str:
    m = result["metrics"]
    lines = [f"{result['samples']:,} prompts of {', '.join(result['data'])}; {_sampling_text(result['sampling'])}, "
             f"{_budget_text(result)}; {result['seconds']:.1f} s",
             f"BLEU {m['bleu']:.3f}   ROUGE-L {m['rouge_l']:.3f}   exact match {m['exact_match']:.3f}",
             f"distinct-1 {m['distinct_1']:.3f}   distinct-2 {m['distinct_2']:.3f}   "
             f"repeated 4-grams {m['repeated_4gram_rate']:.3f}",
             f"answers {m['mean_answer_chars']:.1f} characters on average, references {m['mean_reference_chars']:.1f}"]
    if result.get("prompts_cut"):
        lines.append(f"{result['prompts_cut']} of {result['samples']} prompts were longer than the context "
                     f"({result['context']} tokens, room for the answer kept): their earliest tokens were dropped")
    if result.get("skipped"):
        lines.append(f"malformed records skipped: {result['skipped']}")
    return "\n".join(lines)
