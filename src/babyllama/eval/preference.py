"""Preference accuracy: how often a model prefers the chosen reply of a (prompt, chosen, rejected)
pair, `babyllama eval pref`. What DPO should raise, measured on pairs it did not train on.

A reply's score is the sum of the log-probabilities of its tokens after the prompt (the model's
own likelihood, no reference): the pair counts as right when the chosen reply scores higher.
Also reported: the same with scores per token (length-normalised, which long and short replies
do not tilt) and the mean margin log p(chosen) - log p(rejected). Pairs are read with the layouts
of `babyllama dpo` and rendered with the chat template (or as plain text with `--no-chat`), as DPO
trains on them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from babyllama.config import ConfigError, IGNORE_INDEX, check_int


@dataclass
class PreferenceEvalConfig:
    ckpt: str  # run directory (its newest good checkpoint) or checkpoint directory
    data: list[str]  # preference files (FILE or FILE::LAYOUT)
    layout: str = "auto"
    chat: bool = True  # False: plain-text pairs (a prompt and two continuations), as `dpo --no-chat`
    max_pairs: int = 1000  # the first pairs of the data, in order
    batch_size: int = 16  # pairs scored together
    encoding: str = "utf-8"
    on_error: str = "raise"
    device: str = "auto"
    dtype: str = "float32"
    allow_unverified: bool = False
    out: str | None = None  # JSON results; None: RUN/eval/pref-DATA.json when --ckpt is a run directory
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("--max-pairs", self.max_pairs, 1)
        check_int("--batch-size", self.batch_size, 1)
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"--on-error must be skip or raise, got {self.on_error!r}")


@torch.no_grad()
def pair_scores(model, samples: list, pad_id: int, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """(pairs, 2, 2): per pair and side (chosen, rejected), the summed log-prob of the reply and
    its number of tokens."""
    from tqdm import tqdm

    from babyllama.data.preference import collate_pairs

    device = next(model.parameters()).device
    out = torch.zeros(len(samples), 2, 2, dtype=torch.float64)
    for start in tqdm(range(0, len(samples), batch_size), disable=not progress, desc="pairs", unit="batch",
                      leave=False):
        tokens, targets, _ = collate_pairs(samples[start:start + batch_size], pad_id)
        n, sides, width = tokens.shape
        losses = model(tokens.view(n * sides, width).to(device), targets.view(n * sides, width).to(device),
                       reduction="none")
        out[start:start + n, :, 0] = -losses.double().sum(-1).view(n, sides).cpu()
        out[start:start + n, :, 1] = (targets != IGNORE_INDEX).sum(-1).double()
    return out


def preference_metrics(scores: torch.Tensor) -> dict:
    logp, length = scores[..., 0], scores[..., 1].clamp(min=1)
    per_token = logp / length
    return {"accuracy": (logp[:, 0] > logp[:, 1]).double().mean().item(),
            "accuracy_per_token": (per_token[:, 0] > per_token[:, 1]).double().mean().item(),
            "mean_margin": (logp[:, 0] - logp[:, 1]).mean().item()}


def evaluate_preferences(cfg: PreferenceEvalConfig) -> dict:
    """Score every pair; write the summary (JSON). Returns it, with `written_to`."""
    from babyllama.corpus.readers import ReadStats
    from babyllama.data.preference import read_pairs, tokenize_pair
    from babyllama.corpus.readers import split_input_spec
    from babyllama.data.sft import SFTStats
    from babyllama.eval.perplexity import eval_output_path, load_for_eval
    from babyllama.outputs import write_text_atomic
    from babyllama.tokenizer.chat import ChatTemplate, PlainText

    t0 = time.perf_counter()
    out = eval_output_path(cfg.ckpt, cfg.out, "pref", cfg.data)  # before any work
    model, tok, ckpt = load_for_eval(cfg.ckpt, cfg.device, cfg.dtype, cfg.allow_unverified)
    template = ChatTemplate(tok) if cfg.chat else PlainText(tok)
    read, cut = ReadStats(), SFTStats()
    samples = []
    for spec in cfg.data:
        path, fmt = split_input_spec(spec, cfg.layout)
        for pair in read_pairs(path, fmt, read, cfg.on_error, cfg.encoding):
            samples.append(tokenize_pair(pair, template, model.config.max_seq_len + 1, cut))
            if len(samples) == cfg.max_pairs:
                break
        if len(samples) == cfg.max_pairs:
            break
    if not samples:
        raise ConfigError(f"--data {' '.join(cfg.data)}: no preference pairs")
    scores = pair_scores(model, samples, tok.pad_id, cfg.batch_size, cfg.progress)
    result = {"kind": "pref", "checkpoint": str(ckpt), "data": list(cfg.data), "pairs": len(samples),
              "skipped": read.skipped, "metrics": preference_metrics(scores),
              "seconds": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2, ensure_ascii=False))
    result["written_to"] = str(out)
    return result


def format_summary(result: dict) -> str:
    m = result["metrics"]
    return (f"{result['pairs']:,} pairs: the chosen reply preferred {m['accuracy']:.1%} of the time "
            f"({m['accuracy_per_token']:.1%} per token); mean margin {m['mean_margin']:+.3f} nats")
