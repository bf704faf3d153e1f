"""The app's job queue and its SQLite store, without a browser or gradio: states, lanes, cancel, resume, and a
restart that loses nothing. Runners are stand-ins (the real ones run limner's commands: test_app_browser.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from limner.app.db import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, JobStore
from limner.app.jobs import DATABASE, JobQueue
from limner.app.tasks import COMPARE, EVAL, GENERATE, TRAIN, JobFailed, parse_progress, run_command, train_command
from limner.errors import LimnerError


def wait_for(queue: JobQueue, job_id: int, states: tuple[str, ...], timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.store.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {queue.store.get(job_id).state}, wanted {states}")


def test_store_keeps_jobs_across_connections(tmp_path):
    store = JobStore(tmp_path / DATABASE)
    a = store.add(TRAIN, {"name": "dog", "steps": 3})
    b = store.add(GENERATE, {"prompt": "a dog"})
    assert store.claim((GENERATE,)).id == b
    store.update(b, state=DONE, result={"images": ["x.png"]})
    again = JobStore(tmp_path / DATABASE)  # a restarted server opens the same file
    assert [j.id for j in again.list()] == [b, a]
    assert again.get(a).state == QUEUED and again.get(a).params == {"name": "dog", "steps": 3}
    done = again.get(b)
    assert done.state == DONE and done.result == {"images": ["x.png"]} and done.finished is not None
    assert again.get(a).name == "dog" and done.name == "a dog"
    assert [j.id for j in again.list(kinds=(TRAIN,))] == [a]


def test_jobs_run_outside_the_caller_and_record_their_state(tmp_path):
    def ok(job, ctx):
        return {"echo": job.params["x"]}

    def bad(job, ctx):
        raise LimnerError("--steps -1 must be at least 1")

    def bug(job, ctx):
        raise ValueError("oops")

    q = JobQueue(tmp_path, runners={GENERATE: ok, COMPARE: bad, EVAL: bug}).start()
    try:
        good, failed, crashed = q.submit(GENERATE, {"x": 1}), q.submit(COMPARE, {}), q.submit(EVAL, {})
        assert wait_for(q, good, (DONE,)).result == {"echo": 1}
        assert wait_for(q, failed, (FAILED,)).error == "--steps -1 must be at least 1"
        assert wait_for(q, crashed, (FAILED,)).error == "ValueError: oops"
        assert "Traceback" in (q.folder(crashed) / "log.txt").read_text()  # the page shows a line, the log the rest
        with pytest.raises(LimnerError, match="unknown job kind"):
            q.submit("paint", {})
    finally:
        q.stop()


def test_one_training_at_a_time_and_several_generations(tmp_path):
    running = {"heavy": 0, "light": 0, "max_heavy": 0, "max_light": 0}
    lock, release = threading.Lock(), threading.Event()

    def runner(lane):
        def run(job, ctx):
            with lock:
                running[lane] += 1
                running[f"max_{lane}"] = max(running[f"max_{lane}"], running[lane])
            release.wait(10)
            with lock:
                running[lane] -= 1
            return {}

        return run

    q = JobQueue(tmp_path, light_workers=2, runners={TRAIN: runner("heavy"), GENERATE: runner("light")}).start()
    try:
        trains = [q.submit(TRAIN, {}) for _ in range(2)]
        gens = [q.submit(GENERATE, {}) for _ in range(3)]
        time.sleep(1.0)
        assert q.store.get(trains[1]).state == QUEUED  # the second training waits for the first
        assert sum(q.store.get(g).state == RUNNING for g in gens) == 2
        release.set()
        for j in trains + gens:
            wait_for(q, j, (DONE,))
        assert running["max_heavy"] == 1 and running["max_light"] == 2
    finally:
        q.stop()


def test_cancel_a_queued_job_and_a_running_command(tmp_path):
    started = threading.Event()

    def slow_command(job, ctx):
        started.set()
        # a stand-in for `limner train`: prints a progress bar as tqdm does, then works until ended
        script = (
            "import sys, time; sys.stderr.write('train:  10%|#  | 1/10 [00:01<00:09, loss=0.25]\\r'); time.sleep(60)"
        )
        if run_command([sys.executable, "-c", script, "limner"], ctx) != 0:
            raise JobFailed("ended")
        return {}

    q = JobQueue(tmp_path, runners={TRAIN: slow_command}).start()
    try:
        first, second = q.submit(TRAIN, {}), q.submit(TRAIN, {})
        assert started.wait(10)
        assert q.cancel(second) == f"job {second} cancelled before it started"
        job = wait_for(q, first, (RUNNING,))
        deadline = time.monotonic() + 10
        while not q.store.get(first).progress.get("step") and time.monotonic() < deadline:
            time.sleep(0.05)
        progress = q.store.get(first).progress
        assert (progress["step"], progress["total"], progress["loss"], progress["left_s"]) == (1, 10, 0.25, 9.0)
        assert q.store.get(first).pid is not None
        assert q.cancel(first) == f"job {first} cancelling"
        job = wait_for(q, first, (CANCELLED,))
        assert job.error is None and job.pid is None
        assert q.store.get(second).state == CANCELLED
        assert "cancelled" in q.cancel(first)  # a finished job: nothing to do, said so
    finally:
        q.stop()


def test_a_restart_marks_what_ran_interrupted_ends_its_process_and_resumes_it(tmp_path):
    # the last server died with a training running: its row says running, its process lives on
    store = JobStore(tmp_path / DATABASE)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "limner"], start_new_session=True)
    training = store.add(TRAIN, {"name": "dog", "method": "textual_inversion", "subject": "s", "out": "o"})
    generation = store.add(GENERATE, {"prompt": "a dog"})
    waiting = store.add(GENERATE, {"prompt": "a cat"})
    store.claim((TRAIN,))
    store.claim((GENERATE,))
    store.update(training, pid=orphan.pid)
    seen = []

    def record(job, ctx):
        seen.append((job.id, job.params.get("resume")))
        return {}

    q = JobQueue(tmp_path, runners={TRAIN: record, GENERATE: record})
    assert sorted(q.recover()) == [training, generation]
    assert orphan.wait(15) is not None  # its process group was ended, so its checkpoints stop changing
    job = q.store.get(training)
    assert job.state == INTERRUPTED and "resume it" in job.error
    assert q.store.get(generation).state == INTERRUPTED
    q.start()
    try:
        wait_for(q, waiting, (DONE,))  # queued jobs simply run after a restart
        assert q.store.get(training).state == INTERRUPTED  # until someone resumes it
        assert q.resume(training) == f"job {training} queued to resume"
        assert q.resume(generation) == f"job {generation} queued to run again"
        wait_for(q, training, (DONE,))
        wait_for(q, generation, (DONE,))
        assert (training, True) in seen and (generation, None) in seen
        assert "only" in q.resume(training)  # a finished job does not resume
    finally:
        q.stop()


def test_progress_is_read_from_the_commands_own_bar():
    bar = (
        "textual inversion duo_ball:   0%|          | 0/2 [00:00<?, ?it/s]\r"
        "textual inversion duo_ball:  50%|#####     | 1/2 [00:01<00:01,  1.41it/s, loss=0.0938, lr=5.00e-03]\r"
    )
    assert parse_progress(bar) == {
        "stage": "textual inversion duo_ball",
        "step": 1,
        "total": 2,
        "elapsed_s": 1.0,
        "left_s": 1.0,
        "loss": 0.0938,
    }
    assert parse_progress("loading pipeline") is None
    assert parse_progress("x: 10%|#| 3/30 [1:00:02<?, ?it/s]")["elapsed_s"] == 3602.0


def test_training_command_is_what_a_person_would_type():
    params = {
        "method": "dreambooth_lora",
        "subject": "world:duo_ball",
        "out": "lib/concepts/ball",
        "class_noun": "ball",
        "steps": 4,
        "settings": {"lora_rank": "8"},
    }
    argv = train_command(params, base=None)
    assert argv[1:4] == ["-m", "limner.cli", "train"]
    assert argv[4:] == [
        "--method", "dreambooth_lora", "--subject", "world:duo_ball", "--out", "lib/concepts/ball",
        "--class-noun", "ball", "--steps", "4", "--set", "lora_rank=8",
    ]  # fmt: skip
    resumed = train_command(dict(params, resume=True), base="/models/sd15")
    assert resumed[-4:] == ["--resume", "latest", "--base", "/models/sd15"]


def test_names_typed_in_the_app_stay_inside_the_library(tmp_path):
    from limner.app.library import safe_name, unique_name

    assert safe_name(" ball-a ") == "ball-a"
    for bad in ("../x", "/etc/x", "a/b", "..", ".hidden", "", "a" * 81):
        with pytest.raises(LimnerError, match="use letters, digits"):
            safe_name(bad)
    (tmp_path / "ball").mkdir()
    assert unique_name(tmp_path, "ball") == "ball-2"


def test_the_app_listens_locally_unless_told_and_then_warns():
    from limner.app.server import host_warning

    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "no login" in host_warning("0.0.0.0")
