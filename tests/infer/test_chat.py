"""Chat prompts longer than the window keep their structure; text that is not UTF-8 is recovered or
reported, and never ends a chat session."""

import io
import re
import sys
import warnings

import pytest
import torch

from babyllama.config import ConfigError
from babyllama.infer.chat import fit_chat_prompt, repl, tolerate_bad_bytes
from babyllama.infer.engine import Engine
from babyllama.infer.sampling import SamplingConfig
from babyllama.infer.text import user_text
from babyllama.model import Llama
from babyllama.tokenizer import IM_END, IM_START
from babyllama.tokenizer.chat import ChatTemplate, Message
from tests.conftest import tiny_model_config

GREEDY = SamplingConfig(temperature=0, repetition_penalty=1.0)
LONG = "我们今天讨论人民日报上的一篇新闻，它写的是农业和工业的发展。" * 12


def _turns(template: ChatTemplate, ids: list[int]) -> list[tuple[str, list[int]]]:
    """Parse prompt ids back into (role, content ids); fails unless every turn is
    <|im_start|>role\\n content <|im_end|>\\n and the prompt ends with <|im_start|>assistant\\n."""
    tok = template.tok
    roles = {r: tok.encode(r + "\n") for r in ("system", "user", "assistant")}
    closing = [template.end_id, *tok.encode("\n")]
    turns, i = [], 0
    while i < len(ids):
        assert ids[i] == template.start_id, f"turn {len(turns)} does not start with {IM_START}"
        role = next(r for r, head in roles.items() if ids[i + 1:i + 1 + len(head)] == head)
        i += 1 + len(roles[role])
        if i == len(ids):
            assert role == "assistant"
            turns.append((role, None))
            break
        end = ids.index(template.end_id, i)
        assert template.start_id not in ids[i:end]
        turns.append((role, ids[i:end]))
        assert ids[end:end + len(closing)] == closing
        i = end + len(closing)
    assert turns and turns[-1] == ("assistant", None), "the prompt must end with the assistant header"
    return turns[:-1]


def _render(template: ChatTemplate, ids: list[int]) -> str:
    return "".join(f"{IM_START}{r}\n{template.tok.decode(c)}{IM_END}\n" for r, c in _turns(template, ids)) \
        + f"{IM_START}assistant\n"


WELL_FORMED = re.compile(rf"^({re.escape(IM_START)}(system|user|assistant)\n[^<]*{re.escape(IM_END)}\n)*"
                         rf"{re.escape(IM_START)}assistant\n$")


def test_a_long_user_message_loses_its_earliest_tokens_not_its_header(tokenizer):
    template = ChatTemplate(tokenizer)
    msgs = [Message("system", "你是助手。"), Message("user", LONG)]
    full = template.prompt_ids(msgs)
    with pytest.warns(UserWarning) as caught:
        ids = fit_chat_prompt(template, msgs, 128, 200)  # 64 tokens kept for the reply
    assert len(ids) == 64 < len(full)
    message = str(caught[0].message)
    assert message == (f"chat prompt is {len(full)} tokens; the context holds 128, 64 of them kept for the reply: the "
                       f"earliest {len(full) - 64} tokens of message text were dropped (every turn's role header kept)")
    (r1, system), (r2, user) = _turns(template, ids)
    assert (r1, r2) == ("system", "user")
    assert system == tokenizer.encode("你是助手。")  # the system prompt is cut only after the other messages
    assert user == tokenizer.encode(LONG)[-len(user):] and 0 < len(user) < len(tokenizer.encode(LONG))
    assert WELL_FORMED.match(_render(template, ids))


def test_old_turns_go_first_then_contents_with_the_system_prompt_last(tokenizer):
    template = ChatTemplate(tokenizer)
    msgs = [Message("system", LONG), Message("user", "上一个问题"), Message("assistant", "上一个回答"),
            Message("user", "新问题")]
    with pytest.warns(UserWarning, match="tokens of message text were dropped"):
        ids = fit_chat_prompt(template, msgs, 96, 48)
    assert len(ids) == 96 - 48
    turns = _turns(template, ids)
    assert [r for r, _ in turns] == ["system", "user"]  # the older pair went whole
    (_, system), (_, user) = turns
    assert user == []  # the newest user's text is cut before the system prompt is
    assert system == tokenizer.encode(LONG)[-len(system):]
    assert WELL_FORMED.match(_render(template, ids))


