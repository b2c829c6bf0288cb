"""Multiple-choice benchmarks (C-Eval, CMMLU, JSON lines), scored as lm-evaluation-harness does.

The prompt is the harness's `ceval-valid` / `cmmlu` prompt, character for character: the subject's
opening line, then K solved examples from the subject's dev split (the first K, in file order; a
question is never among its own shots), then the question:

    以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\\n\\n
    {shot question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案： {letter}\\n\\n   (K times)
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：

Each option is scored by the log-likelihood of its continuation, " A" .. " D" (`letter`), or " " +
the option's text divided by its length in characters (`text`, the harness's acc_norm). The
continuation's tokens are what encoding prompt + continuation adds after encoding the prompt
alone, as in the harness; a prompt longer than the model's window loses tokens from the left
(the opening line and shots go first) and is counted.

One forward pass serves every option whose continuation is a single token (the usual case for
letters): their log-probabilities are read at the prompt's last position. Questions are batched in
token order, so a batch mostly shares its opening line and shots: that prefix is computed once
into a KV cache and each question runs only its own tokens after it (5-shot prompts are ~85% prefix).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from babyllama.config import ConfigError, RopeScaling, check_int
from babyllama.corpus.errors import DataError
from babyllama.eval import subjects as known

LETTERS = "ABCDEFGHIJ"
SPLITS = ("val", "test", "dev")


@dataclass
class MultipleChoiceConfig:
    ckpt: str  # run directory (its newest good checkpoint) or checkpoint directory
    data: list[str]  # benchmark directories (C-Eval/CMMLU layout), split directories, CSV or JSONL files
    shots: int = 0  # solved examples from the subject's dev split before each question
    split: str = "val"  # scored split of a benchmark directory (CMMLU has no val: its test is taken)
    score: str = "letter"  # letter: " A".." D"; text: each option's text, length-normalised
    batch_size: int = 16  # sequences per forward pass
    max_questions: int | None = None  # per subject, for a quick look
    device: str = "auto"
    dtype: str = "float32"
    allow_unverified: bool = False
    out: str | None = None  # directory for the JSON results; None: RUN/eval for a run directory
    rope: RopeScaling | None = None  # replaces the checkpoint's RoPE scaling (--rope-scaling ...)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("--data: give a C-Eval or CMMLU directory, CSV files or JSON lines")
        check_int("--shots", self.shots, 0)
        check_int("--batch-size", self.batch_size, 1)
        if self.max_questions is not None:
            check_int("--max-questions", self.max_questions, 1)
        if self.split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)}; got {self.split!r}")
        if self.score not in ("letter", "text"):
            raise ConfigError(f"--score must be letter or text; got {self.score!r}")


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int | None  # index into choices; None when the file has no answer (C-Eval's test split)
    where: str  # "FILE:LINE", for errors and for the saved predictions

    def text(self) -> str:
        options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question.strip()}{options}\n答案："


@dataclass
class Subject:
    name: str
    benchmark: str  # ceval, cmmlu or jsonl
    split: str  # the split its questions come from (dev, val, test; "file" for a loose file)
    title: str
    category: str
    questions: list[Question] = field(default_factory=list)
    exemplars: list[Question] = field(default_factory=list)  # the few-shot pool, in file order

    def description(self) -> str:
        template = known.CMMLU_DESCRIPTION if self.benchmark == "cmmlu" else known.CEVAL_DESCRIPTION
        return template.format(title=self.title)

    def prompt(self, question: Question, shots: int) -> str:
        chosen = [q for q in self.exemplars if q is not question and q.where != question.where][:shots]
        solved = "".join(f"{q.text()} {LETTERS[q.answer]}\n\n" for q in chosen)
        return self.description() + solved + question.text()


# --- reading the files -----------------------------------------------------------------------------

def _decoded_lines(path: Path) -> list[str]:
    from babyllama.corpus.encodings import check_encoding

    check_encoding(path, "utf-8", line_based=False)  # a GB18030 file is named as such, not misread
    try:
        return path.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start}; convert it (iconv -f GB18030 -t UTF-8)") from None


def _answer_index(value, n: int, where: str) -> int | None:
    """An answer given as a letter (A-D, any case), or an index for JSON lines; None if empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    raise DataError(f"{where}: answer {value!r} is not one of {', '.join(LETTERS[:n])}")


