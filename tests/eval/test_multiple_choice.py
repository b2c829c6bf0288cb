"""Multiple choice: the harness's prompt with exactly K shots of the subject (never the question),
the option a controlled model favours is picked, scores equal full-logit log-likelihoods, the real
C-Eval/CMMLU dev files read, and bad files are one error naming the file and line."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from babyllama.cli import main
from babyllama.eval import multiple_choice as mc
from babyllama.eval.multiple_choice import (LETTERS, Subject, encode_pair, load_subjects, predict, summarise,
                                            wilson_interval)
from babyllama.model import Llama
from tests.conftest import needs_shared, tiny_model_config

CEVAL_HEADER = "id,question,A,B,C,D,answer,explanation\n"
CMMLU_HEADER = ",Question,A,B,C,D,Answer\n"


def _ceval(root, subject, split, rows):
    """rows: (question, [4 options], answer letter)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = [CEVAL_HEADER] + [f'{i},"{q}",{",".join(opts)},{a},\n' for i, (q, opts, a) in enumerate(rows)]
    (root / split / f"{subject}_{split}.csv").write_text("".join(lines), encoding="utf-8")


def _questions(prefix, n, answers="ABCD"):
    return [(f"{prefix}第{i}题 #{answers[i % len(answers)]}#", ["甲", "乙", "丙", "丁"], answers[i % len(answers)])
            for i in range(n)]


@pytest.fixture
def ceval_dir(tmp_path):
    root = tmp_path / "ceval"
    for subject in ("computer_network", "law"):
        _ceval(root, subject, "dev", _questions(f"{subject}示例", 5))
        _ceval(root, subject, "val", _questions(f"{subject}问题", 6, "CADB"))
    return root


def test_few_shot_prompts_hold_the_first_k_dev_examples_of_the_subject_in_order(ceval_dir):
    for k in range(6):
        subjects = {s.name: s for s in load_subjects([str(ceval_dir)], "val", k)}
        law = subjects["law"]
        prompt = law.prompt(law.questions[2], k)
        assert prompt.startswith("以下是中国关于法学的单项选择题，请选出其中的正确答案。\n\n")
        shots = re.findall(r"(\S+第\d题) #\w#\nA\. 甲\nB\. 乙\nC\. 丙\nD\. 丁\n答案： (\w)\n\n", prompt)
        assert shots == [(f"law示例第{i}题", "ABCD"[i % 4]) for i in range(min(k, 5))]
        assert prompt.endswith("law问题第2题 #D#\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")
        assert "computer_network" not in prompt


def test_dev_as_both_shots_and_questions_leaves_each_question_out_of_its_own_shots(ceval_dir):
    subject = {s.name: s for s in load_subjects([str(ceval_dir)], "dev", 3)}["law"]
    for i, q in enumerate(subject.questions):
        prompt = subject.prompt(q, 3)
        shots = re.findall(r"law示例第(\d)题 #\w#\n.*?答案： \w\n\n", prompt, re.S)
        expected = [j for j in range(5) if j != i][:3]
        assert [int(s) for s in shots] == expected


class ControlledModel(nn.Module):
    """Favours, for the question being asked, the option its text names: '#C#' in the question
    (letter scoring) or the option text that holds '!' (text scoring)."""

    def __init__(self, tokenizer, max_seq_len=4096):
        super().__init__()
        self.tokenizer = tokenizer
        self.config = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len)
        self.norm, self.output = nn.Identity(), nn.Identity()  # hidden states are the logits
        self.register_buffer("anchor", torch.zeros(1))

    def new_cache(self, batch_size, length):  # the scorer computes a shared prefix once: remember it
        return SimpleNamespace(keys=[], values=[])

    def forward(self, tokens, cache=None, start_pos=0, last_only=False):
        if cache is not None and start_pos == 0:
            self.prefix = tokens[0].tolist()
            return None
        hidden = torch.zeros(*tokens.shape, self.tokenizer.vocab_size)
        for row, ids in enumerate(tokens.tolist()):
            text = self.tokenizer.decode((self.prefix if start_pos else []) + ids)
            asked, _, tail = text.rpartition("答案：")
            tag = re.findall(r"#([A-D])#", asked)[-1]
            options = dict(re.findall(r"\n([A-D])\. ([^\n]*)", asked.rsplit("\n\n", 1)[-1]))
            favoured = options.get(tag) if "!" not in "".join(options.values()) else \
                next(v for v in options.values() if "!" in v)
            wanted = f" {tag}" if "!" not in "".join(options.values()) else f" {favoured}"
            _, cont = encode_pair(self.tokenizer, asked + "答案：", wanted)
            hidden[row, :, cont] = 8.0
        return self.output(self.norm(hidden))[:, -1:] if last_only else self.output(self.norm(hidden))


