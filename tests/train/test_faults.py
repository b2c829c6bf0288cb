"""Long jobs survive faults: kill -9 anywhere, damaged checkpoints, Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

import babyllama.checkpoint as ckpt_io
from tests.train.test_distributed import SMALL, babyllama

CKPT_INTERVAL = 4
STEPS = ["--max-steps", "40", "--set", f"train.ckpt_interval={CKPT_INTERVAL}"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "babyllama.cli"] + args, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(line.endswith("}") and json.loads(line).get("step", 0) >= step for line in lines):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_io.find_checkpoint(run) / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "4"] + SMALL + STEPS)
    return out


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(uninterrupted, data_dir, tmp_path):
    out = tmp_path / "run"
    # step N is logged before checkpoint N is written: only once step interval+1 is logged is a
    # checkpoint certainly on disk to resume from
    kill_at = random.Random(os.getpid()).randint(CKPT_INTERVAL + 1, 30)
    proc = start(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "4"] + SMALL + STEPS)
    wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert int(ckpt_io.find_checkpoint(out).name.split("-")[1]) < 40  # it really was cut short
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(out), "--resume"])
    ref, got = weights(uninterrupted), weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref), f"killed at step >= {kill_at}: weights differ"
    # steps logged between the checkpoint and the kill are logged again after the resume, and only then:
    # the log reads as the uninterrupted run's, record for record (timings aside)
    def logged(run):
        return [(r["step"], "val_loss" in r) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert logged(out) == logged(uninterrupted)


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    """The process dies halfway through writing step 2 (optimizer file half written)."""
    from babyllama.model import Llama
    from tests.conftest import tiny_model_config

    cfg = tiny_model_config()
    model = Llama(cfg)
    ckpt_io.save_checkpoint(tmp_path, 1, model, cfg, state={"step": 1})
    script = textwrap.dedent(f"""
        import os, signal, torch
        from babyllama.model import Llama
        import babyllama.checkpoint as ckpt_io
        from tests.conftest import tiny_model_config

        def dying_save(obj, path, *a, **k):
            with open(path, "wb") as f:
                f.write(b"half a file")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save
        cfg = tiny_model_config()
        ckpt_io.save_checkpoint({str(tmp_path)!r}, 2, Llama(cfg), cfg, optimizer={{"state": {{}}}}, state={{"step": 2}})
        """)
    res = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert res.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "step-00000002.tmp").exists()  # the half-written one
    found = ckpt_io.find_checkpoint(tmp_path, verify=True)
    assert found.name == "step-00000001"
    loaded, _ = ckpt_io.load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_detected_and_the_newest_good_one_used(uninterrupted, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    newest = ckpt_io.find_checkpoint(run)
    target = newest / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # one flipped bit pattern: still a loadable file, wrong numbers
    target.write_bytes(bytes(data))
    warnings = []
    good = ckpt_io.find_checkpoint(run, verify=True, warn=warnings.append)
    assert good != newest and good.name < newest.name
    assert "damaged" in warnings[0] and newest.name in warnings[0]
    with pytest.raises(ckpt_io.CheckpointError, match="checksum"):
        ckpt_io.load_model(newest)  # named explicitly: an error, not a silent wrong model


def test_ctrl_c_saves_a_checkpoint_and_exits(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "4"] + SMALL
                 + ["--max-steps", "100000", "--set", "train.ckpt_interval=100000"])
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    ckpt = ckpt_io.find_checkpoint(out, verify=True)
    step = int(ckpt.name.split("-")[1])
    assert 2 <= step < 100000 and "stopped (interrupted)" in output