def _subject_name(path: Path) -> str:
    return re.sub(r"_(dev|val|test)$", "", path.stem)


def read_csv(path: Path) -> tuple[str, list[Question]]:
    """A C-Eval (`id,question,A,B,C,D,answer[,explanation]`) or CMMLU (`,Question,A,B,C,D,Answer`)
    file: (benchmark, questions). Quoted fields may span lines; errors name the record's line."""
    lines = _decoded_lines(path)
    if not lines:
        raise DataError(f"{path}:1: empty file (expected a header such as id,question,A,B,C,D,answer)")
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader)]
    lowered = [h.lower() for h in header]
    missing = [c for c in ("question", "a", "b", "c", "d", "answer") if c not in lowered]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {','.join(header)}); expected "
                        f"C-Eval's id,question,A,B,C,D,answer or CMMLU's ,Question,A,B,C,D,Answer")
    col = {name: lowered.index(name) for name in ("question", "a", "b", "c", "d", "answer")}
    benchmark = "cmmlu" if "Question" in header else "ceval"
    subject, questions, start = _subject_name(path), [], reader.line_num + 1
    for row in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
        choices = [row[col[k]] for k in "abcd"]
        questions.append(Question(subject, row[col["question"]], choices,
                                  _answer_index(row[col["answer"]], 4, where), where))
    return benchmark, questions


def read_jsonl(path: Path) -> list[Question]:
    """`{"question", "choices": [...], "answer": "B" | 1, "subject"?}` a line."""
    questions = []
    for number, line in enumerate(_decoded_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise DataError(f'{where}: expected {{"question": "...", "choices": [...], "answer": "A"}}')
        choices = rec.get("choices")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or \
                not all(isinstance(c, (str, int, float)) for c in choices):
            raise DataError(f"{where}: \"choices\" must be a list of 2 to {len(LETTERS)} strings")
        subject = str(rec.get("subject") or _subject_name(path))
        questions.append(Question(subject, rec["question"], [str(c) for c in choices],
                                  _answer_index(rec.get("answer"), len(choices), where), where))
    return questions


def _csv_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".csv")
    if not files:
        raise DataError(f"{directory}: no .csv files (expected C-Eval's SUBJECT_SPLIT.csv or CMMLU's SUBJECT.csv)")
    return files


def _benchmark_files(spec: Path, split: str) -> tuple[list[Path], Path | None, str]:
    """(files to score, the dev directory with their shots if any, the split they are) for one --data entry."""
    if spec.is_file():
        dev = spec.parent.parent / "dev"
        named = next((s for s in SPLITS if spec.stem.endswith(f"_{s}") or spec.parent.name == s), "file")
        return [spec], dev if dev.is_dir() and spec.parent.name != "dev" else None, named
    if not spec.is_dir():
        raise DataError(f"{spec}: no such file or directory")
    splits = [d.name for d in sorted(spec.iterdir()) if d.is_dir() and d.name in SPLITS]
    if splits:  # a benchmark's root: dev/ val/ test/
        scored = split if (spec / split).is_dir() else ("test" if split == "val" and "val" not in splits else None)
        if scored is None:
            raise DataError(f"{spec}: no {split}/ directory (it has {', '.join(splits)}); choose --split")
        return _csv_files(spec / scored), (spec / "dev") if (spec / "dev").is_dir() else None, scored
    if spec.name in SPLITS:
        dev = spec.parent / "dev"
        return _csv_files(spec), dev if dev.is_dir() else None, spec.name
    files = sorted(p for p in spec.iterdir() if p.suffix.lower() in (".csv", ".jsonl"))
    if not files:
        raise DataError(f"{spec}: an empty directory (no dev/ val/ test/, no .csv or .jsonl files)")
    return files, None, "file"


