"""The app as a running server (`limner app`, a process of its own, on a tiny base): 50 concurrent generate requests
through its HTTP API, then the server killed with -9 while a training runs and another waits, and started again.

Needs gradio (`pip install 'limner[app]'`, which the [test] extra installs); without it each case is a counted skip."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from limner.app.db import DONE, INTERRUPTED, QUEUED, RUNNING, JobStore
from limner.app.jobs import DATABASE, MAX_WAITING, JobQueue
from limner.app.tasks import GENERATE, LIGHT, TRAIN
from limner.errors import LimnerError

REQUESTS = 50


def needs_gradio(report, section: str, given: str, expected: str) -> None:
    try:
        import gradio  # noqa: F401
        import httpx  # noqa: F401
    except ImportError:
        report.case(section, "app", given, expected, "skipped: gradio is not installed (pip install 'limner[app]')")
        pytest.skip("the app server needs gradio: pip install 'limner[app]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`limner app` on a library, in its own process group."""

    def __init__(self, library: Path, base: Path, log: Path):
        self.library, self.base, self.port = library, base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
        args = ["app", "--library", str(library), "--port", str(self.port), "--base", str(base)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "limner.cli", *args],
            stdout=open(log, "ab"),  # noqa: SIM115 - the server's whole life
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.log = log
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/gradio_api/info", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise AssertionError(f"the app did not start: {log.read_text()}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def call(client, url: str, api: str, *data) -> object:
    """One call of a gradio endpoint over its REST API: POST starts it, the event stream brings its answer."""
    r = await client.post(f"{url}/gradio_api/call/{api}", json={"data": list(data)})
    r.raise_for_status()
    r = await client.get(f"{url}/gradio_api/call/{api}/{r.json()['event_id']}")
    lines = r.text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("event: ") and line != "event: heartbeat":
            event, payload = line[7:], lines[i + 1][6:]
            if event == "complete":
                return json.loads(payload)[0]
            raise AssertionError(f"{api}: {event} {payload}")
    raise AssertionError(f"{api}: no answer in {r.text!r}")


def generate_args(prompt: str, seed: int) -> list:
    # the Generate page's inputs: prompt, negative, seed, steps, guidance, images, scheduler, height, width, regions,
    # layout steps, concepts, reference images, the encoder method that reads them and its settings
    return [prompt, "", seed, 2, 5.0, 1, "ddim", None, None, False, None, [], None, None, ""]


async def until_finished(client, url: str, job_id: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await call(client, url, "job", job_id)
        if job["state"] not in (QUEUED, RUNNING):
            return job
        await asyncio.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish")


WORDS = ["red", "blue", "green", "ball", "cup", "beach", "forest", "snow", "city", "desk"]


def request(i: int) -> tuple[str, int]:
    """Request i's prompt and seed: no two alike, so each record can be matched to its request."""
    return f"a {WORDS[i % 10]} {WORDS[(i // 10) % 10]} ball", 1000 + i


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base):
    try:
        import gradio  # noqa: F401
    except ImportError:
        yield None
        return
    root = tmp_path_factory.mktemp("app-server")
    s = Server(root / "library", Path(tiny_base), root / "server.log")
    yield s
    s.kill()


