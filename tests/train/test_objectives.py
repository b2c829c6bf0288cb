"""The Trainer trains any objective: a made-up one (rows weighted by a weight carried in the batch)
gets accumulation, data parallelism, resume and its own metrics from the one loop.

Run as a module under torchrun (`-m tests.train.test_objectives OUT`) it is the 2-process side of
test_ddp_on_two_processes_equals_one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import babyllama.checkpoint as ckpt_io
from babyllama.config import TrainConfig
from babyllama.model import Llama
from babyllama.train.loop import Trainer
from babyllama.train.objectives import AssistantTokens, NextToken, Objective
from tests.conftest import tiny_model_config
from tests.train.helpers import FixedBatches, torchrun_module

SEQ, VOCAB, STEPS = 16, 256, 4


class WeightedRows(Objective):
    """Batches (tokens, targets, weights): each row's summed token loss times its weight,
    normalised by the sum of the weights. Logs `rows`: rows per unit of weight."""

    name = "weighted_rows"

    def count(self, batch) -> float:
        return float(batch[2].sum())

    def loss(self, model, batch):
        tokens, targets, weights = batch
        rows = model(tokens, targets, reduction="none").sum(dim=1)  # each row's summed token loss
        return (rows * weights).sum(), {"rows": torch.tensor(float(len(tokens)))}


def weighted_batches(n: int, rows: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
        y = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
        y[:, :SEQ // 4] = -100  # some positions without loss
        w = torch.rand(rows, generator=g) * 2 + 0.25
        out.append((x, y, w))
    return out


def share(batches, parts: int, index: int, micro: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Each batch's rows index::parts (one rank's share), cut into `micro` micro-batches."""
    out = []
    for batch in batches:
        rows = tuple(t[index::parts] for t in batch)
        n = len(rows[0]) // micro
        out += [tuple(t[i * n:(i + 1) * n] for t in rows) for i in range(micro)]
    return out


def make_trainer(out, batches, val=None, **train_kw):
    cfg = tiny_model_config(vocab_size=VOCAB, max_seq_len=SEQ)
    torch.manual_seed(0)
    kw = dict(batch_size=4, max_steps=STEPS, lr=3e-3, warmup_steps=1, eval_interval=2, eval_batches=1,
              log_interval=1, ckpt_interval=1000, device="cpu", dtype="float32")
    kw.update(train_kw)
    return Trainer(Llama(cfg), cfg, TrainConfig(**kw), FixedBatches(batches), out, val_batches=val, progress=False,
                   objective=WeightedRows())


def records(run: Path, drop=("tok_s", "time", "mfu")) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_the_stage_objectives_count_targets_and_check_their_batches():
    x, y = torch.zeros(2, 4, dtype=torch.long), torch.tensor([[-100, 1, 2, 3], [-100, -100, 5, 6]])
    assert NextToken().count((x, y)) == AssistantTokens().count((x, y, torch.zeros_like(x))) == 5
    with pytest.raises(ValueError, match="next_token.*tokens, targets"):
        NextToken().count((x, y, torch.zeros_like(x)))


def test_accumulation_equals_one_large_batch(tmp_path):
    big = weighted_batches(STEPS, 8, seed=1)
    a = make_trainer(tmp_path / "a", share(big, 1, 0, micro=2), grad_accum=2, batch_size=4)
    b = make_trainer(tmp_path / "b", big, grad_accum=1, batch_size=8)
    with torch.no_grad():  # the first step's loss: the weighted mean the objective defines
        expected = float(WeightedRows().loss(b.model, big[0])[0] / big[0][2].sum())
    for _ in range(STEPS):
        (loss_a, _), (loss_b, _) = a.train_step(), b.train_step()
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert a.last_metrics["rows"] == pytest.approx(b.last_metrics["rows"], rel=1e-6)
        assert b.step > 1 or loss_b == pytest.approx(expected, rel=1e-5)
    w = big[-1][2]
    assert b.last_metrics["rows"] == pytest.approx(8 / float(w.sum()), rel=1e-6)  # summed, then per count
    assert_close_weights(state(a), state(b), atol=1e-4)


def test_stop_and_resume_equals_the_uninterrupted_run(tmp_path):
    data, val = weighted_batches(STEPS, 4, seed=2), weighted_batches(1, 8, seed=3)
    full = make_trainer(tmp_path / "full", data, val)
    full.fit()
    half = make_trainer(tmp_path / "half", data, val)
    half.fit(stop_at_step=STEPS // 2)
    resumed = make_trainer(tmp_path / "half", data, val)
    assert resumed.resume() and resumed.step == STEPS // 2
    resumed.fit()
    wf, wr = state(full), state(resumed)
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k
    assert records(tmp_path / "full") == records(tmp_path / "half")
    logged = records(tmp_path / "full")
    train = [r for r in logged if "loss" in r]
    evals = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["rows"] == pytest.approx(4 / float(data[r["step"] - 1][2].sum()), rel=1e-5) for r in train)
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["val_rows"] == pytest.approx(8 / float(val[0][2].sum()), rel=1e-5) for r in evals)


def test_ddp_on_two_processes_equals_one(tmp_path):
    """2 ranks x 2 micro-batches x 2 rows against one process with the 8-row batch: same losses,
    metrics (training and validation, each rank evaluating its rows) and weights."""
    global_batches, val = weighted_batches(STEPS, 8, seed=4), weighted_batches(1, 8, seed=5)
    single = make_trainer(tmp_path / "single", global_batches, val, batch_size=8)
    single.fit()
    torchrun_module("tests.train.test_objectives", [str(tmp_path / "ddp")])
    a, b = records(tmp_path / "single"), records(tmp_path / "ddp")
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for key in ra.keys() & {"loss", "rows", "val_loss", "val_rows"}:
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), (key, ra, rb)
    ddp = Llama(single.model_config)
    ckpt_io.load_weights(ddp, ckpt_io.find_checkpoint(tmp_path / "ddp"))
    assert ckpt_io.find_checkpoint(tmp_path / "ddp").name == f"step-{STEPS:08d}"
    assert_close_weights(state(single), ddp.state_dict(), atol=2e-5)


def _ddp_main(out: str) -> None:
    """One rank of test_ddp_on_two_processes_equals_one."""
    import os

    import torch.distributed as dist

    from babyllama.train.distributed import distributed_env

    env = distributed_env("cpu")
    global_batches, val = weighted_batches(STEPS, 8, seed=4), weighted_batches(1, 8, seed=5)
    trainer = make_trainer(out, share(global_batches, env.world_size, env.rank, micro=2), val, batch_size=2,
                           grad_accum=2, parallel="ddp")
    trainer.fit()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown under gloo (see cli._exit_launched_process)


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