def _dev_file(dev: Path, subject: str) -> Path | None:
    for name in (f"{subject}_dev.csv", f"{subject}.csv"):
        if (dev / name).is_file():
            return dev / name
    return None


def load_subjects(data: list[str], split: str = "val", shots: int = 0) -> list[Subject]:
    """Every subject of every --data entry, with its questions and (for shots) its dev examples.
    Subjects of the same name from different benchmarks stay apart."""
    subjects: dict[tuple[str, str], Subject] = {}
    for spec in data:
        files, dev, scored = _benchmark_files(Path(spec), split)
        for path in files:
            if path.suffix.lower() == ".jsonl":
                benchmark, questions = "jsonl", read_jsonl(path)
            else:
                benchmark, questions = read_csv(path)
            for q in questions:
                subject = subjects.get((benchmark, q.subject))
                if subject is None:
                    subject = subjects[(benchmark, q.subject)] = _new_subject(benchmark, q.subject, scored)
                    if shots and dev is not None and (pool := _dev_file(dev, q.subject)) is not None:
                        subject.exemplars = read_csv(pool)[1]
                subject.questions.append(q)
    for subject in subjects.values():
        _check_answers(subject, shots)
    return list(subjects.values())


def _new_subject(benchmark: str, name: str, split: str) -> Subject:
    table = known.CMMLU if benchmark == "cmmlu" else known.CEVAL
    title, category = table.get(name, (name.replace("_", " "), "Other"))
    return Subject(name, benchmark, split, title, category)


def _check_answers(subject: Subject, shots: int) -> None:
    unanswered = next((q for q in subject.questions if q.answer is None), None)
    if unanswered is not None:
        raise DataError(f"{unanswered.where}: no answer to score against (C-Eval's test answers are not "
                        f"published: score --split val)")
    if shots:
        if not subject.exemplars:
            # JSON lines and files without a dev split: shots come from the subject's own questions
            subject.exemplars = list(subject.questions)
        bad = next((q for q in subject.exemplars if q.answer is None), None)
        if bad is not None:
            raise DataError(f"{bad.where}: a few-shot example without an answer")


# --- scoring ----------------------------------------------------------------------------------------

