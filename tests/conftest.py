"""Shared fixtures: a small tokenizer and token shards made from the built-in corpus (real text)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from babyllama.config import ModelConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def needs_shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data comes with CI, not with a user's clone)")
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """~3,000 real documents: People's Daily paragraphs and reviews, as plain text files."""
    from babyllama.data.builtin import peoples_daily_file, review_files
    from babyllama.corpus.readers import iter_documents

    out = tmp_path_factory.mktemp("corpus")
    docs = list(itertools.islice(iter_documents(peoples_daily_file(), "peoples_daily"), 2000))
    (out / "news.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    with open(review_files()["positive"], encoding="utf-8") as f:
        reviews = [next(f).strip() for _ in range(1000)]
    (out / "reviews.txt").write_text("\n".join(reviews) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    from babyllama.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TokenizerTrainConfig(inputs=[str(corpus_dir / "news.txt"), str(corpus_dir / "reviews.txt")],
                                         out=str(out), vocab_size=4096))
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from babyllama.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def data_dir(corpus_dir, tokenizer_dir, tmp_path_factory) -> Path:
    from babyllama.data.pretrain import PrepareConfig, prepare_pretrain

    out = tmp_path_factory.mktemp("shards") / "data"
    prepare_pretrain(PrepareConfig(inputs=[str(corpus_dir / "news.txt"), str(corpus_dir / "reviews.txt")],
                                   tokenizer=str(tokenizer_dir), out=str(out), val_fraction=0.05, progress=False))
    return out


def tiny_model_config(vocab_size: int = 1024, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def float_run(data_dir, tmp_path_factory):
    """A tiny pretrained run (real text, so real activations): 60 steps of a 2-layer model (dim 64,
    grouped-query attention) on news and reviews. Quantization and export start from it."""
    from babyllama.config import RunConfig, TrainConfig
    from babyllama.train.pretrain import PretrainJob, pretrain

    out = tmp_path_factory.mktemp("float") / "float"
    cfg = RunConfig(model=tiny_model_config(vocab_size=0, max_seq_len=64),
                    train=TrainConfig(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_interval=60,
                                      eval_batches=1, ckpt_interval=100, device="cpu"))
    pretrain(PretrainJob(data=str(data_dir), out=str(out), config=cfg, progress=False))
    return out


def pytest_addoption(parser):
    parser.addoption("--llamacpp", action="store_true",
                     help="also run the tests against llama.cpp (needs llama-cpp-python, built from source: see README)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `llamacpp` run only with --llamacpp: `make test` does not build llama.cpp."""
    if config.getoption("--llamacpp"):
        return
    kept = [item for item in items if "llamacpp" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "llamacpp" in item.keywords])
        items[:] = kept


def make_lora_run(float_run, out, targets: str = "q,v,down"):
    """An adapter run over `float_run` in `out` with trained-looking adapters (B moved from zero);
    returns the adapted model (eval mode)."""
    import babyllama.checkpoint as ckpt_io
    from babyllama.adapters import LoRA
    from babyllama.rundir import write_checkpoint_run
    from babyllama.transforms import apply_transforms

    model, ckpt = ckpt_io.load_model(float_run)
    apply_transforms(model, [LoRA(rank=4, alpha=8, dropout=0.0, targets=targets)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    out.mkdir()
    write_checkpoint_run(out, "sft", model, ckpt, 5, {}, base=str(ckpt))
    return model.eval()
