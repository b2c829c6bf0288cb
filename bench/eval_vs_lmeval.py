"""Multiple choice: `babyllama eval mc` against lm-evaluation-harness on the same model and files.

The harness runs our model exported to `transformers` (`babyllama.export.hf`, same logits, tested)
through its own `HFLM` and its own C-Eval task definition (`_default_ceval_yaml`: prompt, choices,
few-shot sampler), with a task per subject whose data files point at a local C-Eval-layout
directory. Ours runs `eval mc` code on the same directory. Compared per question (ties, options
whose log-likelihoods differ by less than 1e-4 in either scorer, aside): the predicted letter, and
the accuracy; and the wall time of each, the same threads.

The local directory: `dev/` is C-Eval's published dev split (../shared/data/eval/ceval/dev, the
shots), and `val/` holds CMMLU's published dev questions, dealt round-robin to C-Eval's subjects
(C-Eval's own val questions are not in ../shared; CMMLU's are real exam questions of the same form).
The model: `--ckpt RUN` (e.g. runs/demo/pretrain), or by default a randomly initialised model of
1,024 positions over a tokenizer trained on the built-in corpus.

    python -m bench.eval_vs_lmeval [--ckpt RUN] [--shots 0 5] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, markdown_table

SHARED = ROOT.parent / "shared" / "data" / "eval"
TIE = 1e-4


def build_local_ceval(out: Path) -> int:
    """dev/ = C-Eval's dev files; val/ = CMMLU's dev questions spread over the same subjects."""
    shutil.copytree(SHARED / "ceval" / "dev", out / "dev")
    subjects = sorted(p.name[:-len("_dev.csv")] for p in (out / "dev").glob("*_dev.csv"))
    rows: dict[str, list] = {s: [] for s in subjects}
    questions = []
    for f in sorted((SHARED / "cmmlu" / "dev").glob("*.csv")):
        with open(f, encoding="utf-8", newline="") as fh:
            questions += [[r["Question"], r["A"], r["B"], r["C"], r["D"], r["Answer"]] for r in csv.DictReader(fh)]
    for i, q in enumerate(questions):
        rows[subjects[i % len(subjects)]].append(q)
    (out / "val").mkdir()
    for subject, qs in rows.items():
        with open(out / "val" / f"{subject}_val.csv", "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
            w.writerows([i, *q] for i, q in enumerate(qs))
    return len(questions)


def write_tasks(data: Path, tasks_dir: Path) -> list[str]:
    """One harness task per subject: the harness's own C-Eval defaults, our local files."""
    import lm_eval
    import yaml

    ceval = Path(lm_eval.__file__).parent / "tasks" / "ceval"
    names = []
    for val in sorted((data / "val").glob("*_val.csv")):
        subject = val.name[:-len("_val.csv")]
        theirs = yaml.safe_load((ceval / f"ceval-valid_{subject}.yaml").read_text(encoding="utf-8"))
        task = {"include": str(ceval / "_default_ceval_yaml"), "task": f"local_ceval_{subject}",
                "dataset_path": "csv", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"val": str(val), "dev": str(data / "dev" / f"{subject}_dev.csv")},
                                   "keep_default_na": False, "na_filter": False},
                "description": theirs["description"]}
        (tasks_dir / f"local_ceval_{subject}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True), "utf-8")
        names.append(task["task"])
    return names


def hf_tokenizer(tok):
    """Our tokenizer behind `transformers`' tokenizer interface, for HFLM (tokenization is ours on
    both sides; what is compared is prompting, splitting, scoring and choosing)."""
    import transformers

    class Wrapped(transformers.PreTrainedTokenizer):
        def __init__(self, **kw):
            self.ours = tok
            super().__init__(**kw)

        @property
        def vocab_size(self):
            return self.ours.vocab_size

        def get_vocab(self):
            return {f"<{i}>": i for i in range(self.ours.vocab_size)}

        def _tokenize(self, text, **kw):
            return [f"<{i}>" for i in self.ours.encode(text)]

        def _convert_token_to_id(self, token):
            return int(token[1:-1])

        def _convert_id_to_token(self, index):
            return f"<{index}>"

        def encode(self, text, *args, **kw):
            return self.ours.encode(text)

        def decode(self, ids, *args, **kw):
            return self.ours.decode([ids] if isinstance(ids, int) else list(ids))

    wrapped = Wrapped(eos_token=f"<{tok.eos_id}>", pad_token=f"<{tok.eos_id}>")
    return wrapped


def load_model(ckpt: str | None, workdir: Path):
    import torch

    from babyllama.config import ModelConfig
    from babyllama.eval.perplexity import load_for_eval
    from babyllama.model import Llama

    if ckpt:
        model, tok, _ = load_for_eval(ckpt)
        return model, tok, f"{ckpt}"
    from babyllama.data.builtin import write_builtin_corpus
    from babyllama.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    corpus = write_builtin_corpus(workdir / "corpus")
    tok = train_tokenizer(TokenizerTrainConfig(inputs=[corpus["peoples_daily"], corpus["reviews"] + "::text"],
                                               out=str(workdir / "tokenizer"), vocab_size=8192))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=256, n_layers=4, n_heads=8, max_seq_len=1024)
    return Llama(cfg).eval(), tok, "random init, dim 256, 4 layers, 1,024 positions, vocab 8,192"


