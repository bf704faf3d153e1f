"""The app's job queue: jobs run in worker threads, never in a request handler, and their state lives in the
library's SQLite store (`db`), so every page and every later server sees it.

Two lanes: one worker for the heavy jobs (a training or an evaluation: one at a time, as a CPU machine can
carry) and a few for generations, which take about a second each on the world base. A job cancelled while
queued never starts; a running training's process group is ended. When the server starts, jobs the last
server left running are marked interrupted (a training's child process, if it outlived the server, is ended
first, so its checkpoints stop changing) and offered for resume; queued jobs simply run.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from limner.app.db import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, Job, JobStore
from limner.app.tasks import HEAVY, KINDS, LIGHT, RUNNERS, TRAIN, Context, JobFailed, end_process_group
from limner.errors import LimnerError

DATABASE = "jobs.sqlite"
RESUMABLE = (INTERRUPTED, CANCELLED, FAILED)
# generations waiting at most: beyond it a request is told the queue is full at once, rather than waiting minutes
# behind the others (or, with many clients, without end) while its page shows nothing
MAX_WAITING = 32


def pid_is_ours(pid: int) -> bool:
    """Whether `pid` is alive and a limner command (a pid left in the database may have been reused since)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"limner" in f.read()
    except (OSError, ProcessLookupError):
        return False


class JobQueue:
    """The jobs of one library folder (`jobs.sqlite` beside its concepts)."""

    def __init__(
        self,
        library: Path,
        base: str | None = None,
        light_workers: int = 2,
        runners: dict[str, Callable[[Job, Context], dict[str, Any]]] | None = None,
        max_waiting: int = MAX_WAITING,
    ):
        self.library = Path(library)
        self.max_waiting = max_waiting
        self.base = base
        self.store = JobStore(self.library / DATABASE)
        self.runners = runners or RUNNERS
        self.light_workers = light_workers
        self._wake = threading.Condition()
        self._admit = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle
    def start(self) -> JobQueue:
        self.recover()
        lanes = [HEAVY] + [LIGHT] * self.light_workers
        for i, kinds in enumerate(lanes):
            t = threading.Thread(target=self._work, args=(kinds,), name=f"limner-jobs-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout)

    def recover(self) -> list[int]:
        """Jobs a previous server left running: ended if still alive, then marked interrupted. Returns their ids."""
        found = []
        for job in self.store.list(states=(RUNNING,)):
            if job.pid and pid_is_ours(job.pid):
                end_process_group(job.pid)
            resume = "resume it to continue from its last checkpoint" if job.kind == TRAIN else "run it again"
            self.store.update(job.id, state=INTERRUPTED, error=f"the server stopped while it ran; {resume}", pid=None)
            found.append(job.id)
        return found

    # ---- what pages ask
    def folder(self, job_id: int) -> Path:
        return self.library / "jobs" / str(job_id)

    def submit(self, kind: str, params: dict[str, Any]) -> int:
        if kind not in KINDS:
            raise LimnerError(f"unknown job kind {kind!r}; known: {', '.join(KINDS)}")
        if kind in LIGHT:
            with self._admit:  # counted and added as one step: two requests never both take the last place
                waiting = len(self.store.list(kinds=LIGHT, states=(QUEUED,)))
                if waiting >= self.max_waiting:
                    raise LimnerError(
                        f"the queue is full: {waiting} generations are waiting; try again when some have finished"
                    )
                job_id = self.store.add(kind, params)
        else:
            job_id = self.store.add(kind, params)
        with self._wake:
            self._wake.notify_all()
        return job_id

    def cancel(self, job_id: int) -> str:
        """Cancels a queued or running job; returns what happened, in words."""
        job = self.store.get(job_id)
        if job is None:
            return f"no job {job_id}"
        if job.state == QUEUED:
            self.store.update(job_id, state=CANCELLED)
            return f"job {job_id} cancelled before it started"
        if job.state != RUNNING:
            return f"job {job_id} is {job.state}: nothing to cancel"
        self.store.update(job_id, cancel_requested=1)
        if job.pid:  # the worker sees the process end and records the job as cancelled
            threading.Thread(target=end_process_group, args=(job.pid,), daemon=True).start()
        return f"job {job_id} cancelling"

    def resume(self, job_id: int) -> str:
        """Queues an interrupted, cancelled or failed job again: a training continues from its last checkpoint
        (`--resume latest` in its concept folder), any other job runs again."""
        job = self.store.get(job_id)
        if job is None:
            return f"no job {job_id}"
        if job.state not in RESUMABLE:
            return f"job {job_id} is {job.state}: only {', '.join(RESUMABLE)} jobs resume"
        params = dict(job.params, resume=True) if job.kind == TRAIN else job.params
        self.store.update(job_id, state=QUEUED, params=params, error=None, cancel_requested=0, progress={})
        with self._wake:
            self._wake.notify_all()
        return f"job {job_id} queued to " + ("resume" if job.kind == TRAIN else "run again")

    # ---- workers
    def _work(self, kinds: tuple[str, ...]) -> None:
        while not self._stop.is_set():
            job = self.store.claim(kinds)
            if job is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        folder = self.folder(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        ctx = Context(
            library=self.library,
            base=self.base,
            log=folder / "log.txt",
            report=lambda progress: self.store.update(job.id, progress=progress),
            started=lambda pid: self.store.update(job.id, pid=pid),
            cancelled=lambda: bool((j := self.store.get(job.id)) and j.cancel_requested),
        )
        try:
            result = self.runners[job.kind](job, ctx)
        except (JobFailed, LimnerError) as e:
            state = CANCELLED if ctx.cancelled() else FAILED
            self.store.update(job.id, state=state, error=None if state == CANCELLED else str(e), pid=None)
            return
        except Exception as e:  # a bug, not the user's input: the page shows one line, the log the traceback
            with open(ctx.log, "a") as log:
                log.write(traceback.format_exc())
            self.store.update(job.id, state=FAILED, error=f"{type(e).__name__}: {e}", pid=None)
            return
        self.store.update(job.id, state=CANCELLED if ctx.cancelled() else DONE, result=result, pid=None)
