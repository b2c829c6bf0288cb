import json

import pytest

from babyllama.tokenizer import IM_END, IM_START, TokenizerError, load_tokenizer
from tests.conftest import needs_shared

SAMPLES = [
    "１９９８年，中国人民满怀信心地迈向新世纪。",  # full-width digits
    "这本书的作者是杜拉拉，价格 39.8 元，ISBN 978-7-5613-4242-0。",
    "生僻字：𠀾𪚥龘靐，表情：😀🎉👍🏻，日本語もある。",
    "Mixed English and 中文 with  two spaces\nand a newline\tand a tab.",
    "",
]


def test_round_trip_on_real_and_rare_text(tokenizer, corpus_dir):
    real = (corpus_dir / "news.txt").read_text(encoding="utf-8").splitlines()[:200]
    for text in SAMPLES + real:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_no_unknown_tokens_thanks_to_byte_fallback(tokenizer):
    ids = tokenizer.encode("𠀾😀ᚠ")  # not in the training text
    assert tokenizer.sp.unk_id() not in ids


def test_digits_are_split(tokenizer):
    pieces = [tokenizer.piece(i) for i in tokenizer.encode("12345")]
    assert pieces == list("12345")


def test_special_tokens_are_reserved_and_not_produced_from_text(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert IM_START in tokenizer.special_tokens and IM_END in tokenizer.special_tokens
    ids = tokenizer.encode(f"{IM_START}user 你好{IM_END}")
    assert tokenizer.special_tokens[IM_START] not in ids and tokenizer.eos_id not in ids


def test_save_and_reload_keeps_fingerprint(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again.fingerprint == tokenizer.fingerprint
    assert again.encode("中国人民") == tokenizer.encode("中国人民")


def test_chatglm2_tokenizer():
    path = needs_shared("tokenizers/chatglm2/tokenizer.model")
    tok = load_tokenizer(path)
    assert tok.kind == "chatglm2"
    assert tok.vocab_size == 64794
    assert tok.special_tokens["[gMASK]"] == 64790 and tok.special_tokens["eop"] == 64793
    assert tok.eos_id == 2 and tok.bos_id == 1
    text = "你好，世界！今天是2024年。"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text) + [64790]) == text  # appended specials are not text


def test_huggingface_tokenizer_json():
    path = needs_shared("tokenizers/bpe6400/tokenizer.json")
    tok = load_tokenizer(path.parent)
    assert tok.kind == "huggingface"
    assert tok.vocab_size >= 6400
    assert tok.eos_id == tok.special_tokens["<|im_end|>"]
    text = "中文和English混合 123"
    assert tok.decode(tok.encode(text)) == text


def test_missing_or_bad_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(bad)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "tokenizer.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "h")