def test_fifty_concurrent_generations(server, report):
    given = f"{REQUESTS} concurrent generate requests (httpx, asyncio) to a running `limner app`"
    expected = (
        "each answered with its image (its record's prompt and seed its own) or a queue-full message; none lost; "
        "server memory bounded"
    )
    needs_gradio(report, "load", given, expected)
    import httpx

    store = JobStore(server.library / DATABASE)
    queued_max, sampling = [0], threading.Event()

    def sample_queue():  # the longest the generation queue got, as the store says
        while not sampling.is_set():
            queued_max[0] = max(queued_max[0], len(store.list(kinds=LIGHT, states=(QUEUED,))))
            time.sleep(0.05)

    rss = [server.rss_mb()]

    def sample_memory():
        while not sampling.is_set():
            rss.append(server.rss_mb())
            time.sleep(0.2)

    async def one(client, i):
        prompt, seed = request(i)
        t0 = time.perf_counter()
        note = await call(client, server.url, "submit_generate", *generate_args(prompt, seed))
        found = re.match(r"job (\d+) queued", note)
        job = await until_finished(client, server.url, int(found[1])) if found else None
        return {"i": i, "prompt": prompt, "seed": seed, "note": note, "job": job, "s": time.perf_counter() - t0}

    async def all_of_them():
        limits = httpx.Limits(max_connections=REQUESTS)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))

    samplers = [threading.Thread(target=f, daemon=True) for f in (sample_queue, sample_memory)]
    for t in samplers:
        t.start()
    t0 = time.perf_counter()
    answers = asyncio.run(all_of_them())
    wall = time.perf_counter() - t0
    sampling.set()
    for t in samplers:
        t.join()

    drawn, full, wrong, images = [], [], [], set()
    for a in answers:
        if a["job"] is None:
            (full if "queue is full" in a["note"] else wrong).append(a)
            continue
        job = a["job"]
        record = json.loads(Path(job["result"]["record"]).read_text()) if job["state"] == DONE else {}
        paths = job["result"].get("images", [])
        mine = record.get("prompt") == a["prompt"] and record.get("settings", {}).get("seed") == a["seed"]
        if not mine or not paths or not all(map(os.path.exists, paths)):
            wrong.append(a)
            continue
        images.update(paths)
        drawn.append(a)
    latencies = sorted(a["s"] for a in drawn)

    def percentile(k: int) -> float:  # nearest rank: a latency some request had
        return latencies[max(0, math.ceil(k / 100 * len(latencies)) - 1)]

    peak, grew = max(rss), max(rss) - rss[0]
    report.case(
        "load",
        "app",
        given,
        expected,
        f"{len(drawn)} drawn, each record matching its request; {len(full)} told the queue is full; "
        f"{len(wrong)} lost or mixed up; {len(images)} distinct image files",
    )
    report.figure("load", "requests", f"{REQUESTS} at once, 1 image of 2 steps each (tiny base), 2 generation workers")
    report.figure("load", "answered", f"{len(drawn)} with their image, {len(full)} queue full, {len(wrong)} lost")
    report.figure(
        "load",
        "latency (request to image), s",
        f"p50 {percentile(50):.1f}, p90 {percentile(90):.1f}, p99 {percentile(99):.1f}, max {latencies[-1]:.1f}"
        if latencies
        else "-",
    )
    report.figure("load", "wall time for all, s", f"{wall:.1f}")
    report.figure("load", "longest generation queue", f"{queued_max[0]} waiting (refused beyond {MAX_WAITING})")
    report.figure("load", "server memory (RSS), MB", f"{rss[0]:.0f} before, {peak:.0f} peak (+{grew:.0f})")
    assert not wrong, wrong[:3]
    assert len(drawn) + len(full) == REQUESTS and len(images) == len(drawn)
    assert queued_max[0] <= MAX_WAITING
    assert grew < 1024, f"the server grew by {grew:.0f} MB"


def test_uploads_too_large_are_refused_before_they_are_stored(server, report, tmp_path):
    from limner.app.server import MAX_UPLOAD

    given = f"an upload of 51 MB (a reference image is a few MB; the app takes {MAX_UPLOAD})"
    expected = "HTTP 413 saying the file exceeds the maximum size; nothing kept in the library"
    needs_gradio(report, "bad input", given, expected)
    import httpx

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(51 * 1024 * 1024)
    before = sorted(p for p in server.library.rglob("*") if p.is_file() and "jobs.sqlite" not in p.name)
    with open(big, "rb") as f:
        r = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("huge.png", f, "image/png")}, timeout=120)
    after = sorted(p for p in server.library.rglob("*") if p.is_file() and "jobs.sqlite" not in p.name)
    report.case(
        "bad input",
        "app",
        given,
        expected,
        f"HTTP {r.status_code}: {r.text[:120]}",
        "yes" if before == after else f"no: {len(after) - len(before)} files added",
    )
    assert r.status_code == 413 and "exceeded maximum" in r.text, r.text
    assert before == after


