"""Our tokenizer as other tools read it: a `tokenizers` tokenizer.json for transformers, and the
vocabulary (pieces, scores, token types) GGUF stores for llama.cpp.

Both our trained tokenizer and ChatGLM2's are sentencepiece BPE models. Sentencepiece encodes a
text by merging, again and again, the adjacent pair whose merged piece has the best score; it
splits nothing beforehand at encoding time. So does llama.cpp's "llama" tokenizer, given the same
scores. In a tokenizer.json the same procedure is a BPE model whose merge list holds every
(left, right) split of every piece, ranked by the merged piece's score. Around it:

- sentencepiece's spaces are "▁"; a dummy prefix (ChatGLM2 has one, ours not) is a "▁" in front;
- characters missing from the vocabulary fall back to byte pieces <0xNN>;
- user-defined pieces (our "\n") are matched whole before merging: added tokens;
- control pieces (<s>, <|im_start|>, ...) never come out of text in sentencepiece: special added
  tokens, matched in text only where a template writes them.

ChatGLM2's five ids after its pieces are named `[MASK] [gMASK] [sMASK] <sop> <eop>` outside: its
turn markers are the bare words "sop"/"eop" in its own code, and as added tokens those would be cut
out of ordinary text ("isopropyl").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from babyllama.config import ConfigError
from babyllama.tokenizer import CONFIG_FILE, IM_END, IM_START, SentencePieceTokenizer, Tokenizer

# sentencepiece's piece types; GGUF's token types use the same numbers
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
EXPORTED_NAME = {"sop": "<sop>", "eop": "<eop>"}


@dataclass
class Vocabulary:
    """Everything a tokenizer file outside babyllama needs, id by id."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    dummy_prefix: bool  # a "▁" is put in front of every text (after each special token, in a template)
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    turn_start: int  # the chat markers: <|im_start|>/<|im_end|>, or ChatGLM2's sop/eop
    turn_end: int

    def name(self, token_id: int) -> str:
        return self.pieces[token_id]


def vocabulary(tok: Tokenizer) -> Vocabulary:
    """The vocabulary of a sentencepiece tokenizer (ours or ChatGLM2's), with its appended ids."""
    if not isinstance(tok, SentencePieceTokenizer):
        raise ConfigError(f"this run's tokenizer is a {tok.kind} tokenizer.json; GGUF export takes sentencepiece "
                          f"tokenizers (babyllama's own or ChatGLM2's), whose vocabulary llama.cpp reads as it is")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_file.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ConfigError(f"{tok.model_file}: a sentencepiece {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} "
                          f"model; export takes BPE models (babyllama's and ChatGLM2's are)")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise ConfigError(f"{tok.model_file}: its sentencepiece normalization ({norm.name}, remove_extra_whitespaces="
                          f"{norm.remove_extra_whitespaces}) is not reproduced outside sentencepiece; export takes "
                          f"tokenizers that keep text as it is (babyllama's and ChatGLM2's do)")
    pieces = [p.piece for p in proto.pieces] + [EXPORTED_NAME.get(t, t) for t in tok.appended]
    scores = [p.score for p in proto.pieces] + [0.0] * len(tok.appended)
    types = [int(p.type) for p in proto.pieces] + [CONTROL] * len(tok.appended)
    specials = tok.special_tokens
    if IM_START in specials and IM_END in specials:
        start, end = specials[IM_START], specials[IM_END]
    elif "sop" in specials and "eop" in specials:
        start, end = specials["sop"], specials["eop"]
    else:
        raise ConfigError(f"{tok.kind} tokenizer has no chat markers ({IM_START}/{IM_END})")
    unk = next(i for i, t in enumerate(types) if t == UNKNOWN)
    return Vocabulary(pieces, scores, types, bool(norm.add_dummy_prefix), tok.bos_id, tok.eos_id, tok.pad_id, unk,
                      start, end)


def chat_template_jinja(vocab: Vocabulary) -> str:
    """Our chat template (tokenizer/chat.py) as the Jinja string transformers and llama.cpp render.

    We tokenize the role line and each content apart; a template is rendered to text and tokenized
    whole. They agree because "\\n" ends every piece it is in, and, where the tokenizer puts a "▁" in
    front of every text, the template writes the space sentencepiece would have added."""
    start, end = vocab.name(vocab.turn_start), vocab.name(vocab.turn_end)
    content = "(' ' + message['content'] if message['content'] else '')" if vocab.dummy_prefix \
        else "message['content']"
    return ("{% for message in messages %}"
            f"{{{{ '{start}' + message['role'] + '\\n' + {content} + '{end}' + '\\n' }}}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ '{start}assistant\\n' }}}}{{% endif %}}")


def bpe_merges(vocab: Vocabulary) -> list[tuple[str, str]]:
    """Every split of every normal piece into two pieces, best-scoring merged piece first."""
    index = {p: i for i, (p, t) in enumerate(zip(vocab.pieces, vocab.types)) if t == NORMAL}
    merges = []
    for piece, i in index.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((-vocab.scores[i], index[left], index[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def hf_tokenizer_json(vocab: Vocabulary) -> str:
    """The tokenizer.json that encodes every text to the ids sentencepiece gives."""
    from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models, normalizers

    bpe = models.BPE(vocab={p: i for i, p in enumerate(vocab.pieces)}, merges=bpe_merges(vocab),
                     unk_token=vocab.pieces[vocab.unk_id], fuse_unk=True, byte_fallback=True)
    tok = HFTok(bpe)
    steps = [normalizers.Prepend("▁")] if vocab.dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if vocab.dummy_prefix else []))
    # in id order, so the appended ids (past the BPE vocabulary) get theirs
    for i, (piece, kind) in enumerate(zip(vocab.pieces, vocab.types)):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            tok.add_tokens([AddedToken(piece, special=kind != USER_DEFINED, normalized=False)])
            if tok.token_to_id(piece) != i:
                raise ConfigError(f"token {piece!r} would get id {tok.token_to_id(piece)} instead of {i}")
    return tok.to_str(pretty=True)


def save_hf_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> Vocabulary | None:
    """tokenizer.json, tokenizer_config.json (special tokens, the chat template) and our own files
    (tokenizer.model, so babyllama reads the same tokenizer back); None for a tokenizer.json run,
    whose files are copied as they are."""
    out = Path(out)
    if not isinstance(tok, SentencePieceTokenizer):
        tok.save(out)
        return None
    vocab = vocabulary(tok)
    (out / "tokenizer.json").write_text(hf_tokenizer_json(vocab), encoding="utf-8")
    (out / "tokenizer.model").write_bytes(tok.model_file.read_bytes())
    ours = {"kind": tok.kind, "appended_specials": tok.appended, "bos": tok.bos_id, "eos": tok.eos_id,
            "pad": tok.pad_id, "fingerprint": tok.fingerprint}  # what load_tokenizer reads back
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": vocab.name(vocab.bos_id),
              "eos_token": vocab.name(vocab.eos_id), "unk_token": vocab.name(vocab.unk_id),
              "pad_token": vocab.name(vocab.pad_id), "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_len,
              "chat_template": chat_template_jinja(vocab), "babyllama": ours}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return vocab
