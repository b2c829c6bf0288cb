"""Continuous batching against the Engine: rows that join a running batch at any step, with their
own sampling settings, seeds and repetition penalties, each get the tokens they get alone."""

import threading
import time

import pytest
import torch

from babyllama.config import ConfigError
from babyllama.infer.batching import Batcher, QueueFull
from babyllama.infer.engine import Engine
from babyllama.infer.sampling import SamplingConfig
from babyllama.model import Llama
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Llama(tiny_model_config(vocab_size=256, max_seq_len=96)).eval()
    with torch.no_grad():  # sharper logits than the initialisation's: greedy ties would be luck
        m.tok_embeddings.weight.mul_(20)
    return m


SETTINGS = [SamplingConfig(temperature=0, repetition_penalty=1.0), SamplingConfig(temperature=0),
            SamplingConfig(temperature=1.0, seed=3), SamplingConfig(temperature=0.7, top_k=5, seed=11),
            SamplingConfig(temperature=1.2, top_p=0.8, repetition_penalty=1.3, seed=5)]


def _prompts(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _run(batcher, prompts, settings, budgets, stops=(), gap=0.0):
    outs = [[] for _ in prompts]
    reasons = [None] * len(prompts)
    done = [threading.Event() for _ in prompts]
    for i, (p, s, b) in enumerate(zip(prompts, settings, budgets)):
        def finish(why, i=i):
            reasons[i] = why
            done[i].set()
        batcher.submit(p, b, s, stops, outs[i].append, finish)
        time.sleep(gap)  # later requests join a batch already decoding
    for d in done:
        assert d.wait(60)
    return outs, reasons


@pytest.mark.parametrize("max_batch,gap", [(3, 0.0), (3, 0.01), (8, 0.005), (1, 0.0)])
def test_rows_joining_at_any_step_get_what_they_get_alone(model, max_batch, gap):
    prompts = _prompts(10)
    settings = [SETTINGS[i % len(SETTINGS)] for i in range(10)]
    budgets = [5 + 3 * i for i in range(10)]
    engine = Engine(model, compile_step=False)
    alone = [engine.generate([p], b, s)[0] for p, s, b in zip(prompts, settings, budgets)]
    batcher = Batcher(model, max_batch=max_batch, max_queue=16)
    try:
        outs, reasons = _run(batcher, prompts, settings, budgets, gap=gap)
    finally:
        batcher.close()
    assert outs == alone
    assert reasons == ["length"] * 10 and batcher.load()["running"] == 0


def test_stop_ids_context_and_cancel(model):
    batcher = Batcher(model, max_batch=4)
    try:
        greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
        prompt = _prompts(1)[0]
        free, _ = _run(batcher, [prompt], [greedy], [20])
        stop = free[0][5]
        cut, reasons = _run(batcher, [prompt], [greedy], [20], stops={stop})
        assert cut[0] == free[0][:free[0].index(stop)] and reasons == ["stop"]
        long = list(range(3, 3 + 90))  # 90 of the 96 positions: room for 6 tokens
        out, reasons = _run(batcher, [long], [greedy], [50])
        assert len(out[0]) == 6 and reasons == ["length"]
        got, finished = [], threading.Event()
        request = batcher.submit(prompt, 80, SamplingConfig(temperature=1.0), (), got.append,
                                 lambda why: finished.set())
        while not got:
            time.sleep(0.001)
        request.cancel()
        assert finished.wait(10) and len(got) < 80 and batcher.load()["running"] == 0
        with pytest.raises(ConfigError, match="context"):
            batcher.submit(list(range(96)), 4, greedy, (), print, print)
    finally:
        batcher.close()


def test_a_full_queue_refuses_and_a_failing_step_ends_only_its_rows(model, monkeypatch):
    batcher = Batcher(model, max_batch=1, max_queue=1)
    gate = threading.Event()
    admit = batcher._admit
    monkeypatch.setattr(batcher, "_admit", lambda r: (gate.wait(10), admit(r)))
    greedy = SamplingConfig(temperature=0)
    reasons = []
    try:
        batcher.submit([5, 6], 3, greedy, (), lambda t: None, reasons.append)
        time.sleep(0.2)  # taken by the worker, held at the gate
        batcher.submit([5, 6], 3, greedy, (), lambda t: None, reasons.append)  # waits
        with pytest.raises(QueueFull):
            batcher.submit([5, 6], 3, greedy, (), lambda t: None, reasons.append)
        step = batcher._step
        calls = []

        def failing_once():
            if not calls:
                calls.append(1)
                raise RuntimeError("boom")
            step()
        monkeypatch.setattr(batcher, "_step", failing_once)
        gate.set()
        deadline = time.time() + 10
        while len(reasons) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert reasons[0].startswith("error: RuntimeError: boom") and reasons[1] == "length"
    finally:
        gate.set()
        batcher.close()
