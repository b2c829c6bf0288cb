"""The exported tokenizer against sentencepiece: transformers' AutoTokenizer, reading only the files
we wrote, gives our ids on real and awkward text, and its chat template gives our chat ids."""

import itertools

import pytest

from babyllama.export.tokenizer import save_hf_tokenizer, vocabulary
from babyllama.tokenizer import load_tokenizer
from babyllama.tokenizer.chat import ChatTemplate, Message
from tests.conftest import needs_shared

import transformers  # noqa: E402  (a dev dependency: the independent reference)

AWKWARD = ["，。！？：；“”‘’（）【】《》……——", "ＡＢＣ１２３ａｂｃ　全角", "2026年11月30日，3.1415926元，第12345号",
           "😀👍🏽🇨🇳 表情", "𠀀𪚥𰻞 生僻字", "a  b   c\t\td\n\n\ne   ", "   前导空格", "末尾空格   ", "", " ", "\n",
           "isopropyl sop eop", "Hello, World! It's 100% ok.", "混合English和中文123abc", "e\u0301 cafe\u0301",
           "\u200b零宽\ufeff字符", "\r\n换行\r"]


def _texts(corpus_dir):
    lines = (corpus_dir / "news.txt").read_text(encoding="utf-8").splitlines()
    reviews = (corpus_dir / "reviews.txt").read_text(encoding="utf-8").splitlines()
    return list(itertools.islice(lines, 400)) + reviews[:400] + AWKWARD


def _exported(tok, tmp_path):
    save_hf_tokenizer(tok, tmp_path, 256)
    return transformers.AutoTokenizer.from_pretrained(tmp_path)


def _check_ids(tok, hf, texts):
    wrong = [t for t in texts if hf.encode(t, add_special_tokens=False) != tok.encode(t)]
    assert not wrong, f"{len(wrong)} texts tokenized differently, e.g. {wrong[0]!r}"
    for text in texts[-len(AWKWARD):]:
        ids = tok.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def _check_chat(tok, hf):
    template = ChatTemplate(tok)
    conversations = [[Message("user", "你好")],
                     [Message("system", "你是一个乐于助人的助手。"), Message("user", "今天天气怎么样？ 123"),
                      Message("assistant", "晴，25℃。"), Message("user", " 前面有空格\n两行")]]
    for messages in conversations:
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        for add in (True, False):
            ids = hf.apply_chat_template(dicts, add_generation_prompt=add, tokenize=True, return_dict=True)["input_ids"]
            assert list(ids) == template.encode(messages, add_generation_prompt=add)[0]


def test_our_tokenizer_exports_to_the_same_ids(tokenizer, corpus_dir, tmp_path):
    hf = _exported(tokenizer, tmp_path)
    assert len(hf) == tokenizer.vocab_size and hf.eos_token_id == tokenizer.eos_id
    _check_ids(tokenizer, hf, _texts(corpus_dir))
    _check_chat(tokenizer, hf)
    # our own files are kept, so babyllama reads the export back as the same tokenizer
    assert load_tokenizer(tmp_path).fingerprint == tokenizer.fingerprint


def test_chatglm2_tokenizer_exports_with_its_appended_ids(corpus_dir, tmp_path):
    tok = load_tokenizer(needs_shared("tokenizers/chatglm2"))
    hf = _exported(tok, tmp_path)
    assert len(hf) == 64794
    assert [hf.convert_ids_to_tokens(i) for i in range(64789, 64794)] == ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
    assert hf.pad_token_id not in range(64789, 64794)
    _check_ids(tok, hf, _texts(corpus_dir))
    _check_chat(tok, hf)
    assert load_tokenizer(tmp_path).fingerprint == tok.fingerprint


def test_vocabulary_keeps_scores_and_types(tokenizer):
    vocab = vocabulary(tokenizer)
    sp = tokenizer.sp
    assert len(vocab.pieces) == tokenizer.vocab_size
    for i in range(sp.get_piece_size()):
        assert vocab.pieces[i] == sp.id_to_piece(i) and vocab.scores[i] == pytest.approx(sp.get_score(i))
        assert (vocab.types[i] == 3) == sp.is_control(i) and (vocab.types[i] == 6) == sp.is_byte(i)
    assert vocab.pieces[vocab.turn_start] == "<|im_start|>" and vocab.pieces[vocab.turn_end] == "<|im_end|>"
