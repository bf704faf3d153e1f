"""The app's jobs with the real runners on the world base, for what the browser test does not reach: an encoder
method (IP-Adapter) personalized from the Personalize form's parameters, its concept then drawn by a Generate job,
and reference images given to a Generate job directly (encoded on the fly, as `limner generate --image`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from limner.app.db import DONE, FAILED, FINISHED
from limner.app.jobs import JobQueue
from limner.app.tasks import GENERATE, TRAIN


def finished(queue: JobQueue, job_id: int, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.store.get(job_id)
        if job.state in FINISHED:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture
def queue(tmp_path):
    q = JobQueue(tmp_path / "library").start()  # the world base, as `limner app` opens
    yield q
    q.stop()


def test_an_encoder_method_personalizes_from_the_form_and_draws(queue, tmp_path, report):
    from helpers import image_folder

    from limner.app import library as lib

    refs = lib.save_references(queue.library / lib.UPLOADS / "ball", list(image_folder(tmp_path / "refs").iterdir()))
    out = queue.library / lib.CONCEPTS / "ball-ip_adapter"
    out.mkdir(parents=True)
    # what personalize_params makes of an upload, the form's steps left empty (an encoder method trains nothing)
    params = {"name": out.name, "method": "ip_adapter", "subject": str(refs), "class_noun": "ball", "steps": None}
    t0 = time.monotonic()
    trained = finished(queue, queue.submit(TRAIN, params | {"out": str(out), "settings": {}}))
    seconds = time.monotonic() - t0
    drawn = None
    if trained.state == DONE:
        drawn = finished(
            queue,
            queue.submit(
                GENERATE, {"prompt": "a ball on the beach", "steps": 2, "num_images": 1, "concepts": [str(out)]}
            ),
        )
    report.case(
        "app workflows",
        "app",
        "Personalize with IP-Adapter (an encoder method) from uploaded references, then Generate with the concept",
        "the job done in seconds with an ip_adapter concept in the library; the Generate job draws with it",
        f"personalize {trained.state} in {seconds:.0f} s ({trained.error or 'no error'}); "
        f"generate {drawn.state if drawn else '-'} ({(drawn.error if drawn else None) or 'no error'})",
    )
    assert trained.state == DONE, trained.error
    assert json.loads((out / "limner.json").read_text())["method"] == "ip_adapter"
    assert [e.name for e in lib.entries(queue.library)] == [out.name]
    assert drawn.state == DONE and all(Path(p).exists() for p in drawn.result["images"]), drawn.error


def test_generate_takes_reference_images(queue, tmp_path, report):
    """The Generate page's reference images: saved in the library as a subject's images, encoded by the chosen
    encoder method when the job runs, and named in the command line that draws the same again."""
    from helpers import image_folder

    from limner.app import library as lib

    refs = lib.save_references(queue.library / lib.UPLOADS / "generate", list(image_folder(tmp_path / "r").iterdir()))
    images = [str(p) for p in sorted(refs.glob("*.png"))]
    params = {"prompt": "a photo of a subject", "steps": 2, "num_images": 1, "seed": 3, "guidance": 5.0}
    params |= {"scheduler": "dpm++", "images": images, "method": "ip_adapter"}
    job = finished(queue, queue.submit(GENERATE, params))
    try:  # the page's own line (the page needs gradio; the job does not)
        from limner.app.ui import generate_command

        command = generate_command(params)
    except ImportError:
        command = None
    report.case(
        "app workflows",
        "app",
        "Generate with 2 reference images and IP-Adapter (no concept)",
        "the job done, its image drawn from the encoded references; the command line names --method and each --image",
        f"generate {job.state} ({job.error or 'no error'}); command: {command}",
    )
    assert job.state == DONE and all(Path(p).exists() for p in job.result["images"]), job.error
    assert command is None or ("--method ip_adapter" in command and command.count("--image") == 2)
    # the encoder's settings reach it (`--set`): a scale it takes draws, a setting it lacks fails the job by name
    scaled = finished(queue, queue.submit(GENERATE, params | {"settings": ["scale=0.5"]}))
    unknown = finished(queue, queue.submit(GENERATE, params | {"settings": ["nonsense=1"]}))
    assert scaled.state == DONE, scaled.error
    assert unknown.state == FAILED and "no setting 'nonsense'" in unknown.error
    assert command is None or "--set scale=0.5" in generate_command(params | {"settings": ["scale=0.5"]})
