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


def _commands(parser, path=()):
    """(path, parser) of every parser under `parser`, walking the registered subcommands."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, path + (name,))


def _listed(action) -> dict[str, str]:
    import argparse

    assert isinstance(action, argparse._SubParsersAction)
    return {a.dest: a.help for a in action._choices_actions}


def test_help_lists_every_registered_command_and_its_flags(capsys):
    """Checked against the parser itself: a subcommand or flag that disappears, or is registered
    without help, fails here (the usage text of the module docstring cannot)."""
    import argparse

    from babyllama.cli import build_parser

    commands = list(_commands(build_parser()))
    paths = [path for path, _ in commands]
    for stage in [("tokenizer", "train"), ("data", "pretrain"), ("data", "sft"), ("pretrain",), ("sft",),
                  ("generate",), ("chat",), ("demo",)]:
        assert stage in paths
    for path, parser in commands:
        assert main([*path, "--help"]) == 0, path
        out = " ".join(capsys.readouterr().out.split())
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, help_text in _listed(action).items():  # each child listed with its help line
                    assert help_text and f"{name} {' '.join(help_text.split())}" in out, (path, name)
            elif action.option_strings:
                assert max(action.option_strings, key=len) in out, (path, action.option_strings)
                assert action.help, (path, action.option_strings)


def test_the_usage_overview_names_every_stage():
    import babyllama.cli as cli

    leaves = [path for path, parser in _commands(cli.build_parser())
              if path and not any(a.__class__.__name__ == "_SubParsersAction" for a in parser._actions)]
    for path in leaves:
        assert f"babyllama {' '.join(path)} " in cli.__doc__, path


def test_python_dash_m_babyllama_shows_the_help():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "babyllama", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "usage: babyllama" in res.stdout
    for stage in ("tokenizer", "data", "pretrain", "sft", "generate", "chat", "demo"):
        assert f"\n    {stage}" in res.stdout
    res = subprocess.run([sys.executable, "-m", "babyllama.cli", "generate", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--dtype" in res.stdout


@pytest.mark.parametrize("stage", [["sft", "--ckpt", "c", "--data", "d.jsonl", "--out", "o"],
                                   ["data", "sft", "--input", "d.jsonl", "--tokenizer", "t", "--out", "o"]])
def test_format_is_now_layout(stage, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(stage + ["--format", "alpaca"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("babyllama: error: unrecognized arguments: --format alpaca") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _parse(argv):
    from babyllama.cli import build_parser

    return build_parser().parse_args(argv)


def test_cli_defaults_are_the_python_configs_defaults():
    import dataclasses

    from babyllama.data.pretrain import PrepareConfig
    from babyllama.data.sft import PrepareSFTConfig
    from babyllama.demo import DemoConfig
    from babyllama.finetune.sft import SFTJob
    from babyllama.infer.sampling import SamplingConfig
    from babyllama.tokenizer.train import TokenizerTrainConfig

    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    args = _parse(["data", "sft", "--input", "d.jsonl", "--tokenizer", "t", "--out", "o"])
    assert args.max_len == default(PrepareSFTConfig, "max_len")
    assert (args.val_fraction, args.layout, args.on_error, args.encoding) == \
        tuple(default(PrepareSFTConfig, n) for n in ("val_fraction", "layout", "on_error", "encoding"))
    args = _parse(["data", "pretrain", "--input", "d.txt", "--tokenizer", "t", "--out", "o"])
    assert (args.val_fraction, args.on_error) == (default(PrepareConfig, "val_fraction"), default(PrepareConfig, "on_error"))
    args = _parse(["tokenizer", "train", "--input", "d.txt", "--out", "o"])
    for name in ("vocab_size", "max_sentences", "character_coverage", "layout"):
        assert getattr(args, name) == default(TokenizerTrainConfig, name)
    args = _parse(["sft", "--ckpt", "c", "--data", "d.jsonl", "--out", "o"])
    for name in ("val_fraction", "layout", "on_error", "encoding"):
        assert getattr(args, name) == default(SFTJob, name)
    for stage in (["generate", "--ckpt", "c", "--prompt", "p"], ["chat", "--ckpt", "c"]):
        args = _parse(stage)
        for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
            assert getattr(args, name) == default(SamplingConfig, name)
        assert (args.device, args.dtype) == ("auto", "auto")
    args = _parse(["demo"])
    for name in ("out", "minutes", "sft_minutes", "vocab_size", "workers", "curve"):
        assert getattr(args, name) == default(DemoConfig, name)


def test_sft_refuses_model_settings_before_loading_anything(tmp_path):
    """The model comes from --ckpt: `--set model.*` is refused at once (no checkpoint, no data, not
    even torch is loaded), naming --ckpt and --dropout."""
    import subprocess
    import sys

    code = ("import sys; from babyllama.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "sft", "--ckpt", str(tmp_path / "missing"), "--data",
                          str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), "--set", "model.dim=64"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout.strip() == "False", res
    assert res.stderr.startswith("babyllama: error: --set model.dim=64") and res.stderr.count("\n") == 1
    assert "--ckpt" in res.stderr and "--dropout" in res.stderr
    assert not (tmp_path / "o").exists()


def test_sft_config_with_a_model_table_warns_that_it_is_ignored(tmp_path, capsys):
    cfg = tmp_path / "sft.toml"
    cfg.write_text("[model]\ndim = 64\n[train]\nlr = 1e-3\n", encoding="utf-8")
    assert main(["sft", "--ckpt", str(tmp_path / "missing"), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2  # then the missing checkpoint
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("babyllama: warning:") and "[model]" in err[0] and "--ckpt" in err[0]
    assert err[1].startswith("babyllama: error:") and "missing" in err[1] and len(err) == 2


class _Stop(Exception):
    pass


def test_sft_resume_takes_the_runs_own_settings(tmp_path, monkeypatch, capsys):
    """Like pretrain: --resume without --config/--preset starts from OUT/run_config.toml's [train],
    with only the flags given now on top (and its [model] table, the model's own, ignored silently)."""
    import babyllama.finetune.sft as sft_stage

    jobs = []

    def fake_sft(job):
        jobs.append(job)
        raise _Stop

    monkeypatch.setattr(sft_stage, "sft", fake_sft)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.toml").write_text("[model]\ndim = 64\n[train]\nlr = 0.002\nmax_steps = 40\n"
                                         "warmup_steps = 3\n", encoding="utf-8")
    argv = ["sft", "--ckpt", "c", "--data", "d.jsonl", "--out", str(out), "--debug"]
    with pytest.raises(_Stop):
        main(argv + ["--resume", "--max-steps", "60"])
    train = jobs[-1].train
    assert (train.lr, train.max_steps, train.warmup_steps) == (0.002, 60, 3) and jobs[-1].resume
    with pytest.raises(_Stop):
        main(argv + ["--max-steps", "60"])  # a new run: the SFT defaults
    assert jobs[-1].train.lr != 0.002 and jobs[-1].train.warmup_steps != 3
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("stage", [["generate", "--prompt", "x"], ["chat"]])
def test_inference_flags_reach_the_loader(stage, tmp_path, monkeypatch):
    from babyllama.infer import Engine

    calls = []

    def fake_load(path, device="auto", **kw):
        calls.append((str(path), device, kw))
        raise _Stop

    monkeypatch.setattr(Engine, "load", fake_load)
    with pytest.raises(_Stop):
        main(stage + ["--ckpt", str(tmp_path), "--device", "cpu", "--dtype", "bfloat16", "--threads", "1",
                      "--no-compile", "--allow-unverified", "--rope-scaling", "yarn", "--rope-factor", "4", "--debug"])
    from babyllama.config import RopeScaling

    assert calls == [(str(tmp_path), "cpu", {"compile_step": False, "allow_unverified": True, "dtype": "bfloat16",
                                             "rope": RopeScaling("yarn", 4.0)})]


@pytest.mark.parametrize("stage", [["generate", "--prompt", "x"], ["chat"]])
def test_an_unknown_dtype_is_refused_before_loading(stage, tmp_path, capsys):
    assert main(stage + ["--ckpt", str(tmp_path / "missing"), "--dtype", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("babyllama: error: --dtype") and "nonsense" in err and "missing" not in err
    assert err.count("\n") == 1


def test_generate_refuses_a_system_prompt_without_chat(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "missing"), "--prompt", "x", "--system", "s"]) == 2
    err = capsys.readouterr().err
    assert "--system needs --chat" in err and "missing" not in err


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
    import babyllama.cli.infer as infer

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(infer, "cmd_generate", broken)
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


def test_the_reply_length_default_is_one_number_everywhere():
    import inspect

    from babyllama.cli.flags import MAX_NEW_TOKENS
    from babyllama.infer import sampling
    from babyllama.infer.chat import repl
    from babyllama.infer.engine import Engine

    assert MAX_NEW_TOKENS == sampling.MAX_NEW_TOKENS
    for fn in (Engine.complete, Engine.reply, Engine.generate, repl):
        assert inspect.signature(fn).parameters["max_new_tokens"].default == MAX_NEW_TOKENS, fn