def ours(model, tok, data: Path, shots: int) -> tuple[list[dict], float]:
    from babyllama.eval.multiple_choice import load_subjects, predict

    t = time.perf_counter()
    subjects = load_subjects([str(data)], "val", shots)
    records = predict(model, tok, subjects, shots, "letter", batch_size=16)
    return records, time.perf_counter() - t


def theirs(hf, tok, tasks_dir: Path, names: list[str], shots: int, max_length: int) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t = time.perf_counter()
    lm = HFLM(pretrained=hf, tokenizer=hf_tokenizer(tok), batch_size=16, max_length=max_length, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir)), bootstrap_iters=0)
    seconds = time.perf_counter() - t
    by_question = {}
    for name in names:
        subject = name[len("local_ceval_"):]
        for sample in out["samples"][name]:
            by_question[(subject, sample["doc_id"])] = [float(r[0]) for r in sample["filtered_resps"]]
    return by_question, seconds


def compare(records: list[dict], reference: dict) -> dict:
    per_subject: dict[str, int] = {}
    agree = ties = disagree = right_ours = right_theirs = 0
    examples = []
    for r in records:
        index = per_subject.get(r["subject"], 0)
        per_subject[r["subject"]] = index + 1
        ref = reference[(r["subject"], index)]
        answer = "ABCD".index(r["answer"])
        theirs_pick = max(range(len(ref)), key=ref.__getitem__)
        ours_pick = "ABCD".index(r["predicted"])
        right_ours += ours_pick == answer
        right_theirs += theirs_pick == answer
        if ours_pick == theirs_pick:
            agree += 1
        elif _tied(r["scores"]) or _tied(ref):
            ties += 1
        else:
            disagree += 1
            examples.append((r["where"], r["scores"], ref))
    n = len(records)
    return {"questions": n, "agree": agree, "ties": ties, "disagree": disagree,
            "agreement": agree / max(n - ties, 1), "acc_ours": right_ours / n, "acc_theirs": right_theirs / n,
            "max_abs_diff": max(max(abs(a - b) for a, b in zip(r["scores"], reference[(r["subject"], i)]))
                                for r, i in zip(records, _indices(records))), "examples": examples[:3]}


def _indices(records):
    seen: dict[str, int] = {}
    for r in records:
        seen[r["subject"]] = seen.get(r["subject"], -1) + 1
        yield seen[r["subject"]]


def _tied(scores: list[float]) -> bool:
    top = sorted(scores, reverse=True)
    return len(top) > 1 and top[0] - top[1] < TIE


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.eval_vs_lmeval", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="a run or checkpoint directory (default: a random model, see above)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: this benchmark needs the C-Eval and CMMLU dev files of ../shared/data/eval")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("lm-evaluation-harness is not installed: pip install -e '.[bench]' (make bench does)")
    import torch

    from babyllama.export.hf import to_hf_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = build_local_ceval(work / "ceval")
        tasks_dir = work / "tasks"
        tasks_dir.mkdir()
        names = write_tasks(work / "ceval", tasks_dir)
        model, tok, described = load_model(args.ckpt, work)
        hf = to_hf_model(model)
        rows = []
        for shots in args.shots:
            records, our_seconds = ours(model, tok, work / "ceval", shots)
            reference, their_seconds = theirs(hf, tok, tasks_dir, names, shots, model.config.max_seq_len)
            c = compare(records, reference)
            rows.append([f"{shots}-shot", c["questions"], f"{c['agreement']:.1%} ({c['agree']}, ties {c['ties']}, "
                         f"differ {c['disagree']})", f"{c['acc_ours']:.1%}", f"{c['acc_theirs']:.1%}",
                         f"{c['max_abs_diff']:.1e}", f"{our_seconds:.1f}", f"{their_seconds:.1f}",
                         f"{their_seconds / our_seconds:.1f}x"])
            for where, a, b in c["examples"]:
                print(f"differs: {where}: ours {a} harness {b}", file=sys.stderr)
    print(f"### `babyllama eval mc` vs lm-evaluation-harness {lm_eval.__version__} (C-Eval layout, {n} questions "
          f"over 52 subjects; model: {described}; {args.threads} threads)\n")
    print(markdown_table(["setting", "questions", "same prediction", "accuracy ours", "accuracy harness",
                          "max |log-lik diff|", "ours s", "harness s", "speed-up"], rows))


if __name__ == "__main__":
    main()
