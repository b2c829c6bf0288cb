"""One Tokenizer interface over the tokenizers users bring.

- our own: a sentencepiece BPE model trained by `babyllama tokenizer train` (tokenizer.model +
  tokenizer_config.json in a directory);
- ChatGLM2's `tokenizer.model` (the original project's): 64,789 sentencepiece pieces followed by
  5 special tokens, 64,794 ids in all;
- any Hugging Face `tokenizer.json` (with its tokenizer_config.json when present).

`load_tokenizer(path)` takes a directory or a file and returns the right one.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

# Special tokens of tokenizers we train. The chat markers are reserved now so that every model
# trained with our tokenizer can later be fine-tuned for chat without resizing its embeddings.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
RESERVED = [f"<|reserved_{i}|>" for i in range(6)]
CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(ValueError):
    pass


class Tokenizer(ABC):
    """Common surface: ids in, text out, and the ids every stage needs by name."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        ...

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        ...

    def token_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise TokenizerError(f"{self.kind} tokenizer has no special token {token!r}")
        return self.special_tokens[token]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} vocab={self.vocab_size} fingerprint={self.fingerprint}>"


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, optionally with extra special tokens appended after its pieces."""

    def __init__(self, model_file: str | Path, appended_specials: Sequence[str] = (),
                 kind: str = "sentencepiece", pad_token: str | None = None):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self._model_bytes = self.model_file.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse text
            raise TokenizerError(f"{self.model_file}: not a sentencepiece model ({e})") from None
        self.kind = kind
        n = self.sp.get_piece_size()
        self.appended = list(appended_specials)
        self.vocab_size = n + len(self.appended)
        self.special_tokens = {}
        for i in range(n):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                self.special_tokens[self.sp.id_to_piece(i)] = i
        for j, tok in enumerate(self.appended):
            self.special_tokens[tok] = n + j
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"{self.model_file}: the model defines no end-of-sequence token")
        pad = self.sp.pad_id()
        if pad_token is not None:
            pad = self.special_tokens[pad_token]
        self.pad_id = pad if pad >= 0 else self.sp.unk_id()
        self.fingerprint = _sha(self._model_bytes, json.dumps(self.appended).encode())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        n = self.sp.get_piece_size()
        return self.sp.decode([i for i in ids if 0 <= i < n])

    def piece(self, token_id: int) -> str:
        n = self.sp.get_piece_size()
        return self.appended[token_id - n] if token_id >= n else self.sp.id_to_piece(token_id)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self._model_bytes)
        config = {"kind": self.kind, "appended_specials": self.appended,
                  "bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "fingerprint": self.fingerprint}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return directory


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json; special tokens from tokenizer_config.json."""

    def __init__(self, json_file: str | Path):
        from tokenizers import Tokenizer as _HFTok

        self.json_file = Path(json_file)
        raw = self.json_file.read_bytes()
        try:
            self.tok = _HFTok.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise TokenizerError(f"{self.json_file}: not a Hugging Face tokenizer.json ({e})") from None
        self.kind = "huggingface"
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        cfg_file = self.json_file.with_name(CONFIG_FILE)
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        self._config_bytes = cfg_file.read_bytes() if cfg_file.is_file() else b""

        def named(key: str, fallbacks: Sequence[str]) -> int | None:
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            for cand in ([value] if value else []) + list(fallbacks):
                tid = self.tok.token_to_id(cand)
                if tid is not None:
                    return tid
            return None

        eos = named("eos_token", ["</s>", "<|endoftext|>", "<|im_end|>", "<eos>"])
        if eos is None:
            raise TokenizerError(f"{self.json_file}: cannot tell the end-of-sequence token; "
                                 f"add eos_token to {cfg_file.name}")
        self.eos_id = eos
        bos = named("bos_token", ["<s>", "<|im_start|>", "<bos>"])
        self.bos_id = bos if bos is not None else eos
        pad = named("pad_token", ["<pad>", "<|endoftext|>"])
        self.pad_id = pad if pad is not None else eos
        self.fingerprint = _sha(raw, self._config_bytes)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.json_file, directory / "tokenizer.json")
        if self._config_bytes:
            (directory / CONFIG_FILE).write_bytes(self._config_bytes)
        return directory


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a directory (ours, or one holding tokenizer.json / tokenizer.model) or a file."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer not found: {path}")
    if path.is_dir():
        cfg_file = path / CONFIG_FILE
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        ours = cfg.get("babyllama", cfg)  # an export keeps our settings under "babyllama", beside HF's
        if (path / "tokenizer.model").is_file() and isinstance(ours, dict) and "appended_specials" in ours:
            return SentencePieceTokenizer(path / "tokenizer.model", ours["appended_specials"], ours["kind"])
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return load_tokenizer(path / "tokenizer.model")
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if path.suffix == ".json":
        return HFTokenizer(path)
    tok = SentencePieceTokenizer(path)
    if tok.vocab_size == 64789 and "[gMASK]" not in tok.special_tokens:
        # ChatGLM2-6B: its Python wrapper appends five specials after the sentencepiece pieces
        return SentencePieceTokenizer(path, CHATGLM2_SPECIALS, kind="chatglm2")
    return tok


def copy_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    return tok.save(directory)


__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer", "TokenizerError",
           "BOS", "EOS", "PAD", "UNK", "IM_START", "IM_END"]
