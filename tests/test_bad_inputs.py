"""The catalogue of mistakes: every stage, given what a hurried user gives it.

Each case runs the CLI in-process and must end with exit code 2, exactly one `babyllama: error:`
line that names the file or flag at fault, no traceback, and every file that existed before
byte-identical after (inputs, the tokenizer, shards, runs, the user's own files).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from babyllama.cli import main

TINY = ("--preset tiny --set model.dim=64 --set model.n_layers=2 --set model.max_seq_len=64 --batch-size 4 "
        "--set train.eval_interval=2 --set train.ckpt_interval=2 --set train.eval_batches=2")


def run_cli(line: str, ws: Path) -> int:
    return main(shlex.split(line.format(ws=ws, tiny=TINY)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, corpus_dir, tokenizer_dir, data_dir):
    """A user's workspace: a corpus, a tokenizer, shards, a short run, and damaged copies of them."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copy(corpus_dir / "news.txt", root / "news.txt")
    shutil.copytree(tokenizer_dir, root / "tok")
    shutil.copytree(data_dir, root / "data")
    text = (corpus_dir / "news.txt").read_text(encoding="utf-8").splitlines()[:200]
    (root / "gb.txt").write_bytes("\n".join(text).encode("gb18030") + b"\n")
    records = [json.dumps({"messages": [{"role": "user", "content": t[:30]}, {"role": "assistant", "content": t[30:60]}]},
                          ensure_ascii=False) for t in text[:50]]
    (root / "gb_sft.jsonl").write_bytes("\n".join(records).encode("gb18030") + b"\n")
    (root / "small.txt").write_text("\n".join(text[:50]) + "\n", encoding="utf-8")
    (root / "reviews.csv").write_text("label,review,comment\n" + "".join(f"1,\"{t[:40]}\",好\n" for t in text[:50]),
                                      encoding="utf-8")
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in text[:20]]
    lines[7] = lines[7][:12] + b"\xff" + lines[7][12:]
    (root / "bad_byte.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    bad_turns = [{"messages": [{"role": "assistant", "content": "你好"}, {"role": "user", "content": "嗯"}]},
                 {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "  "}]}]
    good = [{"messages": [{"role": "user", "content": t[:30]}, {"role": "assistant", "content": t[30:60]}]}
            for t in text[:50]]
    (root / "good_sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good),
                                         encoding="utf-8")
    (root / "bad_sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bad_turns * 5),
                                        encoding="utf-8")
    (root / "project").mkdir()
    (root / "project" / "notes.md").write_text("my notes", encoding="utf-8")
    shutil.copy(root / "news.txt", root / "project" / "corpus.txt")
    for sub in ("data", "tokenizer"):  # names babyllama writes, but not babyllama's: never deleted
        (root / "lookalike" / sub).mkdir(parents=True)
        (root / "lookalike" / sub / "mine.txt").write_text("my file", encoding="utf-8")
    assert run_cli("pretrain --data {ws}/data --out {ws}/run {tiny} --max-steps 4", root) == 0
    assert run_cli("tokenizer train --input {ws}/news.txt --vocab-size 4096 --out {ws}/tok2", root) == 0
    assert run_cli("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok2 --out {ws}/data2 --workers 1 "
                   "--val-fraction 0.05", root) == 0
    assert run_cli("pretrain --data {ws}/data2 --out {ws}/tok2run {tiny} --max-steps 2", root) == 0
    assert run_cli("sft --ckpt {ws}/run --data {ws}/good_sft.jsonl --out {ws}/sftrun --max-steps 2 --batch-size 4 "
                   "--set train.eval_batches=1", root) == 0
    (root / "other_sft.jsonl").write_text((root / "good_sft.jsonl").read_text(encoding="utf-8").replace("。", "！"),
                                          encoding="utf-8")
    for name in ("damaged", "unverified"):
        shutil.copytree(root / "run", root / name)
        for ckpt in (root / name / "checkpoints").glob("step-*"):
            if name == "damaged":
                weights = ckpt / "model.safetensors"
                weights.write_bytes(weights.read_bytes()[:1000])
            else:
                (ckpt / "checksums.json").unlink()
    shutil.copytree(root / "data", root / "badids")
    shard = root / "badids" / "train-00000.bin"
    shard.write_bytes(b"\xff\xff" * 10 + shard.read_bytes()[20:])
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "checksums.json.tmp"}


def assert_refused(rc: int, err: str, expect: list[str], before: dict, after: dict) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("babyllama: error:")]
    assert rc == 2, err
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    for needle in expect:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or deleted: {changed}"


