"""Text typed by a user, from argv or a terminal, that may not be UTF-8.

Python decodes command-line arguments (and, as `chat` sets it up, terminal input) as UTF-8 with
`surrogateescape`: a byte that is not UTF-8 becomes a lone surrogate character, which the tokenizer
cannot encode. A Chinese terminal set to GBK/GB18030 or Big5 sends exactly such bytes. `user_text`
gives the text back as intended when the encoding is named, and otherwise a clear error.
"""

from __future__ import annotations

import codecs
import re

from babyllama.config import ConfigError

_SURROGATE = re.compile("[\ud800-\udfff]")
GUESSES = ("gb18030", "big5")  # what a Chinese terminal that is not UTF-8 most likely sends


def check_encoding(encoding: str) -> str:
    """The encoding's canonical name, or a ConfigError naming --encoding."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ConfigError(f"--encoding {encoding!r}: unknown encoding (e.g. gb18030, big5, utf-8)") from None


def user_text(s: str, encoding: str | None = None, what: str = "the text") -> str:
    """`s` unchanged when it is proper text; else its original bytes decoded with `encoding`.

    Without `encoding`, text that was not UTF-8 raises a ConfigError naming the encoding it looks
    like (gb18030 or big5, tried strictly) and how to fix it. `what` names the text in messages,
    e.g. "--prompt"."""
    if not _SURROGATE.search(s):
        return s
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte: not from a terminal or argv
        raise ConfigError(f"{what} contains unpaired surrogate characters (U+D800..U+DFFF), which are not text") from None
    if encoding is not None:
        name = check_encoding(encoding)
        try:
            return raw.decode(name)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} is not valid {encoding} either ({e.reason} at byte {e.start}); "
                              f"check --encoding, or set the terminal to UTF-8") from None
    likely = []
    for guess in GUESSES:
        try:
            raw.decode(guess)
            likely.append(guess)
        except UnicodeDecodeError:
            pass
    if likely:
        raise ConfigError(f"{what} is not UTF-8; it looks like {' or '.join(likely)}: run with --encoding {likely[0]}, "
                          f"or set the terminal to UTF-8")
    raise ConfigError(f"{what} is not UTF-8 (nor {' or '.join(GUESSES)}): set the terminal to UTF-8, "
                      f"or name its encoding with --encoding")
