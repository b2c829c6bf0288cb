"""The data stages' errors, in a module of their own so that every reader can raise them."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input: the message names the file and the line (or record)."""


class DataWarning(UserWarning):
    """Input that is read, but maybe not as the user meant (the CLI prints it as one line)."""
