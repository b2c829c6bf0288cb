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

from babyllama.corpus.readers import iter_documents
from babyllama.tokenizer import BOS, EOS, IM_END, IM_START, PAD, RESERVED, UNK, SentencePieceTokenizer, TokenizerError

# sentencepiece refuses longer "sentences"; documents are cut at line breaks, then at this length
MAX_PIECE_OF_TEXT = 2000
# 4 ids + 8 control tokens + the newline piece + 256 byte pieces, and room for some characters
MIN_VOCAB = 300
MAX_VOCAB = 1 << 20


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
    overwrite: bool = False  # replace a tokenizer already in `out` (never anything else)
    encoding: str = "utf-8"  # of the input files (UTF-8 may have a byte-order mark); e.g. gb18030, big5

    def __post_init__(self) -> None:
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise TokenizerError(f"--vocab-size must be between {MIN_VOCAB} (specials and the 256 byte pieces) "
                                 f"and {MAX_VOCAB:,}, got {self.vocab_size}")
        if not 0 < self.character_coverage <= 1:
            raise TokenizerError(f"--character-coverage must be in (0, 1], got {self.character_coverage}")
        if self.max_sentences < 1:
            raise TokenizerError(f"--max-sentences must be >= 1, got {self.max_sentences}")


def _sentences(cfg: TokenizerTrainConfig) -> Iterator[str]:
    for path in cfg.inputs:
        for doc in iter_documents(path, cfg.layout, encoding=cfg.encoding):
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

    from babyllama.corpus.readers import split_input_spec
    from babyllama.outputs import TOKENIZER, claim_output, staged_output, swap_in

    out = Path(cfg.out)
    claim_output(out, TOKENIZER, [split_input_spec(p)[0] for p in cfg.inputs], cfg.overwrite)  # before the work
    sentences = _reservoir(_sentences(cfg), cfg.max_sentences, cfg.seed)
    if not sentences:
        raise TokenizerError(f"no text found in {', '.join(cfg.inputs)}")
    model = io.BytesIO()
    try:
        _train_spm(spm, sentences, model, cfg)
    except RuntimeError as e:
        raise TokenizerError(_spm_error(str(e), cfg)) from None
    work, lock = staged_output(out, "tokenizer")
    try:
        claim_output(out, TOKENIZER, (), cfg.overwrite)  # again under the lock
        (work / "tokenizer.model").write_bytes(model.getvalue())
        SentencePieceTokenizer(work / "tokenizer.model", kind="babyllama").save(work)
        swap_in(work, out)
    finally:
        lock.release()
    return SentencePieceTokenizer(out / "tokenizer.model", kind="babyllama")


def _spm_error(message: str, cfg: TokenizerTrainConfig) -> str:
    """sentencepiece's terse RuntimeErrors, as one line that says what to change."""
    if "required_chars" in message:
        needed = message.split(". ")[1] if ". " in message else message
        return (f"--vocab-size {cfg.vocab_size} cannot hold the distinct characters of this corpus at character "
                f"coverage {cfg.character_coverage} ({needed} needed); raise --vocab-size or lower "
                f"--character-coverage")
    if "Vocabulary size" in message and "too high" in message:
        limit = message.rsplit("<=", 1)[-1].strip(" .")
        return (f"--vocab-size {cfg.vocab_size} is more than this corpus has distinct pieces for (at most {limit}); "
                f"lower --vocab-size or add text")
    return f"sentencepiece could not train: {message.strip().splitlines()[-1]}"


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