# (stage and arguments, what the one error line must name)
CATALOGUE = [
    # tokenizer train
    ("tokenizer train --input {ws}/small.txt --vocab-size 200000 --out {ws}/t", ["--vocab-size"]),
    ("tokenizer train --input {ws}/news.txt --vocab-size 2000000 --out {ws}/t", ["--vocab-size"]),
    ("tokenizer train --input {ws}/news.txt --vocab-size 10 --out {ws}/t", ["--vocab-size"]),
    ("tokenizer train --input {ws}/gb.txt --out {ws}/t", ["gb.txt", "GB18030", "--encoding"]),
    ("tokenizer train --input {ws}/missing.txt --out {ws}/t", ["missing.txt"]),
    ("tokenizer train --input {ws}/news.txt --vocab-size 4096 --out {ws}/tok", ["--out", "--overwrite"]),
    ("tokenizer train --input {ws}/news.txt --out {ws}/project", ["--out", "notes.md"]),
    ("tokenizer train --input {ws}/project/corpus.txt --out {ws}/project --overwrite", ["contains the input"]),
    ("tokenizer train --input {ws}/news.txt --character-coverage 1.5 --out {ws}/t", ["--character-coverage"]),
    # data pretrain
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/data", ["--out", "--overwrite"]),
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/project", ["--out", "notes.md"]),
    ("data pretrain --input {ws}/project/corpus.txt --tokenizer {ws}/tok --out {ws}/project --overwrite",
     ["contains the input"]),
    ("data pretrain --input {ws}/data/train-00000.bin --tokenizer {ws}/tok --out {ws}/data --overwrite",
     ["contains the input"]),
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/run", ["--out", "training run"]),
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/d --val-fraction -1", ["--val-fraction"]),
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/d --val-fraction 1", ["--val-fraction"]),
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/d --workers 0", ["--workers"]),
    ("data pretrain --input {ws}/gb.txt --tokenizer {ws}/tok --out {ws}/d", ["gb.txt", "GB18030", "--encoding"]),
    ("data pretrain --input {ws}/gb.txt --tokenizer {ws}/tok --out {ws}/d --on-error skip", ["gb.txt", "GB18030"]),
    ("data pretrain --input {ws}/reviews.csv --tokenizer {ws}/tok --out {ws}/d", ["reviews.csv", "csv:"]),
    ("data pretrain --input {ws}/reviews.csv::csv:text --tokenizer {ws}/tok --out {ws}/d", ["reviews.csv", "text"]),
    ("data pretrain --input {ws}/bad_byte.jsonl --tokenizer {ws}/tok --out {ws}/d", ["bad_byte.jsonl", "line 8"]),
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/d --encoding nonsense", ["nonsense"]),
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/missing --out {ws}/d", ["missing"]),
    ("data pretrain --input {ws}/news.txt::nolayout --tokenizer {ws}/tok --out {ws}/d", ["nolayout"]),
    # data sft
    ("data sft --input {ws}/gb_sft.jsonl --tokenizer {ws}/tok --out {ws}/s", ["gb_sft.jsonl", "GB18030"]),
    ("data sft --input {ws}/bad_sft.jsonl --tokenizer {ws}/tok --out {ws}/s", ["bad_sft.jsonl"]),
    ("data sft --input {ws}/bad_sft.jsonl --tokenizer {ws}/tok --out {ws}/project", ["--out", "notes.md"]),
    ("data sft --input {ws}/good_sft.jsonl --tokenizer {ws}/tok --out {ws}/s --max-len 1", ["--max-len"]),
    ("data sft --input {ws}/good_sft.jsonl --tokenizer {ws}/tok --out {ws}/s --val-fraction 2", ["--val-fraction"]),
    # pretrain: flags and config fields
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --max-steps 0", ["train.max_steps", "--max-steps"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --max-steps -5", ["train.max_steps"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --lr -0.01", ["train.lr", "--lr"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --lr nan", ["train.lr"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --batch-size 0", ["train.batch_size"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --grad-accum 0", ["train.grad_accum"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --dtype float8", ["train.dtype", "float8"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --device cuda", ["cuda"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --device gpu", ["train.device"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --set model.vocab_size=100", ["model.vocab_size"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --set model.dropout=1.5", ["model.dropout"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --set train.nope=1", ["nope"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --set model.dim=abc", ["model.dim"]),
    ("pretrain --data {ws}/data --out {ws}/r --config {ws}/missing.toml", ["missing.toml"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --batch-size x", ["--batch-size"]),
    # pretrain: run directories and resume
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --set model.dim=32 --init {ws}/run", ["model.dim"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --init {ws}/damaged", ["damaged", "checksum"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --init {ws}/unverified", ["--allow-unverified"]),
    ("pretrain --data {ws}/data --out {ws}/project {tiny}", ["--out", "notes.md"]),
    ("pretrain --data {ws}/data --out {ws}/run {tiny}", ["--resume", "--overwrite"]),
    ("pretrain --data {ws}/data --out {ws}/run --resume --overwrite", ["--resume", "--overwrite"]),
    ("pretrain --data {ws}/data --out {ws}/r --resume", ["nothing to resume"]),
    ("pretrain --data {ws}/data --out {ws}/damaged --resume", ["no usable checkpoint", "step-00000004",
                                                               "step-00000002"]),
    ("pretrain --data {ws}/data --out {ws}/unverified --resume", ["--allow-unverified"]),
    ("pretrain --data {ws}/data2 --out {ws}/run --resume", ["tokenizer"]),
    ("pretrain --data {ws}/data --out {ws}/run --resume --set model.dim=32", ["model.dim"]),
    ("pretrain --data {ws}/data --out {ws}/run --resume --max-steps 2", ["step 4", "--max-steps"]),
    ("pretrain --data {ws}/data --out {ws}/run --overwrite --init {ws}/run", ["contains the input"]),
    ("pretrain --data {ws}/missing --out {ws}/r {tiny}", ["missing", "data pretrain"]),
    ("pretrain --data {ws}/badids --out {ws}/r {tiny}", ["train-00000.bin", "token 0 is id 65535"]),
    ("pretrain --data {ws}/data --out {ws}/r {tiny} --tokenizer {ws}/tok2", ["tokenizer"]),
    # generate and chat
    ("generate --ckpt {ws}/run --prompt 中国 --max-new-tokens -5", ["--max-new-tokens"]),
    ("generate --ckpt {ws}/run --prompt 中国 --top-p 0", ["--top-p"]),
    ("generate --ckpt {ws}/run --prompt 中国 --top-p 1.5", ["--top-p"]),
    ("generate --ckpt {ws}/run --prompt 中国 --top-k -3", ["--top-k"]),
    ("generate --ckpt {ws}/run --prompt 中国 --temperature -1", ["--temperature"]),
    ("generate --ckpt {ws}/run --prompt 中国 --temperature nan", ["--temperature"]),
    ("generate --ckpt {ws}/run --prompt 中国 --repetition-penalty 0", ["--repetition-penalty"]),
    ("generate --ckpt {ws}/run --prompt 中国 --num-samples 0", ["--num-samples"]),
    ("generate --ckpt {ws}/run --prompt 中国 --device cuda", ["cuda"]),
    ("generate --ckpt {ws}/missing --prompt 中国", ["missing"]),
    ("generate --ckpt {ws}/damaged --prompt 中国", ["no usable checkpoint"]),
    ("generate --ckpt {ws}/unverified --prompt 中国", ["--allow-unverified"]),
    ("generate --ckpt {ws}/run --prompt 中国 --encoding nonsense", ["nonsense"]),
    ("chat --ckpt {ws}/run --top-p 1.5", ["--top-p"]),
    ("chat --ckpt {ws}/damaged", ["no usable checkpoint"]),
    # sft
    ("sft --ckpt {ws}/run --data {ws}/gb_sft.jsonl --out {ws}/s", ["gb_sft.jsonl", "GB18030"]),
    ("sft --ckpt {ws}/run --data {ws}/bad_sft.jsonl --out {ws}/s", ["bad_sft.jsonl"]),
    ("sft --ckpt {ws}/damaged --data {ws}/bad_sft.jsonl --out {ws}/s", ["no usable checkpoint"]),
    ("sft --ckpt {ws}/run --data {ws}/bad_sft.jsonl --out {ws}/s --resume", ["nothing to resume"]),
    ("sft --ckpt {ws}/run --data {ws}/bad_sft.jsonl --out {ws}/run", ["--resume"]),
    ("sft --ckpt {ws}/run --data {ws}/bad_sft.jsonl --out {ws}/project", ["--out", "notes.md"]),
    ("sft --ckpt {ws}/run --data {ws}/bad_sft.jsonl --out {ws}/s --lr 0", ["train.lr"]),
    ("sft --ckpt {ws}/run --data {ws}/good_sft.jsonl --out {ws}/sftrun --max-steps 4 --batch-size 4", ["--resume"]),
    ("sft --ckpt {ws}/run --data {ws}/other_sft.jsonl --out {ws}/sftrun --resume --max-steps 4 --batch-size 4",
     ["other_sft.jsonl is not the data", "--ckpt"]),
    ("sft --ckpt {ws}/tok2run --data {ws}/good_sft.jsonl --out {ws}/sftrun --resume --max-steps 4 --batch-size 4",
     ["tokenizer"]),
    ("sft --ckpt {ws}/run --data {ws}/bad_sft.jsonl --out {ws}/s --dropout 2", ["--dropout"]),
    # demo
    ("demo --out {ws}/project", ["--out", "notes.md"]),
    ("demo --out {ws}/project --fresh", ["--out", "notes.md"]),
    ("demo --out {ws}/lookalike --fresh", ["--out", "not a demo directory"]),
    ("pretrain --data {ws}/data --out {ws}/lookalike {tiny} --overwrite", ["--out", "not a babyllama run"]),
    ("demo --out {ws}/d --minutes -1", ["--minutes"]),
]


@pytest.mark.parametrize("line,expect", CATALOGUE, ids=[c[0].split(" --")[0] + f" #{i}" for i, c in enumerate(CATALOGUE)])
def test_catalogue(ws, capsys, line, expect):
    before = snapshot(ws)
    rc = run_cli(line, ws)
    assert_refused(rc, capsys.readouterr().err, expect, before, snapshot(ws))


@pytest.mark.parametrize("stage", ["tokenizer train --input {ws}/news.txt --out .",
                                   "data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out .",
                                   "pretrain --data {ws}/data --out . {tiny}", "demo --out . --fresh"])
def test_out_dot_in_a_project_is_refused(ws, capsys, monkeypatch, stage):
    monkeypatch.chdir(ws / "project")
    before = snapshot(ws)
    rc = run_cli(stage, ws)
    assert_refused(rc, capsys.readouterr().err, ["--out .", "notes.md"], before, snapshot(ws))


def test_gbk_bytes_in_the_prompt_are_named(ws, capsys):
    gbk_prompt = "中国".encode("gbk").decode("utf-8", "surrogateescape")  # what Python makes of GBK argv
    before = snapshot(ws)
    rc = main(["generate", "--ckpt", str(ws / "run"), "--prompt", gbk_prompt])
    assert_refused(rc, capsys.readouterr().err, ["--encoding"], before, snapshot(ws))
    rc = main(["generate", "--ckpt", str(ws / "run"), "--prompt", gbk_prompt, "--encoding", "gbk",
               "--max-new-tokens", "3", "--temperature", "0"])
    assert rc == 0 and capsys.readouterr().out.startswith("中国")


HOLD = """
import sys, time
from babyllama.outputs import OutputLock
lock = OutputLock(sys.argv[1], "test").acquire()
print("locked", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("line,lock", [
    ("data pretrain --input {ws}/news.txt --tokenizer {ws}/tok --out {ws}/d", "d.lock"),
    ("data sft --input {ws}/good_sft.jsonl --tokenizer {ws}/tok --out {ws}/s", "s.lock"),
    ("tokenizer train --input {ws}/news.txt --vocab-size 4096 --out {ws}/t", "t.lock"),
])
def test_a_second_writer_of_a_dataset_is_refused(ws, capsys, line, lock):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ws / lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(ws)
        rc = run_cli(line, ws)
        assert_refused(rc, capsys.readouterr().err, ["being written by pid", str(holder.pid)], before,
                       snapshot(ws))
    finally:
        holder.kill()
        holder.wait()
        (ws / lock).unlink(missing_ok=True)


def test_two_pretrain_runs_into_one_out(ws, capsys, tmp_path):
    """A real run holds the directory; a second one is refused and changes nothing of the first."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "babyllama.cli"] + shlex.split(
        f"pretrain --data {ws}/data --out {out} {TINY} --max-steps 100000 --set train.ckpt_interval=100000")
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"  # a line in it: the loop (and its Ctrl-C handler) is running
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.1)
        for line in (f"pretrain --data {ws}/data --out {out} {TINY}",
                     f"pretrain --data {ws}/data --out {out} {TINY} --overwrite",
                     f"sft --ckpt {ws}/run --data {ws}/bad_sft.jsonl --out {out}"):
            rc = main(shlex.split(line))
            err = capsys.readouterr().err
            assert rc == 2 and "being written by pid" in err and str(first.pid) in err, err
        assert (out / "run.json").is_file() and (out / "tokenizer").is_dir()
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 0
