import math

import pytest
import torch

from babyllama.config import TrainConfig
from babyllama.data.loader import PretrainBatches
from babyllama.model import Llama
import babyllama.checkpoint as ckpt_io
from babyllama.train.loop import Trainer, TrainingDiverged
from babyllama.train.optim import lr_at
from tests.conftest import tiny_model_config
from tests.train.helpers import FixedBatches, random_batches


def make_trainer(out, batches, model_cfg=None, **train_kw):
    model_cfg = model_cfg or tiny_model_config(max_seq_len=32)
    torch.manual_seed(0)
    model = Llama(model_cfg)
    kw = dict(batch_size=2, max_steps=8, lr=3e-3, warmup_steps=2, eval_interval=1000, log_interval=1,
              ckpt_interval=1000, device="cpu", dtype="float32")
    kw.update(train_kw)
    return Trainer(model, model_cfg, TrainConfig(**kw), batches, out, progress=False)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("mask_some", [False, True])
def test_accumulation_4x2_matches_batch_8(tmp_path, mask_some):
    micro = random_batches(4, 2, 32, 1024, mask_some=mask_some)
    big = [(torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))]
    a = make_trainer(tmp_path / "a", FixedBatches(micro), grad_accum=4, batch_size=2)
    b = make_trainer(tmp_path / "b", FixedBatches(big), grad_accum=1, batch_size=8)
    loss_a, norm_a = a.train_step()
    loss_b, norm_b = b.train_step()
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4)
    wa, wb = weights(a), weights(b)
    for k in wa:
        # float32 summation order differs and Adam's first step divides by |g|, which magnifies
        # it where a gradient is ~0: allow 1% of one step (lr = 3e-3), nothing more
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=3e-5)


def test_resume_after_half_gives_the_same_weights(tmp_path, data_dir, tokenizer):
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=32, dropout=0.1)  # dropout: RNG must resume too

    def batches():
        return PretrainBatches(data_dir, 32, 2, seed=5)

    full = make_trainer(tmp_path / "full", batches(), cfg, max_steps=10)
    full.fit()
    half = make_trainer(tmp_path / "half", batches(), cfg, max_steps=10)
    half.fit(stop_at_step=5)
    resumed = make_trainer(tmp_path / "half", batches(), cfg, max_steps=10)
    assert resumed.resume()
    assert resumed.step == 5
    resumed.fit()
    assert resumed.step == 10
    wf, wr = weights(full), weights(resumed)
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    t = make_trainer(tmp_path, FixedBatches(random_batches(2, 2, 32, 1024)), max_steps=2)
    t.fit()
    good = ckpt_io.find_checkpoint(tmp_path)
    before = weights(t)
    t.cfg.max_steps = 5
    with torch.no_grad():
        t.model.layers[0].attention.wqkv.weight[0, 0] = float("nan")
    poisoned = weights(t)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 2.*last good checkpoint: .*step-00000002"):
        t.fit()
    after = weights(t)
    for k in poisoned:  # no optimizer step was taken with NaN gradients
        assert torch.equal(after[k], poisoned[k]) or torch.isnan(after[k]).any() and k.startswith("layers.0.attention.wqkv")
    assert ckpt_io.find_checkpoint(tmp_path) == good
    reloaded = Llama(tiny_model_config(max_seq_len=32))
    ckpt_io.load_weights(reloaded, good)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, before[k])


def test_loss_falls_on_real_text(tmp_path, data_dir, tokenizer):
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    from babyllama.data.loader import validation_batches

    t = make_trainer(tmp_path, PretrainBatches(data_dir, 64, 8), cfg, max_steps=40, lr=5e-3, warmup_steps=5,
                     eval_interval=40)
    t.val_batches = validation_batches(data_dir, 64, 8, 4)
    summary = t.fit()
    (s0, v0), (s1, v1) = summary["val"][0], summary["val"][-1]
    assert (s0, s1) == (0, 40)
    assert v0 == pytest.approx(math.log(tokenizer.vocab_size), abs=0.3)
    assert v1 < v0 - 1.0  # ~1.5 nats measured; a broken loop stays near ln(vocab)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 40


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_weight_decay_on_matrices_only(tmp_path):
    t = make_trainer(tmp_path, FixedBatches(random_batches(1, 2, 32, 1024)), weight_decay=0.1)
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_the_schedule_follows_a_time_budget_when_the_clock_stops_the_run_first(tmp_path):
    """A busy machine: the steps planned for the budget do not fit, yet the learning rate has
    decayed when the time runs out (the cosine follows the larger of steps done and time used)."""
    import json
    import time

    cfg = TrainConfig(max_steps=10_000, max_minutes=0.05, batch_size=2, lr=1e-2, min_lr=1e-4, warmup_steps=0,
                      log_interval=1, eval_interval=10**6, ckpt_interval=10**6, device="cpu", dtype="float32")
    assert lr_at(5, cfg, 1.0) == cfg.min_lr and lr_at(5, cfg, 0.0) == pytest.approx(cfg.lr, rel=1e-3)
    assert lr_at(5, cfg, 0.5) == pytest.approx((cfg.lr + cfg.min_lr) / 2)

    class Slow(FixedBatches):  # a machine busy with something else
        def next_batch(self):
            time.sleep(0.1)
            return super().next_batch()

    model = Llama(tiny_model_config(vocab_size=256))
    summary = Trainer(model, model.config, cfg, Slow(random_batches(4, 2, 16, 256)), tmp_path,
                      progress=False).fit()
    assert summary["stopped"] == "max_minutes" and summary["step"] < 100
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "lr" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0.9 * cfg.lr
    assert lrs[-1] < cfg.min_lr + 0.1 * (cfg.lr - cfg.min_lr)  # decayed, though 99% of the steps never ran
    state = torch.load(next((tmp_path / "checkpoints").glob("step-*")) / "state.pt", weights_only=True)
    assert state["train_seconds"] >= 0.05 * 60