@dataclass
class _Request:
    question: int  # index into the flat question list
    choice: int
    context: list[int]  # token ids the continuation is scored after (already cut to the window)
    continuation: list[int]
    truncated: bool


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: the continuation's tokens are what it adds to the context's encoding."""
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def _requests(subjects: list[Subject], tokenizer, shots: int, score: str, window: int):
    questions, requests = [], []
    for subject in subjects:
        for q in subject.questions:
            prompt = subject.prompt(q, shots)
            options = [f" {LETTERS[i]}" for i in range(len(q.choices))] if score == "letter" else \
                [f" {c}" for c in q.choices]
            for i, option in enumerate(options):
                context, continuation = encode_pair(tokenizer, prompt, option)
                if not continuation:
                    raise DataError(f"{q.where}: option {LETTERS[i]} encodes to no tokens")
                ids = (context + continuation)[-(window + 1):]
                keep = len(ids) - len(continuation)
                requests.append(_Request(len(questions), i, ids[:keep], continuation,
                                         len(context) + len(continuation) > window + 1))
            questions.append((subject, q))
    return questions, requests


@torch.no_grad()
def score_requests(model, requests: list[_Request], batch_size: int = 16, progress: bool = False) -> list[float]:
    """Summed log-probability of each request's continuation after its context. Requests with the
    same input (a context and all but the last continuation token) share one sequence."""
    from tqdm import tqdm

    rows: dict[tuple, list[int]] = {}
    for index, r in enumerate(requests):
        rows.setdefault(tuple(r.context + r.continuation[:-1]), []).append(index)
    order = sorted(rows)  # in token order: a subject's questions (same opening line and shots) side by side
    hidden = {}
    hook = model.norm.register_forward_hook(lambda _m, _i, out: hidden.__setitem__("x", out))
    scores = [0.0] * len(requests)
    bar = tqdm(total=len(order), disable=not progress, desc="multiple choice", unit="seq", leave=False)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            shared = _forward(model, batch)  # the hook keeps the final hidden states
            _score_batch(model, hidden["x"], shared, batch, rows, requests, scores)
            bar.update(len(batch))
    finally:
        hook.remove()
        bar.close()
    return scores


SHARED_PREFIX_MIN = 16  # tokens: below this, computing the prefix once is not worth a cache


def _forward(model, batch: list[tuple]) -> int:
    """Run the rows of `batch` through the model; returns how many leading tokens they share and were
    computed once (the opening line and shots of a subject): the hidden states cover the rest.
    Rows are right-padded, which causal attention makes harmless."""
    device = next(model.buffers()).device
    shared = _common_prefix(batch)
    if shared < SHARED_PREFIX_MIN:
        shared = 0
    longest = max(len(ids) for ids in batch)
    x = torch.zeros(len(batch), longest - shared, dtype=torch.long)
    for row, ids in enumerate(batch):
        x[row, :len(ids) - shared] = torch.tensor(ids[shared:])
    if not shared:
        model(x.to(device), last_only=True)
        return 0
    prefix = model.new_cache(1, shared)
    model(torch.tensor(batch[0][:shared], device=device)[None], cache=prefix, last_only=True)
    cache = model.new_cache(len(batch), longest)
    for layer in range(len(cache.keys)):
        cache.keys[layer][:, :, :shared] = prefix.keys[layer]
        cache.values[layer][:, :, :shared] = prefix.values[layer]
    model(x.to(device), cache=cache, start_pos=shared, last_only=True)
    return shared


def _common_prefix(batch: list[tuple]) -> int:
    """Tokens all rows begin with, leaving each row at least one token of its own."""
    first, n = batch[0], min(len(ids) for ids in batch) - 1
    for ids in batch[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return max(n, 0)


def _score_batch(model, hidden: torch.Tensor, shared: int, batch: list[tuple], rows: dict,
                 requests: list[_Request], scores: list[float]) -> None:
    """Log-probabilities at just the positions some continuation is scored from: one LM-head matmul
    for the batch, one softmax per position however many options read it."""
    wanted: dict[tuple[int, int], int] = {}  # (row, position) -> index into the gathered positions
    for row, ids in enumerate(batch):
        for index in rows[ids]:
            n = len(requests[index].continuation)
            for position in range(len(ids) - n, len(ids)):
                wanted.setdefault((row, position - shared), len(wanted))
    where = torch.tensor(list(wanted), device=hidden.device)
    logprobs = model.output(hidden[where[:, 0], where[:, 1]]).float().log_softmax(-1).cpu()
    for row, ids in enumerate(batch):
        for index in rows[ids]:
            cont = requests[index].continuation
            at = [wanted[(row, len(ids) - len(cont) + j - shared)] for j in range(len(cont))]
            scores[index] = float(logprobs[at, cont].sum())


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of an accuracy (Wilson's: sensible at 0 or all right, and for few questions)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def _summary(rows: list[dict]) -> dict:
    correct = sum(r["correct"] for r in rows)
    total = len(rows)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "chance": sum(1 / r["options"] for r in rows) / total if total else 0.0,
            "ci95": list(wilson_interval(correct, total))}


def predict(model, tokenizer, subjects: list[Subject], shots: int = 0, score: str = "letter",
            batch_size: int = 16, progress: bool = False) -> list[dict]:
    """One record per question: the scores of its options, the prediction and whether it is right."""
    questions, requests = _requests(subjects, tokenizer, shots, score, model.config.max_seq_len)
    logprobs = score_requests(model, requests, batch_size, progress)
    per_question: list[list[float]] = [[] for _ in questions]
    truncated = [False] * len(questions)
    for r, lp in zip(requests, logprobs):
        subject, q = questions[r.question]
        per_question[r.question].append(lp / len(q.choices[r.choice]) if score == "text" else lp)
        truncated[r.question] |= r.truncated
    records = []
    for (subject, q), option_scores, cut in zip(questions, per_question, truncated):
        best = max(range(len(option_scores)), key=option_scores.__getitem__)  # ties: the first, as argmax
        records.append({"benchmark": subject.benchmark, "subject": subject.name, "where": q.where,
                        "answer": LETTERS[q.answer], "predicted": LETTERS[best], "correct": best == q.answer,
                        "scores": option_scores, "options": len(q.choices), "truncated": cut})
    return records


def summarise(records: list[dict], subjects: list[Subject]) -> dict:
    """Accuracy overall, per category and per subject, each with chance and a 95% interval."""
    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    category = {s.name: s.category for s in subjects}
    result = {"overall": _summary(records), "categories": {}, "subjects": {}}
    for name in known.CATEGORIES:
        rows = [r for r in records if category[r["subject"]] == name]
        if rows:
            result["categories"][name] = _summary(rows)
    china = [r for r in records if r["benchmark"] == "cmmlu" and r["subject"] in known.CMMLU_CHINA_SPECIFIC]
    if china:
        result["categories"]["China specific"] = _summary(china)
    for name, rows in sorted(by_subject.items()):
        result["subjects"][name] = {**_summary(rows), "category": category[name]}
    result["truncated"] = sum(r["truncated"] for r in records)
    return result


def evaluate_multiple_choice(cfg: MultipleChoiceConfig) -> list[dict]:
    """Score every benchmark of --data; one result (and one JSON file) per benchmark."""
    from babyllama.eval.perplexity import _run_eval_dir, _slug, load_for_eval

    t0 = time.perf_counter()
    subjects = load_subjects(cfg.data, cfg.split, cfg.shots)
    if cfg.max_questions:
        for s in subjects:
            s.questions = s.questions[:cfg.max_questions]
    model, tokenizer, ckpt = load_for_eval(cfg.ckpt, cfg.device, cfg.dtype, cfg.allow_unverified, cfg.rope)
    records = predict(model, tokenizer, subjects, cfg.shots, cfg.score, cfg.batch_size, cfg.progress)
    seconds = time.perf_counter() - t0
    out_dir = Path(cfg.out) if cfg.out else _run_eval_dir(cfg.ckpt)
    results, benchmarks = [], list(dict.fromkeys(s.benchmark for s in subjects))
    for benchmark in benchmarks:
        mine = [s for s in subjects if s.benchmark == benchmark]
        rows = [r for r in records if r["benchmark"] == benchmark]
        split = "+".join(dict.fromkeys(s.split for s in mine))
        result = {"kind": "mc", "benchmark": benchmark, "checkpoint": str(ckpt), "data": list(cfg.data),
                  "split": split, "shots": cfg.shots, "score": cfg.score, **summarise(rows, mine),
                  "seconds": seconds, "predictions": rows}
        if out_dir is not None:
            from babyllama.outputs import write_text_atomic

            name = _slug(cfg.data) + (f"-{benchmark}" if len(benchmarks) > 1 else "")
            out = out_dir / f"mc-{name}-{split}-{cfg.shots}shot-{cfg.score}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, json.dumps(result, indent=1, ensure_ascii=False))
            result["written_to"] = str(out)
        results.append(result)
    return results


def _pct(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{s['accuracy']:6.1%}  [{lo:5.1%}, {hi:5.1%}]  chance {s['chance']:5.1%}  ({s['correct']}/{s['total']})"


def format_result(result: dict) -> str:
    names = {"ceval": "C-Eval", "cmmlu": "CMMLU", "jsonl": "JSON lines"}
    lines = [f"{names[result['benchmark']]}: {result['split']} split, {result['shots']}-shot, "
             f"scored by {result['score']}; accuracy [95% interval]",
             f"  {'overall':<16}{_pct(result['overall'])}"]
    lines += [f"  {name:<16}{_pct(s)}" for name, s in result["categories"].items()]
    if result["truncated"]:
        lines.append(f"  {result['truncated']} question(s) longer than the model's window lost their opening "
                     f"tokens (the instruction and shots first)")
    return "\n".join(lines)
