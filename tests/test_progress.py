"""limner's progress bars: one per task, fed from below without being handed around, hidden where they would
garble (--quiet, worker threads), rarely redrawn into a log."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from limner import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch):
    """A terminal in place of stderr: set in the test itself, since pytest swaps sys.stderr between phases."""

    def swap() -> Terminal:
        stream = Terminal()
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    yield swap
    progress.set_quiet(False)


def test_work_below_feeds_the_open_bar_and_nothing_without_one(terminal):
    stderr = terminal()
    progress.advance(3)  # the Python API, with no bar open: nothing happens
    progress.status(step="1/2")
    with progress.task_bar(4, "eval") as bar:
        progress.status(row="dreambooth", subject="1/2 duo_ball")
        progress.advance(3)
        progress.status(step=None, row="upper-bound")
        assert bar.n == 3 and bar.postfix == "row upper-bound, subject 1/2 duo_ball"
        progress.advance(1)
    assert not progress.active()
    assert "eval: 100%" in stderr.getvalue() and "4/4 [" in stderr.getvalue()


def test_quiet_and_worker_threads_draw_nothing(terminal):
    stderr = terminal()
    progress.set_quiet(True)
    with progress.task_bar(2, "generate"):
        progress.advance(2)
    progress.set_quiet(False)
    drawn: list[bool] = []

    def worker():  # as `limner app` runs generations: several at once, each in its own thread
        with progress.task_bar(2, "generate") as bar:
            drawn.append(not bar.disable)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert drawn == [False] and stderr.getvalue() == ""


def test_a_log_is_redrawn_rarely_a_terminal_often():
    assert progress.interval_s(Terminal()) == progress.TERMINAL_INTERVAL_S
    assert progress.interval_s(io.StringIO()) == progress.LOG_INTERVAL_S > 5
