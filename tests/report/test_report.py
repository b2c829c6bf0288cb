"""`babyllama report`: every section of a real (tiny) run's report, in Markdown and in HTML that
parses and stands alone; the same for a run with no evaluations; comparisons; unknown evaluation
kinds; bad run directories; never replacing a file the report did not write."""

from __future__ import annotations

import json
import platform
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from babyllama.config import ConfigError, RunConfig, TrainConfig
from babyllama.outputs import RUN, OutputError, foreign_entries
from babyllama.report import ReportConfig, Section, write_report
from babyllama.report.document import Heading, Table, markdown_to_html
from babyllama.report.evals import eval_blocks, headline
from babyllama.report.format import number
from babyllama.report.render import COMPARISON_SECTIONS, SINGLE_SECTIONS
from tests.conftest import tiny_model_config

MC_RESULT = {
    "kind": "mc", "benchmark": "ceval", "shots": 5, "split": "val", "score": "letter", "truncated": 0,
    "predictions": [{"subject": "高中数学", "answer": "A", "predicted": "B", "correct": False}] * 50,
    "overall": {"accuracy": 0.2875, "correct": 115, "total": 400, "chance": 0.25, "ci95": [0.244, 0.333]},
    "categories": {"STEM": {"accuracy": 0.27, "correct": 54, "total": 200, "chance": 0.25, "ci95": [0.21, 0.33]},
                   "人文": {"accuracy": 0.305, "correct": 61, "total": 200, "chance": 0.25, "ci95": [0.24, 0.37]}},
    "subjects": {"高中数学": {"accuracy": 0.26, "correct": 26, "total": 100, "chance": 0.25, "ci95": [0.18, 0.35],
                          "category": "STEM"},
                 "中国历史": {"accuracy": 0.31, "correct": 31, "total": 100, "chance": 0.25, "ci95": [0.22, 0.40],
                          "category": "人文"}},
}
GEN_RESULT = {"kind": "gen", "samples": 3, "outputs": "gen-reviews.jsonl", "data": ["reviews.jsonl"],
              "max_new_tokens": 16, "sampling": {"temperature": 0.0, "top_k": 0}, "prompts_cut": 0,
              "metrics": {"bleu": 12.34, "rouge_l": 0.4567, "exact_match": 0.62, "distinct_1": 0.31,
                          "distinct_2": 0.55, "repeated_4gram_rate": 0.02}}
GENERATIONS = [{"prompt": [{"role": "user", "content": "判断这条评论的情感：房间很干净"}], "answer": "正面",
                "reference": "正面"},
               {"prompt": "判断这条评论的情感：等了一个小时 | 才上菜", "answer": "负面", "reference": "负面"}]
UNKNOWN_RESULT = {"kind": "toxicity", "flagged": 3, "total": 300, "by_category": {"insult": 0.0123}, "note": "实验性"}


# --- a tiny real run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """Eight steps of pretraining a 2-layer model: metrics, validation, a checkpoint, a tokenizer."""
    from babyllama.train.pretrain import PretrainJob, pretrain

    out = tmp_path_factory.mktemp("report") / "tiny"
    cfg = RunConfig(model=tiny_model_config(vocab_size=0),
                    train=TrainConfig(max_steps=8, batch_size=2, log_interval=2, eval_interval=4, eval_batches=1,
                                      warmup_steps=2, ckpt_interval=100, device="cpu"))
    pretrain(PretrainJob(data=str(data_dir), out=str(out), config=cfg, progress=False))
    return out


