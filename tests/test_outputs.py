"""Output directories: claimed before writing, swapped in whole, locked while written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from babyllama.outputs import (PRETRAIN_DATA, RUN, TOKENIZER, OutputError, OutputLock, claim_output, holds,
                               remove_owned, swap_in)


def fake_dataset(path, extra=()):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "babyllama-pretrain-v1"}))
    (path / "train-00000.bin").write_bytes(b"\0\0")
    for name in extra:
        (path / name).write_text("mine")
    return path


def test_a_missing_or_empty_directory_is_free(tmp_path):
    assert claim_output(tmp_path / "new", PRETRAIN_DATA) is False
    (tmp_path / "empty").mkdir()
    assert claim_output(tmp_path / "empty", PRETRAIN_DATA) is False


def test_an_output_of_the_same_kind_needs_overwrite(tmp_path):
    out = fake_dataset(tmp_path / "data")
    with pytest.raises(OutputError, match="already holds a pretraining dataset; pass --overwrite"):
        claim_output(out, PRETRAIN_DATA)
    assert claim_output(out, PRETRAIN_DATA, overwrite=True) is True


@pytest.mark.parametrize("overwrite", [False, True])
def test_anything_else_is_refused_even_with_overwrite(tmp_path, overwrite):
    mixed = fake_dataset(tmp_path / "mixed", extra=["notes.txt"])  # a dataset the user added a file to
    with pytest.raises(OutputError, match=r"notes\.txt"):
        claim_output(mixed, PRETRAIN_DATA, overwrite=overwrite)
    project = tmp_path / "project"
    project.mkdir()
    (project / "corpus.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty and holds files babyllama did not write"):
        claim_output(project, PRETRAIN_DATA, overwrite=overwrite)
    with pytest.raises(OutputError, match="a babyllama pretraining dataset, not a tokenizer"):
        claim_output(fake_dataset(tmp_path / "data"), TOKENIZER, overwrite=overwrite)
    downloaded = tmp_path / "chatglm2"  # a tokenizer babyllama did not train is never replaced
    downloaded.mkdir()
    (downloaded / "tokenizer.model").write_bytes(b"sp")
    (downloaded / "tokenizer_config.json").write_text('{"name_or_path": "THUDM/chatglm2-6b"}')
    with pytest.raises(OutputError, match="not a tokenizer"):
        claim_output(downloaded, TOKENIZER, overwrite=overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        claim_output(tmp_path / "file", PRETRAIN_DATA, overwrite=overwrite)


def test_an_output_holding_an_input_is_refused(tmp_path):
    out = fake_dataset(tmp_path / "data")
    with pytest.raises(OutputError, match="contains the input"):
        claim_output(out, PRETRAIN_DATA, inputs=[str(out / "train-00000.bin") + "::lines"], overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        claim_output(tmp_path, PRETRAIN_DATA, inputs=[tmp_path / "data" / "x.txt"], overwrite=True)


def test_swap_in_replaces_whole_and_leaves_nothing_aside(tmp_path):
    out = fake_dataset(tmp_path / "data")
    work = fake_dataset(tmp_path / "data.partial")
    (work / "val-00000.bin").write_bytes(b"new")
    swap_in(work, out)
    assert (out / "val-00000.bin").read_bytes() == b"new" and not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_remove_owned_deletes_only_what_babyllama_writes(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "keep.txt").write_text("user")
    remove_owned(run, RUN)
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]
    assert not holds(run, RUN)


HOLDER = textwrap.dedent("""
    import sys, time
    from babyllama.outputs import OutputLock
    lock = OutputLock(sys.argv[1], "test output").acquire()
    print("locked", flush=True)
    time.sleep(120)
    """)


def hold_lock(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_told_who_holds_the_lock(tmp_path):
    path = tmp_path / "out.lock"
    proc = hold_lock(path)
    try:
        with pytest.raises(OutputError, match=rf"being written by pid {proc.pid} on {socket.gethostname()}"):
            OutputLock(path, "test output").acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_stale_and_taken_over(tmp_path):
    path = tmp_path / "out.lock"
    proc = hold_lock(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(path.read_text())["pid"] == proc.pid  # the file is still there
    lock = OutputLock(path, "test output").acquire()
    assert lock.stale["pid"] == proc.pid
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_without_flock_a_dead_pid_on_this_host_is_stale_and_another_host_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(OutputLock, "_flock", lambda self, fcntl, fd: False)
    path = tmp_path / "out.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = OutputLock(path, "test output").acquire()
    assert lock.stale["pid"] == dead.pid
    with pytest.raises(OutputError, match=f"locked by pid {os.getpid()}"):
        OutputLock(path, "test output").acquire()  # alive: ourselves
    lock.release()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": time.ctime()}))
    with pytest.raises(OutputError, match=f"on elsewhere .* delete {path}"):
        OutputLock(path, "test output").acquire()
