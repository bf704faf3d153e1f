"""limner's own progress bars: one per long task (generate, eval, world check; training has its own), on stderr.

The command that owns a task opens its bar with `task_bar`; the code doing the work deep below it (a batch of
images drawn, a denoising step) reports through `advance` and `status` without being handed the bar, and reports
to nothing when no bar is open (the Python API, tests). On a terminal the bar redraws every half second; into a
pipe or a file (a log, CI, `limner app` reading its child's progress) it still writes, but at most every 10
seconds, so a log holds a few lines per minute rather than a redraw per image. `limner --quiet` hides them all.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

TERMINAL_INTERVAL_S = 0.5
LOG_INTERVAL_S = 10.0

_quiet = False
# the bar of the task running in this thread; a new thread starts with none (see shown())
_current: ContextVar[tqdm | None] = ContextVar("limner_progress_bar", default=None)


def set_quiet(quiet: bool) -> None:
    """`limner --quiet`: no limner progress bar in this process (results, notes and errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def shown() -> bool:
    """Whether a bar opened here is drawn: not under --quiet, and only from the main thread. A server (limner app)
    runs commands in worker threads, several at once: bars from several threads would overwrite each other on the
    server's one terminal, and the app shows its jobs' progress itself."""
    return not _quiet and threading.current_thread() is threading.main_thread()


def interval_s(stream: Any) -> float:
    """How often a bar may redraw on `stream`: often on a terminal, rarely into a log."""
    isatty = getattr(stream, "isatty", None)
    return TERMINAL_INTERVAL_S if isatty is not None and isatty() else LOG_INTERVAL_S


@contextmanager
def task_bar(total: int, desc: str, unit: str = "img") -> Iterator[tqdm]:
    """The bar of one long task, current for this thread until the block ends (then closed, at its final count)."""
    stream = sys.stderr
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        disable=not shown(),
        mininterval=interval_s(stream),
        miniters=0,  # fixed, not tqdm's adaptive count: a status() alone may redraw once the interval has passed
        dynamic_ncols=True,
    )
    token = _current.set(bar)
    try:
        yield bar
    finally:
        _current.reset(token)
        bar.close()


def advance(n: int = 1) -> None:
    """`n` more units of the current task are done (nothing without a bar)."""
    bar = _current.get()
    if bar is not None:
        bar.update(n)


def status(**fields: object) -> None:
    """Sets fields shown after the bar's count (row, subject, denoising step); None removes one. Redraws no more
    often than the bar's interval."""
    bar = _current.get()
    if bar is None or bar.disable:
        return
    shown_fields = getattr(bar, "limner_fields", {})
    shown_fields.update(fields)
    bar.limner_fields = {k: v for k, v in shown_fields.items() if v is not None}
    bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in bar.limner_fields.items()), refresh=False)
    bar.update(0)  # redraws once the interval has passed since the last redraw


def active() -> bool:
    """Whether a drawn bar is current (so work below may report its steps)."""
    bar = _current.get()
    return bar is not None and not bar.disable