@pytest.fixture(scope="module")
def evaluated_run(trained_run, data_dir, tmp_path_factory) -> Path:
    """The run, with a real perplexity result and fixture results of the other kinds."""
    from babyllama.eval.perplexity import PerplexityConfig, perplexity

    run = tmp_path_factory.mktemp("evaluated") / "评测"  # a Chinese run name: legends, titles, HTML
    shutil.copytree(trained_run, run)
    perplexity(PerplexityConfig(ckpt=str(run), data=[str(data_dir)], max_tokens=200, batch_size=4, progress=False))
    eval_dir = run / "eval"
    (eval_dir / "mc-ceval.json").write_text(json.dumps(MC_RESULT, ensure_ascii=False), encoding="utf-8")
    (eval_dir / "gen-reviews.json").write_text(json.dumps(GEN_RESULT, ensure_ascii=False), encoding="utf-8")
    (eval_dir / "gen-reviews.jsonl").write_text(
        "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in GENERATIONS), encoding="utf-8")
    (eval_dir / "toxicity.json").write_text(json.dumps(UNKNOWN_RESULT, ensure_ascii=False), encoding="utf-8")
    return run


@pytest.fixture
def bare_run(trained_run, tmp_path) -> Path:
    run = tmp_path / "bare"
    shutil.copytree(trained_run, run)
    return run


def _texts(written: dict) -> tuple[str, str]:
    return (Path(written["markdown"]).read_text(encoding="utf-8"), Path(written["html"]).read_text(encoding="utf-8"))


# --- HTML that stands alone -------------------------------------------------------------------------

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr", "source"}


class _Checker(HTMLParser):
    """Tags must close in order; every src/href must be a data URI or an anchor in the page."""

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.errors: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1] if self.open else None}>")
        else:
            self.open.pop()


def check_standalone_html(text: str) -> None:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.open, f"never closed: {checker.open}"
    assert '<meta charset="utf-8">' in text
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in checker.links), checker.links
    assert not re.search(r"https?://", text), "an external URL in a self-contained page"


# --- one run ------------------------------------------------------------------------------------------

def _assert_every_section(md: str, html: str, sections=SINGLE_SECTIONS) -> None:
    for anchor, title in sections:
        assert f"\n## {title}\n" in md, title
        assert f'<h2 id="{anchor}">{title}</h2>' in html, title