def test_the_scorer_picks_the_option_the_model_favours(ceval_dir, tokenizer):
    model = ControlledModel(tokenizer)
    for shots in (0, 3):
        subjects = load_subjects([str(ceval_dir)], "val", shots)
        records = predict(model, tokenizer, subjects, shots, "letter", batch_size=5)
        assert len(records) == 12 and all(r["correct"] for r in records)
        assert [r["predicted"] for r in records[:6]] == list("CADBCA")
        result = summarise(records, subjects)
        assert result["overall"]["accuracy"] == 1.0 and result["overall"]["chance"] == 0.25
        assert set(result["categories"]) == {"STEM", "Humanities"}  # computer_network, law


def test_text_scoring_is_the_option_log_likelihood_per_character(ceval_dir, tokenizer, monkeypatch):
    subject = Subject("law", "ceval", "val", "法学", "Humanities")
    subject.questions = [mc.Question("law", "问题 #A#", ["甲", "乙乙乙乙", "丙丙", "丁"], 0, "f:1")]
    fixed = {0: -2.0, 1: -4.0, 2: -3.0, 3: -2.5}  # per character: -2, -1, -1.5, -2.5
    monkeypatch.setattr(mc, "score_requests", lambda model, reqs, *a, **k: [fixed[r.choice] for r in reqs])
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size))
    assert predict(model, tokenizer, [subject], 0, "text")[0]["predicted"] == "B"
    assert predict(model, tokenizer, [subject], 0, "letter")[0]["predicted"] == "A"


def test_scores_equal_log_likelihoods_from_full_logits_with_truncation(ceval_dir, tokenizer):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=48)).eval()
    subjects = load_subjects([str(ceval_dir)], "val", 2)
    for score in ("letter", "text"):
        questions, requests = mc._requests(subjects, tokenizer, 2, score, 48)
        got = mc.score_requests(model, requests, batch_size=3)
        assert any(r.truncated for r in requests) and len({len(r.continuation) for r in requests}) >= 1
        for r, lp in zip(requests, got):
            subject, q = questions[r.question]
            context, continuation = encode_pair(tokenizer, subject.prompt(q, 2),
                                                f" {LETTERS[r.choice]}" if score == "letter" else f" {q.choices[r.choice]}")
            ids = (context + continuation)[-49:]
            with torch.no_grad():
                logp = model(torch.tensor(ids[:-1])[None])[0].double().log_softmax(-1)
            n = len(continuation)
            ref = sum(float(logp[len(ids) - 1 - n + j, continuation[j]]) for j in range(n))
            assert lp == pytest.approx(ref, abs=1e-4)


