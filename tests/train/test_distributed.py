"""Data parallelism on CPU (gloo, 2 processes under torchrun): the same computation as one process.

Tolerance: the 2-process runs sum gradients in a different order (an all-reduce of two halves
instead of one pass), so float32 results differ in the last bits; over 6 Adam steps that stays
below 1e-4 in the loss and 2e-5 in any weight. A real bug (unsynchronised gradients, a rank
reading the other's data, a mis-scaled loss) moves the loss by > 1e-3 from the first step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# float32 everywhere: these tests compare world sizes to float32 tolerances, and bf16 rounding (what
# `--dtype auto` picks on CPUs with bf16 units) depends on each rank's batch shape.
SMALL = ["--preset", "tiny", "--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
         "--set", "model.max_seq_len=32", "--max-steps", "6", "--set", "train.warmup_steps=2",
         "--set", "train.eval_interval=3", "--set", "train.eval_batches=2", "--set", "train.log_interval=1",
         "--device", "cpu", "--dtype", "float32"]


TRANSIENT_LAUNCH_ERRORS = ("EADDRINUSE", "address already in use", "RendezvousConnectionError",
                           "DistNetworkError", "Connection reset by peer")


def babyllama(args: list[str], nproc: int = 1, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    # a rank that dies of a signal prints its Python stack (the one CI failure here was an abort at exit)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if nproc == 1:
        launcher = [sys.executable]
    elif launcher == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:  # accelerate's multi-process launcher (it sets the same variables as torchrun)
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
                    "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"]
    for attempt in range(2):
        res = subprocess.run(launcher + ["-m", "babyllama.cli"] + args, env=env, capture_output=True, text=True,
                             timeout=900)  # a hang guard: a fresh DeepSpeed op build on busy cores takes minutes
        # a launcher that lost a race for its rendezvous port is retried once; anything else fails
        transient = any(m in res.stderr for m in TRANSIENT_LAUNCH_ERRORS)
        if res.returncode == 0 or not transient or "--resume" in args:
            break
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]


def final_weights(run, step: int = 6) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def assert_same_run(a, b, atol=2e-5):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 6
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """The reference: one process, global batch 8."""
    out = tmp_path_factory.mktemp("single") / "run"
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "8"] + SMALL)
    return out


@pytest.mark.parametrize("parallel,batch,accum", [("ddp", 4, 1), ("ddp", 2, 2), ("fsdp", 2, 2)])
def test_two_processes_match_one(single, data_dir, tmp_path, parallel, batch, accum):
    """Same global batch (2 ranks x batch x accum = 8): same losses and weights as one process;
    with accumulation DDP skips the all-reduce until the last micro-batch (no_sync)."""
    out = tmp_path / "run"
    res = babyllama(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", str(batch),
                     "--grad-accum", str(accum), "--parallel", parallel] + SMALL, nproc=2)
    assert_same_run(single, out)
    # ranks skip the interpreter's teardown (cli._exit_launched_process): what rank 0 printed last still arrives
    assert f"stopped (max_steps) at step 6; checkpoint {out}" in res.stdout, res.stdout[-500:]


def test_a_checkpoint_resumes_on_another_world_size(single, data_dir, tmp_path):
    """Saved by 2 ranks (FSDP, sharded) at step 3, finished by 1 process; and the reverse."""
    two_then_one = tmp_path / "a"
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(two_then_one), "--batch-size", "4",
               "--parallel", "fsdp", "--stop-at-step", "3"] + SMALL, nproc=2)
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(two_then_one), "--resume", "--batch-size", "8"]
              + SMALL)
    assert_same_run(single, two_then_one)

    one_then_two = tmp_path / "b"
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(one_then_two), "--batch-size", "8",
               "--stop-at-step", "3"] + SMALL)
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(one_then_two), "--resume", "--batch-size", "4",
               "--parallel", "ddp"] + SMALL, nproc=2)
    assert_same_run(single, one_then_two)


def test_accelerate_launch_runs_the_same_engine(single, data_dir, tmp_path):
    out = tmp_path / "run"
    babyllama(["pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "4"] + SMALL, nproc=2,
              launcher="accelerate")
    assert_same_run(single, out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_on_two_processes_matches_one(single, data_dir, tmp_path, parallel):
    """A LoRA run (continued pretraining from `single`) composes with DDP and FSDP: frozen base, the
    same adapter as one process, saved alone (dropout 0: the ranks' dropout streams differ)."""
    lora = ["pretrain", "--data", str(data_dir), "--init", str(single), "--lora", "--lora-dropout", "0",
            "--lora-train", "norms"] + SMALL

    def adapter(run):
        return load_file(str(run / "checkpoints" / "step-00000006" / "adapter_model.safetensors"))

    one = tmp_path / "one"
    babyllama(lora + ["--out", str(one), "--batch-size", "8"])
    two = tmp_path / "two"
    babyllama(lora + ["--out", str(two), "--batch-size", "4", "--parallel", parallel], nproc=2)
    la, lb = losses(one), losses(two)
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a) and any("norm" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)