def test_a_tiny_run_reports_every_section_in_markdown_and_html(evaluated_run, data_dir):
    written = write_report(evaluated_run)
    md, html = _texts(written)
    _assert_every_section(md, html)
    check_standalone_html(html)
    run = evaluated_run
    params = tiny_model_config(vocab_size=4096).num_params()
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    ppl = json.loads(next((run / "eval").glob("ppl-*.json")).read_text(encoding="utf-8"))["results"][0]
    for text in (md, html):
        assert "评测" in text  # the run's name, in the title
        assert "dim = 64" in text and "max_steps = 8" in text  # the resolved config
        assert manifest["fingerprint"] in text and manifest["tokenizer"]["fingerprint"] in text
        assert "babyllama-pretrain-v1" in text  # the data manifest
        assert f"{params:,}" in text  # parameters
        assert "tokens/s" in text and "MFU" in text  # throughput
        assert number(ppl["perplexity"]) in text and number(ppl["bits_per_byte"]) in text  # perplexity
        assert "28.7%" in text and "高中数学" in text and "24.4% – 33.3%" in text  # multiple choice
        assert "12.34" in text and "repeated_4gram_rate" in text  # generation metrics
        assert "by_category.insult" in text and "0.0123" in text  # the unknown kind, generically
        assert "user: 判断这条评论的情感：房间很干净" in text and "才上菜" in text  # sample generations
        assert "benchmark ceval" in text and "at most 16 new tokens" in text
        assert platform.python_version() in text  # environment
        assert "training time" in text and "run started" in text  # wall time
    assert "no evaluations yet" not in md
    # Markdown refers to the PNGs beside it; the HTML carries them
    for name in ("loss", "lr", "throughput"):
        assert (run / "report" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert f"(report/{name}.png)" in md
    assert html.count('src="data:image/png;base64,') == 3
    assert "等了一个小时 \\| 才上菜" in md  # a pipe inside a table cell is escaped
    assert "predictions" not in md  # the per-question records stay in the JSON


def test_a_run_with_no_evaluations_still_reports_every_section(bare_run):
    md, html = _texts(write_report(bare_run))
    _assert_every_section(md, html)
    check_standalone_html(html)
    hint = f"no evaluations yet: run `babyllama eval ppl --ckpt {bare_run} --data ...`"
    assert hint in md
    assert f"no evaluations yet: run <code>babyllama eval ppl --ckpt {bare_run} --data ...</code>" in html
    assert "no sample generations yet" in md and "no sample generations yet" in html
    assert html.count('src="data:image/png;base64,') == 3


def test_the_cli_writes_the_report_and_prints_where(bare_run, capsys):
    from babyllama.cli import main

    assert main(["report", str(bare_run), "--title", "小模型"]) == 0
    out = capsys.readouterr().out
    assert str(bare_run / "report.md") in out and str(bare_run / "report.html") in out
    assert "<title>小模型</title>" in (bare_run / "report.html").read_text(encoding="utf-8")


def test_extra_sections_from_python_callers(bare_run, tmp_path):
    png = shutil.copy(bare_run / "loss.png", tmp_path / "learning_curve.png")
    section = Section("Learning curve", markdown="Accuracy by **training size**:\n\n| size | accuracy |\n|---|---|\n"
                                                 "| 100 | 0.61 |\n| 1000 | 0.74 |", images=[png],
                      table=(["run", "steps"], [["pretrain", 8]]))
    md, html = _texts(write_report(bare_run, extra_sections=[section]))
    assert "\n## Learning curve\n" in md and "| 1000 | 0.74 |" in md
    assert "](../learning_curve.png)" in md  # where the caller's PNG is, relative to report.md
    assert '<h2 id="learning-curve">Learning curve</h2>' in html
    assert "<td>1000</td><td>0.74</td>" in html and "<strong>training size</strong>" in html
    assert "<td>pretrain</td><td>8</td>" in html
    assert html.count('src="data:image/png;base64,') == 4
    check_standalone_html(html)


# --- several runs -------------------------------------------------------------------------------------

def test_two_runs_give_one_comparison_with_curves_overlaid(bare_run, evaluated_run, tmp_path):
    from babyllama.report.collect import collect_run
    from babyllama.report.plots import curve_figures

    out = tmp_path / "compare"
    written = write_report(ReportConfig(runs=[str(bare_run), str(evaluated_run)], out=str(out)))
    md, html = _texts(written)
    _assert_every_section(md, html, COMPARISON_SECTIONS)
    check_standalone_html(html)
    assert Path(written["markdown"]) == out / "report.md"
    for text in (md, html):
        assert "bare" in text and "评测" in text
        assert "final validation loss" in text and "tokens/s (median)" in text
        assert "accuracy 28.7% (chance 25.0%)" in text  # each run's evaluation headlines
        assert "no evaluations yet in bare" in text
    assert (out / "report" / "loss.png").is_file() and html.count('src="data:image/png;base64,') == 3
    runs = [collect_run(bare_run), collect_run(evaluated_run)]
    labels = [line.get_label() for line in curve_figures(runs)["loss"].axes[0].get_lines()]
    assert labels == ["bare train loss", "bare validation loss", "评测 train loss", "评测 validation loss"]


def test_a_comparison_goes_beside_the_first_run_by_default(bare_run, evaluated_run):
    written = write_report([bare_run, evaluated_run])
    assert Path(written["html"]) == bare_run.resolve().parent / "report.html"


def test_settings_that_differ_are_listed(bare_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(bare_run, other)
    config = other / "run_config.toml"
    config.write_text(config.read_text(encoding="utf-8").replace("lr = ", "lr = 0.5 #", 1), encoding="utf-8")
    md, _ = _texts(write_report([bare_run, other], out=tmp_path / "cmp"))
    assert re.search(r"\| train\.lr \| [^|]+ \| 0\.5 \|", md)


# --- evaluations of any kind --------------------------------------------------------------------------

def _entry(result: dict, name: str = "x") -> dict:
    return {"name": name, "file": f"/r/eval/{name}.json", "kind": result.get("kind", "unknown"), "result": result,
            "samples": []}


def test_an_unknown_kind_renders_its_scalars_generically():
    blocks = eval_blocks(_entry({"kind": "newthing", "score": 0.5, "nested": {"deep": {"n": 7}}, "ids": [1, 2],
                                 "long": list(range(100))}), latest_checkpoint=None)
    table = next(b for b in blocks if isinstance(b, Table))
    assert ["score", "0.5"] in table.rows and ["nested.deep.n", "7"] in table.rows
    assert ["ids", "1, 2"] in table.rows and ["long", "a list of 100"] in table.rows
    assert headline(_entry({"kind": "newthing", "score": 0.5})) == "score 0.5"


def test_a_known_kind_missing_its_fields_falls_back_to_the_generic_table():
    entry = _entry({"kind": "mc", "accuracy": 0.3})  # no "overall": written by another version
    blocks = eval_blocks(entry, latest_checkpoint=None)
    assert any(isinstance(b, Table) and ["accuracy", "0.3"] in b.rows for b in blocks)
    assert headline(entry) == "accuracy 0.3"


def test_an_evaluation_of_an_older_checkpoint_is_flagged():
    blocks = eval_blocks(_entry({"kind": "perplexity", "checkpoint": "r/checkpoints/step-00000004", "results": [
        {"length": 64, "stride": 32, "tokens": 9, "loss": 1.0, "perplexity": 2.7, "bits_per_char": 1.0,
         "bits_per_byte": 0.5}]}), latest_checkpoint="step-00000008")
    assert any("not the latest checkpoint, step-00000008" in getattr(b, "text", "") for b in blocks)


def test_an_unreadable_evaluation_file_does_not_stop_the_report(bare_run):
    (bare_run / "eval").mkdir()
    (bare_run / "eval" / "broken.json").write_text("{not json", encoding="utf-8")
    (bare_run / "eval" / "list.json").write_text("[1, 2]", encoding="utf-8")
    md, html = _texts(write_report(bare_run))
    assert "could not read broken.json" in md and "list.json holds a JSON list" in md
    check_standalone_html(html)


# --- bad input ----------------------------------------------------------------------------------------

def test_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=f"{re.escape(str(data_dir))} is not a babyllama run directory"):
        write_report(data_dir)
    with pytest.raises(ConfigError, match="no such run directory"):
        write_report(tmp_path / "missing")


def test_missing_or_damaged_metrics_are_clear_errors(bare_run):
    metrics = bare_run / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines()
    metrics.write_text(lines[0] + "\n{\"step\": 2, \"lo\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{re.escape(str(metrics))}: line 2 is not a metrics record"):
        write_report(bare_run)
    metrics.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no records yet"):
        write_report(bare_run)
    metrics.unlink()
    with pytest.raises(ConfigError, match=f"{re.escape(str(metrics))} is missing"):
        write_report(bare_run)
    assert not (bare_run / "report.md").exists()


def test_a_last_line_cut_short_by_a_kill_is_left_out_with_a_note(bare_run):
    metrics = bare_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text(encoding="utf-8") + '{"step": 10, "lo', encoding="utf-8")
    md, _ = _texts(write_report(bare_run))
    assert "the last line of metrics.jsonl was cut short" in md


