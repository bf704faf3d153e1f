"""The one exception type limner raises for bad input: the CLI prints it and exits with code 2."""

from __future__ import annotations


class LimnerError(Exception):
    """A problem with what the user gave (a path, an argument, a file). The message says what is
    wrong, names the offending file or argument, and says what to do."""

    exit_code = 2