def test_a_prompt_that_fits_is_unchanged_and_silent(tokenizer):
    template = ChatTemplate(tokenizer)
    msgs = [Message("system", "你是助手。"), Message("user", "你好")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_chat_prompt(template, msgs, 256, 100) == template.prompt_ids(msgs)


def test_a_context_too_small_for_the_markers_is_a_config_error(tokenizer):
    template = ChatTemplate(tokenizer)
    with pytest.raises(ConfigError, match="cannot hold even the .* turn markers"):
        fit_chat_prompt(template, [Message("system", "系统"), Message("user", "你好")], 8, 4)


def test_a_reply_to_a_prompt_longer_than_the_context(tokenizer):
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    engine = Engine(model, tokenizer)
    with pytest.warns(UserWarning, match="the context holds 64, 32 of them kept for the reply"):
        reply = engine.reply([Message("user", LONG)], 100, GREEDY)
    assert isinstance(reply, str)
    with pytest.raises(ConfigError, match="--max-new-tokens must be an integer >= 1, got 0"):
        engine.reply([Message("user", "你好")], 0, GREEDY)


class FakeEngine:
    """Stands in for the Engine in terminal tests: records what it was asked, answers 好."""

    def __init__(self, record):
        self.record = record

    def reply(self, history, *args, **kwargs):
        self.record(history)
        return "好"


# --- text that is not UTF-8 -----------------------------------------------------------------------

def _as_argv(raw: bytes) -> str:
    """What Python makes of bytes that are not UTF-8 on the command line (or a surrogateescape stdin)."""
    return raw.decode("utf-8", "surrogateescape")


def test_user_text_leaves_text_alone_and_recovers_a_named_encoding():
    assert user_text("你好 hello") == "你好 hello"
    assert user_text("你好", "big5") == "你好"  # proper text is never re-decoded
    assert user_text(_as_argv("你好，世界".encode("gbk")), "gb18030") == "你好，世界"
    assert user_text(_as_argv("你好".encode("big5")), "big5") == "你好"


def test_user_text_names_the_likely_encoding():
    with pytest.raises(ConfigError) as err:
        user_text(_as_argv("你好".encode("gbk")), what="--prompt")
    assert str(err.value) == ("--prompt is not UTF-8; it looks like gb18030 or big5: run with --encoding gb18030, "
                              "or set the terminal to UTF-8")
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(nor gb18030 or big5\)"):
        user_text(_as_argv(b"\x80\xff"))
    with pytest.raises(ConfigError, match="is not valid big5 either"):
        user_text(_as_argv(b"\xff\xff"), "big5")
    with pytest.raises(ConfigError, match="--encoding 'klingon': unknown encoding"):
        user_text(_as_argv(b"\xff"), "klingon")
    with pytest.raises(ConfigError, match="unpaired surrogate"):
        user_text("\ud800")


def test_repl_reports_a_line_that_is_not_utf8_and_goes_on(tokenizer):
    asked = []
    engine = FakeEngine(lambda history: asked.append([m.content for m in history]))
    lines = iter([_as_argv("你好".encode("gbk")), "再见", "/exit"])
    out = []
    repl(engine, GREEDY, 5, read=lambda prompt: next(lines), write=out.append)
    text = "".join(out)
    assert "error: that line is not UTF-8; it looks like gb18030" in text and "--encoding gb18030" in text
    assert asked == [["再见"]]  # the session went on after the bad line

    lines = iter([_as_argv("你好".encode("gbk")), "/exit"])
    asked.clear()
    repl(engine, GREEDY, 5, system=_as_argv("你是助手".encode("gbk")), read=lambda prompt: next(lines),
         write=out.append, encoding="gb18030")
    assert asked == [["你是助手", "你好"]]


def test_repl_reading_gbk_from_stdin(tokenizer, monkeypatch):
    """Through the real input(): stdin is told to pass bad bytes on instead of raising."""
    asked = []
    engine = FakeEngine(lambda history: asked.append(history[-1].content))
    for encoding, expected in ((None, []), ("gb18030", ["你好"])):
        stdin = io.TextIOWrapper(io.BytesIO("你好\n".encode("gbk") + b"/exit\n"), encoding="utf-8")
        monkeypatch.setattr(sys, "stdin", stdin)
        out = []
        repl(engine, GREEDY, 5, write=out.append, encoding=encoding)
        assert stdin.errors == "surrogateescape"
        assert asked == expected
        assert ("error: that line is not UTF-8" in "".join(out)) == (encoding is None)
        asked.clear()


def test_tolerate_bad_bytes_leaves_other_streams_alone():
    stream = io.StringIO("x")
    tolerate_bad_bytes(stream)  # not a TextIOWrapper: nothing to do, no error
    wrapped = io.TextIOWrapper(io.BytesIO(b"\xc4\xe3\n"), encoding="utf-8")
    tolerate_bad_bytes(wrapped)
    assert user_text(wrapped.readline().rstrip("\n"), "gbk") == "你"
