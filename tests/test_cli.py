"""The CLI end to end on a tiny run: tokenizer -> shards -> pretrain -> resume -> generate,
and the one-line errors a user sees on bad input."""

import json

import pytest

from babyllama.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("cli")
    inputs = [str(corpus_dir / "news.txt"), str(corpus_dir / "reviews.txt")]
    assert main(["tokenizer", "train", "--input", *inputs, "--vocab-size", "4096", "--out", str(root / "tok")]) == 0
    assert main(["data", "pretrain", "--input", *inputs, "--tokenizer", str(root / "tok"), "--out", str(root / "data"),
                 "--workers", "2", "--val-fraction", "0.05"]) == 0
    args = ["pretrain", "--preset", "tiny", "--data", str(root / "data"), "--out", str(root / "run"),
            "--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.max_seq_len=64",
            "--set", "train.eval_interval=4", "--set", "train.ckpt_interval=4", "--batch-size", "4", "--max-steps", "8"]
    return root, args


def test_pretrain_resume_and_generate(pipeline, capsys):
    root, args = pipeline
    assert main(args[:-2] + ["--max-steps", "4"]) == 0
    assert (root / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert main(args) == 2  # the run exists: refuse to overwrite it silently
    assert "pass --resume" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(root / "data"), "--out", str(root / "run"), "--resume", "--max-steps", "8"]) == 0
    assert (root / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    steps = [json.loads(l)["step"] for l in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8 and (root / "run" / "loss.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(root / "run"), "--prompt", "中国", "--max-new-tokens", "10", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("中国") and len(out.strip()) > 2
    greedy = ["generate", "--ckpt", str(root / "run"), "--prompt", "中国", "--max-new-tokens", "10", "--temperature", "0"]
    assert main(greedy) == 0
    default = capsys.readouterr().out
    assert main(greedy + ["--no-compile"]) == 0 and capsys.readouterr().out == default


def test_user_errors_are_one_line(pipeline, tmp_path, capsys):
    root, _ = pipeline
    assert main(["generate", "--ckpt", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("babyllama: error:") and "missing" in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "一"}\n{"text": "二"\n', encoding="utf-8")
    assert main(["data", "pretrain", "--input", str(bad), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl: line 2: malformed JSON" in capsys.readouterr().err


def test_tokenizer_and_shards_must_match(pipeline, tmp_path, corpus_dir, capsys):
    root, args = pipeline
    assert main(["tokenizer", "train", "--input", str(corpus_dir / "reviews.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "other")]) == 2
    assert "raise --vocab-size or lower --character-coverage" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(corpus_dir / "reviews.txt"), "--vocab-size", "4000",
                 "--out", str(tmp_path / "other")]) == 0
    assert main(["pretrain", "--data", str(root / "data"), "--out", str(tmp_path / "r"),
                 "--tokenizer", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json: shards were made with tokenizer" in err


def test_help_explains_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ("tokenizer", "data", "pretrain", "generate", "demo"):
        assert stage in out


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(pipeline, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root, args = pipeline
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "babyllama.cli"] + args[:-2] + ["--max-steps", "100000"]
    cmd[cmd.index("--out") + 1] = str(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped (interrupted)" in output
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert step > 0
    from babyllama.checkpoint import load_training_state, find_checkpoint

    _, state = load_training_state(find_checkpoint(out))
    assert state["step"] == step


def test_debug_shows_the_traceback(tmp_path):
    from babyllama.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        main(["generate", "--ckpt", str(tmp_path / "missing"), "--prompt", "x", "--debug"])
    with pytest.raises(CheckpointError):
        main(["--debug", "generate", "--ckpt", str(tmp_path / "missing"), "--prompt", "x"])


def test_a_bug_is_one_line_that_says_where(monkeypatch, capsys):
    import babyllama.cli as cli

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_generate", broken)
    assert main(["generate", "--ckpt", "x", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "babyllama: internal error at test_cli.py:" in err and "--debug" in err


def test_a_prompt_longer_than_the_context_is_cut_with_a_one_line_warning(pipeline, capsys):
    root, _ = pipeline
    long_prompt = "中国人民" * 100  # the model's context is 64 tokens
    assert main(["generate", "--ckpt", str(root / "run"), "--prompt", long_prompt, "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("babyllama: warning:")]
    assert len(warnings) == 1 and "earliest" in warnings[0] and "Traceback" not in captured.err
    assert captured.out.startswith(long_prompt) and len(captured.out.strip()) > len(long_prompt)


def test_python_dash_m_babyllama_is_the_cli():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "babyllama", "pretrain", "--max-steps", "0", "--data", "d",
                          "--out", "o"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("babyllama: error: train.max_steps must be >= 1")
