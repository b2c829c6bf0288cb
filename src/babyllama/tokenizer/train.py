"""Train a sentencepiece BPE tokenizer for Chinese.

Choices, and why:
- byte fallback: a character never seen in training becomes its UTF-8 bytes, never <unk>;
- digits split one by one: numbers tokenize consistently, which helps arithmetic and dates;
- identity normalization, no dummy prefix, whitespace kept: decode(encode(x)) == x exactly;
- ids 0-3 are <unk> <s> </s> <pad>, then the chat markers and reserved slots as control tokens,
  so text typed by a user can never turn into a special token.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from babyllama.data.readers import iter_documents
from babyllama.tokenizer import BOS, EOS, IM_END, IM_START, PAD, RESERVED, UNK, SentencePieceTokenizer, TokenizerError

# sentencepiece refuses longer "sentences"; documents are cut at line breaks, then at this length
MAX_PIECE_OF_TEXT = 2000


@dataclass
class TokenizerTrainConfig:
    inputs: list[str]
    out: str
    vocab_size: int = 8192
    layout: str = "auto"
    max_sentences: int = 2_000_000  # lines sampled for training; more adds time, not quality
    character_coverage: float = 0.9995
    seed: int = 0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


def _sentences(cfg: TokenizerTrainConfig) -> Iterator[str]:
    for path in cfg.inputs:
        for doc in iter_documents(path, cfg.layout):
            for line in doc.split("\n"):
                for i in range(0, len(line), MAX_PIECE_OF_TEXT):
                    piece = line[i:i + MAX_PIECE_OF_TEXT]
                    if piece.strip():
                        yield piece


def _reservoir(items: Iterator[str], k: int, seed: int) -> list[str]:
    """A uniform sample of k items from a stream of unknown length, in bounded memory."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, item in enumerate(items):
        if n < k:
            sample.append(item)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = item
    return sample


def train_tokenizer(cfg: TokenizerTrainConfig) -> SentencePieceTokenizer:
    import sentencepiece as spm

    sentences = _reservoir(_sentences(cfg), cfg.max_sentences, cfg.seed)
    if not sentences:
        raise TokenizerError(f"no text found in {', '.join(cfg.inputs)}")
    model = io.BytesIO()
    try:
        _train_spm(spm, sentences, model, cfg)
    except RuntimeError as e:
        if "required_chars" in str(e):
            raise TokenizerError(f"--vocab-size {cfg.vocab_size} cannot hold the distinct characters of this corpus "
                                 f"at character coverage {cfg.character_coverage} ({str(e).split('. ')[1]} needed); "
                                 f"raise --vocab-size or lower --character-coverage") from None
        raise
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(out / "tokenizer.model", kind="babyllama")
    tok.save(out)
    return tok


def _train_spm(spm, sentences: list[str], model: io.BytesIO, cfg: TokenizerTrainConfig) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        model_type="bpe", vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        control_symbols=[IM_START, IM_END, *RESERVED], user_defined_symbols=["\n"],
        max_sentence_length=4 * MAX_PIECE_OF_TEXT, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=cfg.threads, minloglevel=2,
    )
