import zlib

from babyllama.data.pretrain import is_validation
from babyllama.data.sft import is_validation_conversation
from babyllama.tokenizer.chat import Message


def test_conversations_split_by_the_pretraining_rule_on_their_joined_text():
    convs = [[Message("user", f"问题 {k}"), Message("assistant", f"回答 {k * 7}")] for k in range(400)]
    for fraction in (0.0, 0.1, 0.5, 1.0):
        for msgs in convs:
            key = "\x00".join(m.content for m in msgs)
            # the rule both splits had when each wrote it out: crc32 of the UTF-8 text, per million
            expected = zlib.crc32(key.encode("utf-8")) % 1_000_000 < fraction * 1_000_000
            assert is_validation_conversation(msgs, fraction) == is_validation(key, fraction) == expected
    assert 20 < sum(is_validation_conversation(m, 0.1) for m in convs) < 60