def test_the_cli_reports_a_bad_run_in_one_line(tmp_path, capsys):
    from babyllama.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("babyllama: error: ") and str(tmp_path) in err


# --- never replacing what is not the report's ---------------------------------------------------------

def test_a_file_the_report_did_not_write_is_never_replaced(bare_run):
    (bare_run / "report.md").write_text("my notes", encoding="utf-8")
    with pytest.raises(OutputError, match="report.md exists and was not written by babyllama report"):
        write_report(bare_run)
    assert (bare_run / "report.md").read_text(encoding="utf-8") == "my notes"
    assert not (bare_run / "report.html").exists() and not (bare_run / "report").exists()
    (bare_run / "report.md").unlink()
    (bare_run / "report").mkdir()
    (bare_run / "report" / "loss.png").write_bytes(b"\x89PNG mine")
    with pytest.raises(OutputError, match="loss.png exists and was not written"):
        write_report(bare_run)


def test_a_report_replaces_its_own_files_and_leaves_others_alone(bare_run):
    write_report(bare_run)
    (bare_run / "report" / "mine.png").write_bytes(b"\x89PNG mine")
    stale = bare_run / "report" / "old.png"
    shutil.copy(bare_run / "report" / "loss.png", stale)  # a plot an earlier version drew
    write_report(bare_run)
    assert (bare_run / "report" / "mine.png").read_bytes() == b"\x89PNG mine"
    assert not stale.exists()