def test_an_upload_named_with_a_path_stays_in_the_upload_folder(server, report, tmp_path):
    given = "an upload whose file name is '../../evil.png' (a client may send any name)"
    expected = (
        "stored under gradio's upload folder by its plain name; the references saved as ref00.png in the library"
    )
    needs_gradio(report, "bad input", given, expected)
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from limner.app import library as lib

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(buf, format="PNG")
    r = httpx.post(
        f"{server.url}/gradio_api/upload", files={"files": ("../../evil.png", buf.getvalue(), "image/png")}, timeout=60
    )
    stored = Path(r.json()[0]) if r.status_code == 200 else None
    escaped = [p for p in (stored.parents[1], stored.parents[2]) if (p / "evil.png").exists()] if stored else []
    saved = lib.save_references(server.library / lib.UPLOADS / "named", [stored]) if stored else None
    names = sorted(p.name for p in saved.iterdir()) if saved else []
    report.case(
        "bad input",
        "app",
        given,
        expected,
        f"HTTP {r.status_code}: stored as {stored.name if stored else '-'} in a folder of gradio's uploads; "
        f"beside that folder: {escaped or 'nothing'}; saved references {names}",
    )
    assert r.status_code == 200 and stored.name == "evil.png" and not escaped
    assert names == ["ref00.png"]


def test_a_full_queue_refuses_at_once():
    q = JobQueue(Path(os.environ["LIMNER_CACHE"]) / "full-queue", max_waiting=2)  # no workers: nothing leaves it
    q.submit(GENERATE, {"prompt": "a"})
    q.submit(GENERATE, {"prompt": "b"})
    with pytest.raises(LimnerError, match="the queue is full: 2 generations are waiting"):
        q.submit(GENERATE, {"prompt": "c"})
    q.submit(TRAIN, {"name": "x"})  # the training lane is its own


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_the_server_killed_with_jobs_running_loses_none(server, report, tmp_path):
    given = (
        "`limner app` killed with -9 while a training runs (its child process outliving it), another training waits "
        "and earlier generations are done; then started again on the same library"
    )
    expected = (
        "every job still listed: the generations done with their images, the running training interrupted (its "
        "process ended, offered for resume from its checkpoint), the waiting one run"
    )
    needs_gradio(report, "faults", given, expected)
    import httpx
    from helpers import image_folder

    refs = image_folder(tmp_path / "refs", n=2)
    store = JobStore(server.library / DATABASE)

    def training(name: str, steps: int) -> int:
        out = server.library / "concepts" / name
        out.mkdir(parents=True)
        params = {"name": name, "method": "textual_inversion", "subject": str(refs), "class_noun": "ball"}
        return store.add(TRAIN, params | {"steps": steps, "out": str(out), "settings": {"checkpoint_every": "1"}})

    long, short = training("long", 100000), training("short", 2)
    deadline = time.monotonic() + 180
    while not list((server.library / "concepts" / "long" / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline, "the training made no checkpoint"
        time.sleep(0.2)
    running = store.get(long)
    before = {j.id: j for j in store.list()}
    server.kill()
    assert running.state == RUNNING and alive(running.pid)  # the training's process outlived the server
    again = Server(server.library, server.base, server.log)  # started again on the same library
    try:

        async def states():
            async with httpx.AsyncClient(timeout=60) as client:
                short_job = await until_finished(client, again.url, short)
                return short_job, [await call(client, again.url, "job", j) for j in before]

        short_job, after = asyncio.run(states())
        after = {j["id"]: j for j in after}
        long_job = after[long]
        lost = [j for j in before if after[j]["state"] is None]
        done_before = [j for j, job in before.items() if job.state == DONE]
        still_done = [
            j
            for j in done_before
            if after[j]["state"] == DONE and all(map(os.path.exists, after[j]["result"].get("images", [])))
        ]
        checkpoints = sorted(p.name for p in (server.library / "concepts" / "long" / "checkpoints").glob("step-*"))
        report.case(
            "faults",
            "app",
            given,
            expected,
            f"{len(before)} jobs before, {len(before) - len(lost)} listed after; {len(still_done)}/{len(done_before)} "
            f"done generations still done with their images; the killed training {long_job['state']} "
            f"({long_job['error']}), its process {'still alive' if alive(running.pid) else 'ended'}, "
            f"{len(checkpoints)} checkpoint(s) to resume from; the waiting training {short_job['state']}",
        )
        assert not lost
        assert len(still_done) == len(done_before)
        assert long_job["state"] == INTERRUPTED and "resume" in long_job["error"] and not alive(running.pid)
        assert checkpoints and short_job["state"] == DONE
    finally:
        again.kill()
        if alive(running.pid):  # a failure above must not leave a 100000-step training behind
            os.killpg(running.pid, signal.SIGKILL)