def test_the_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_json_lines_with_any_number_of_options(tmp_path, tokenizer):
    f = tmp_path / "quiz.jsonl"
    rows = [{"question": f"问{i} #{'AB'[i % 2]}#", "choices": ["是", "否", "不知道"], "answer": "AB"[i % 2]}
            for i in range(4)] + [{"question": "问 #C#", "choices": ["一", "二", "三"], "answer": 2, "subject": "数"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    subjects = load_subjects([str(f)], "val", 2)
    assert {s.name for s in subjects} == {"quiz", "数"}
    records = predict(ControlledModel(tokenizer), tokenizer, subjects, 2, "letter")
    assert all(r["correct"] for r in records)
    assert summarise(records, subjects)["overall"]["chance"] == pytest.approx(1 / 3)


def test_the_command_writes_per_question_predictions_to_the_run(tiny_run, ceval_dir, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["eval", "mc", "--ckpt", str(run), "--data", str(ceval_dir), "--shots", "2"]) == 0
    out = capsys.readouterr().out
    assert "C-Eval: val split, 2-shot" in out and "chance 25.0%" in out
    written = json.loads((run / "eval" / "mc-ceval-val-2shot-letter.json").read_text(encoding="utf-8"))
    assert written["kind"] == "mc" and written["overall"]["total"] == 12 == len(written["predictions"])
    assert written["subjects"]["law"]["category"] == "Humanities"
    assert written["truncated"] > 0  # the tiny model's 64-token window cuts 2-shot prompts
    assert set(written["overall"]) >= {"accuracy", "correct", "total", "chance", "ci95"}


@pytest.mark.parametrize("content,where,message", [
    ("id,question,A,B,C,answer\n0,问,a,b,c,A\n", ":1:", "missing column(s) d"),
    (CEVAL_HEADER + "0,问,a,b,c,d,A,\n1,问,a,b,c,d,E,\n", ":3:", "answer 'E' is not one of A, B, C, D"),
    (CMMLU_HEADER + '0,"多行\n问题",a,b,c,d,B\n1,问,a,b,c,d,\n', ":4:", "no answer to score against"),
])
def test_bad_files_are_one_error_naming_the_file_and_line(tmp_path, tiny_run, capsys, content, where, message):
    run, _ = tiny_run
    f = tmp_path / "law_val.csv"
    f.write_text(content, encoding="utf-8")
    assert main(["eval", "mc", "--ckpt", str(run), "--data", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("babyllama: error:") and f"{f}{where}" in err[0] and message in err[0]


def test_an_empty_directory_and_a_gb18030_file_are_named(tmp_path, tiny_run, capsys):
    run, _ = tiny_run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "mc", "--ckpt", str(run), "--data", str(empty)]) == 2
    assert "empty directory" in capsys.readouterr().err
    gbk = tmp_path / "val" / "law_val.csv"
    gbk.parent.mkdir()
    gbk.write_bytes((CEVAL_HEADER + "0,中华人民共和国的首都是哪里,北京,上海,广州,深圳,A,\n" * 20).encode("gb18030"))
    assert main(["eval", "mc", "--ckpt", str(run), "--data", str(gbk.parent)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(gbk) in err[0] and "GB18030" in err[0]


def test_the_real_ceval_and_cmmlu_dev_files(tokenizer):
    """../shared/data/eval: the published layouts; dev serves as shots and questions."""
    root = needs_shared("eval")
    ceval = load_subjects([str(root / "ceval")], "dev", 5)
    cmmlu = load_subjects([str(root / "cmmlu")], "dev", 5)
    assert len(ceval) == 52 and len(cmmlu) == 67
    assert all(len(s.questions) == 5 and len(s.exemplars) == 5 for s in ceval + cmmlu)
    assert {s.category for s in ceval} == {"STEM", "Humanities", "Social Science", "Other"}
    assert not [s.name for s in ceval + cmmlu if s.title == s.name.replace("_", " ")]  # every subject known
    network = next(s for s in ceval if s.name == "computer_network")
    prompt = network.prompt(network.questions[0], 5)
    assert prompt.startswith("以下是中国关于计算机网络的单项选择题") and prompt.count("答案：") == 5  # 4 shots + itself
    assert network.questions[0].question.strip() not in prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
    agronomy = next(s for s in cmmlu if s.name == "agronomy")
    assert agronomy.prompt(agronomy.questions[0], 0).startswith("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n")
    # scored end to end with one question a subject (a tiny random model: near chance, all counted)
    for s in ceval + cmmlu:
        s.questions = s.questions[:1]
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)).eval()
    records = predict(model, tokenizer, ceval + cmmlu, 1, "letter", batch_size=32)
    assert len(records) == 119 and all(len(r["scores"]) == 4 for r in records)