def test_a_run_with_a_report_is_still_a_run(bare_run):
    write_report(bare_run)
    assert foreign_entries(bare_run, RUN) == []


# --- the Markdown an extra section may use ------------------------------------------------------------

def test_caller_markdown_becomes_escaped_html():
    html = markdown_to_html("a <b>x</b> `c`\n\n- one\n- **two**\n\n```\n<raw>\n```\n\n| h |\n|---|\n| a \\| b |")
    assert "<p>a &lt;b&gt;x&lt;/b&gt; <code>c</code></p>" in html
    assert "<ul><li>one</li><li><strong>two</strong></li></ul>" in html
    assert "<pre><code>&lt;raw&gt;</code></pre>" in html
    assert "<th>h</th>" in html and "<td>a | b</td>" in html


def test_section_headings_have_anchors():
    assert Section("学习曲线 (demo)").blocks()[0] == Heading("学习曲线 (demo)", 2, anchor="学习曲线-demo")


def test_runs_named_in_chinese_are_labelled_run_n_where_no_font_has_the_glyphs(monkeypatch):
    from babyllama.report import plots

    runs = [{"name": "base"}, {"name": "评测"}]
    monkeypatch.setattr(plots, "cjk_font", lambda: None)
    assert plots.legend_names(runs) == ["base", "run 2"]
    monkeypatch.setattr(plots, "cjk_font", lambda: "Noto Sans CJK SC")
    assert plots.legend_names(runs) == ["base", "评测"]


def test_the_long_context_table_renders_with_its_figure(tmp_path):
    from bench.longctx import draw
    from babyllama.report.document import Image

    lengths = [256, 512, 1024]
    result = {"kind": "longctx", "data": ["runs/demo/data"], "stream_tokens": 4096, "trained_length": 256,
              "lengths": lengths, "seq_len": 1024, "finetune_note": "each 3 steps",
              "rows": [{"method": "none", "stage": "no fine-tuning",
                        "perplexity": {"256": 460.0, "512": 538.25, "1024": 629.5}},
                       {"method": "yarn x4", "stage": "fine-tuned at 1024",
                        "perplexity": {"256": 483.3, "512": 484.9, "1024": 486.4}}],
              "s2": [{"shape": "demo", "length": 1024, "attention": "S2-Attn", "group": 256, "step_s": 0.37,
                      "tokens_per_s": 2750.0, "peak_mb": 496.0}]}
    draw(result, tmp_path / "longctx.png")
    result["image"] = "longctx.png"  # beside the JSON
    blocks = eval_blocks(dict(_entry(result), file=str(tmp_path / "longctx.json")), latest_checkpoint=None)
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.headers == ["method", "fine-tuned", "256", "512 *", "1024 *"]
    assert ["yarn x4", "fine-tuned at 1024", "483.3", "484.9", "486.4"] in [[str(c) for c in r] for r in table.rows]
    assert any(isinstance(b, Table) and "S2-Attn" in b.rows[0] for b in blocks)
    image = next(b for b in blocks if isinstance(b, Image))
    assert image.path.read_bytes().startswith(b"\x89PNG")
    assert headline(_entry(result)) == "best @ 1024: yarn x4 (fine-tuned at 1024) ppl 486.4"


def test_a_preference_evaluation_renders_its_accuracies():
    result = {"kind": "pref", "data": ["pairs.jsonl"], "pairs": 282,
              "metrics": {"accuracy": 0.7447, "accuracy_per_token": 0.0993, "mean_margin": 12.5}}
    blocks = eval_blocks(_entry(result), latest_checkpoint=None)
    table = next(b for b in blocks if isinstance(b, Table))
    assert ["accuracy", "74.5%"] in table.rows and ["accuracy per token", "9.9%"] in table.rows
    assert headline(_entry(result)) == "accuracy 74.5% (9.9% per token), 282 pairs"
