"""A tiny pretrained run (real text, so real activations) shared by the quantization tests."""

import pytest

from babyllama.config import RunConfig, TrainConfig
from tests.conftest import tiny_model_config


@pytest.fixture(scope="package")
def float_run(data_dir, tmp_path_factory):
    """60 steps of pretraining a 2-layer model (dim 64, grouped-query attention) on news and reviews."""
    from babyllama.train.pretrain import PretrainJob, pretrain

    out = tmp_path_factory.mktemp("quant") / "float"
    cfg = RunConfig(model=tiny_model_config(vocab_size=0, max_seq_len=64),
                    train=TrainConfig(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_interval=60,
                                      eval_batches=1, ckpt_interval=100, device="cpu"))
    pretrain(PretrainJob(data=str(data_dir), out=str(out), config=cfg, progress=False))
    return out
