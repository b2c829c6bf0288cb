"""Run directories: claimed and locked, resumed only on the run's own data, metrics without duplicates."""

from __future__ import annotations

import json

import pytest

from babyllama.outputs import OutputError
from babyllama.checkpoint import CheckpointError
from babyllama.rundir import check_resume_matches, open_run_dir, trim_metrics, write_run_info


def a_run(path, steps=(4,)):
    for step in steps:
        (path / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    (path / "run_config.toml").write_text("[train]\n")
    return path


def test_a_fresh_start_replaces_what_a_failed_start_left(tmp_path):
    out = tmp_path / "run"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.model").write_bytes(b"stale")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(OutputError, match="not a babyllama run directory"):  # no run.json: maybe the user's
        open_run_dir(out, resume=False)
    write_run_info(out, "pretrain", {"path": "d", "fingerprint": "f"}, "t")
    run = open_run_dir(out, resume=False)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    run.close()
    assert list(out.iterdir()) == []


def test_a_run_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    out = a_run(tmp_path / "run")
    with pytest.raises(OutputError, match="checkpoints up to step-00000004.*--resume.*--overwrite"):
        open_run_dir(out, resume=False)
    assert (out / "run_config.toml").is_file()
    open_run_dir(out, resume=True).close()
    open_run_dir(out, resume=False, overwrite=True).close()
    assert list(out.iterdir()) == []


def test_resume_without_a_checkpoint_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        open_run_dir(tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()


def test_a_directory_of_other_files_is_never_a_run(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(OutputError, match=r"not a babyllama run directory \(it holds notes\.md\)"):
            open_run_dir(tmp_path, resume=resume, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]


def test_overwrite_refuses_when_an_input_lives_inside(tmp_path):
    out = a_run(tmp_path / "run")
    with pytest.raises(OutputError, match="contains the input"):
        open_run_dir(out, resume=False, overwrite=True, inputs=[out / "checkpoints" / "step-00000004"])
    assert (out / "checkpoints" / "step-00000004").is_dir()


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    first = open_run_dir(out, resume=False)
    try:
        with pytest.raises(OutputError, match="is being written by pid"):
            open_run_dir(out, resume=False)
    finally:
        first.close()


def test_resume_refuses_other_data_or_another_tokenizer(tmp_path):
    data = {"path": "data/a", "fingerprint": "aaaa"}
    write_run_info(tmp_path, "pretrain", data, "tok1")
    check_resume_matches(tmp_path, "pretrain", dict(data), "tok1", "hint")
    with pytest.raises(OutputError, match=r"data/b is not the data .* \(fingerprint bbbb, the run.s aaaa from data/a\)"):
        check_resume_matches(tmp_path, "pretrain", {"path": "data/b", "fingerprint": "bbbb"}, "tok1", "hint")
    with pytest.raises(OutputError, match="trained with tokenizer tok1, but .* is tok2"):
        check_resume_matches(tmp_path, "pretrain", dict(data), "tok2", "hint")
    with pytest.raises(OutputError, match="is a pretrain run"):
        check_resume_matches(tmp_path, "sft", dict(data), "tok1", "hint")


def test_trim_metrics_drops_steps_after_the_checkpoint_and_cut_lines(tmp_path):
    lines = [{"step": 0, "val_loss": 9}, {"step": 2, "loss": 5}, {"step": 4, "loss": 4}, {"step": 6, "loss": 3}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert trim_metrics(tmp_path, 4) == 2
    kept = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:3]
