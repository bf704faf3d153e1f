"""`limner app` end to end in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, doing
what a person does on the world base: upload 3 reference images and train, watch the progress bar move, cancel a
training and resume it to the end, generate with the new concept, find it in the library (rename, export, delete
with confirmation), compare two concepts, evaluate one, reload the page and find every job still listed.

Skipped, saying how to enable it, where chromium or Playwright is missing (`.ci/run` installs chromium).
`LIMNER_APP_SCREENSHOTS=docs/app` also saves a screenshot of each tab there (the README's come from this).
Steps are tiny (a few training and denoising steps): the test checks the app, not the pictures.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

HOW = (
    "the browser tests need Debian's chromium and Playwright for Python: `apt-get install -y chromium` and "
    "`pip install -e '.[test]'` (or set LIMNER_CHROMIUM to a Chromium binary); .ci/run does both"
)
CHROMIUM = os.environ.get("LIMNER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None
try:
    import gradio  # noqa: F401

    HAS_GRADIO = True
except ImportError:  # pragma: no cover
    HAS_GRADIO = False

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None or not HAS_GRADIO, reason=f"no browser or no gradio: {HOW}"
)
SHOTS = os.environ.get("LIMNER_APP_SCREENSHOTS")
TIMEOUT_MS = 60_000
if sync_playwright is not None:
    expect.set_options(timeout=TIMEOUT_MS)  # the page waits on jobs that share 2 CPU cores with everything else


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(library: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "limner.cli", "app", "--library", str(library), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"limner app exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"limner app did not listen on {port}: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    port = free_port()
    proc = start_server(root / "library", port, root / "server.log")
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "library": root / "library", "root": root, "port": port}
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def references(folder: Path, n: int = 3) -> list[str]:
    """n reference pictures of a world-bench subject, as a person's files."""
    from limner.world.bench import subject_by_name, subject_references

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, r in enumerate(subject_references(subject_by_name("duo_ball"), count=n)):
        path = folder / f"photo{i}.png"
        r.pil().resize((128, 128)).save(path)
        paths.append(str(path))
    return paths


def field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def labelled(page, label: str):
    return page.get_by_label(label, exact=True).first


def choose(page, elem_id: str, option: str) -> None:
    """Picks an option of a gradio dropdown (single or multiselect) as a person does: type to filter, click it.
    The list redraws as the page refreshes, so a click that lands on a redrawn list is tried again."""
    box = field(page, elem_id)
    for _ in range(10):
        box.blur()  # the list opens as the field takes the focus
        box.click()
        box.fill(option)
        try:
            page.get_by_role("option", name=option).first.click(timeout=3000)
            break
        except PlaywrightTimeout:
            pass
    else:
        raise AssertionError(f"could not pick {option!r} in #{elem_id}")
    box.blur()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def training_state(page) -> tuple[str, int]:
    box = page.locator("#limner-progress")
    state = box.locator(".limner-state").inner_text() if box.count() else ""
    step = box.locator(".limner-step")
    return state, int(step.inner_text()) if step.count() else 0


def wait_training(page, states: tuple[str, ...], timeout_s: float = 180) -> list[int]:
    """Waits for the latest training to reach one of `states`; returns the steps the bar showed on the way."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, step = training_state(page)
        if not seen or seen[-1] != step:
            seen.append(step)
        if state in states:
            return seen
        if state == "failed":
            raise AssertionError(page.locator("#limner-progress").inner_text())
        time.sleep(0.2)
    raise AssertionError(f"training stayed {training_state(page)}; wanted {states}")


def shoot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def concept_label(name: str) -> str:
    return f"{name} (textual_inversion)"


def test_a_person_personalizes_generates_compares_and_finds_everything_after_a_reload(app, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app["url"])

    # -- Personalize: 3 uploaded pictures, a class noun, a short Textual Inversion, the bar moving to the end
    page.locator("#refs input[type=file]").set_input_files(references(app["root"] / "photos"))
    labelled(page, "class noun").fill("ball")
    field(page, "name").fill("ball-a")
    choose(page, "method", "textual_inversion (tuning)")  # the fastest to train; the form follows the method
    expect(page.get_by_text("textual_inversion: tuning method")).to_be_visible()
    field(page, "steps").fill("8")
    page.locator("#start").click()
    expect(page.locator("#start-note")).to_contain_text("queued")
    seen = wait_training(page, ("done",))
    assert seen[-1] == 8 and len(set(seen)) >= 2, seen  # the bar moved from where it started to the last step
    assert (app["library"] / "concepts" / "ball-a" / "limner.json").exists()
    refs = sorted((app["library"] / "references").glob("*/*.png"))
    assert len(refs) == 3

    # -- a second training, from a world-bench subject with a checkpoint every 4 steps: cancelled, then resumed
    labelled(page, "world-bench subject").check()
    field(page, "name").fill("ball-b")
    field(page, "steps").fill("16")
    page.get_by_text("trainer settings").click()
    field(page, "setting-checkpoint_every").fill("4")
    page.locator("#start").click()
    checkpoints = app["library"] / "concepts" / "ball-b" / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(checkpoints.glob("step-*")):
        time.sleep(0.3)
    shoot(page, "personalize")
    page.locator("#cancel-train").click()
    wait_training(page, ("cancelled",))
    assert not (app["library"] / "concepts" / "ball-b" / "limner.json").exists()
    choose(page, "resumable", "job 2: ball-b (cancelled)")
    page.locator("#resume-train").click()
    wait_training(page, ("done",))
    log = (app["library"] / "jobs" / "2" / "log.txt").read_text()
    assert re.search(r"resuming at step \d+/16", log), log[-2000:]

    # -- Evaluate concept A on its world subject in the heavy lane while the light lane generates and compares
    tab(page, "Evaluate")
    choose(page, "e-concept", concept_label("ball-a"))
    labelled(page, "subjects: world:NAME (the world bench) or a folder of reference images").fill("world:duo_ball")
    labelled(page, "prompts (empty: all)").fill("1")
    labelled(page, "steps").fill("4")
    page.locator("#evaluate").click()

    # -- Generate with concept A: its token offered for the prompt
    tab(page, "Generate")
    choose(page, "g-concepts", concept_label("ball-a"))
    field(page, "g-prompt").fill("on the beach")
    page.get_by_role("button", name="Add the concepts' tokens to the prompt").click()
    expect(field(page, "g-prompt")).to_have_value(re.compile(r"on the beach a \S+ ball"))
    field(page, "g-steps").fill("4")
    field(page, "g-n").fill("2")
    page.locator("#generate").click()
    expect(page.locator("#g-gallery img")).to_have_count(2, timeout=TIMEOUT_MS)
    expect(page.get_by_text("limner generate")).to_be_visible()
    shoot(page, "generate")

    # -- Compare the two concepts with one prompt and seed
    tab(page, "Compare")
    choose(page, "c-concepts", concept_label("ball-a"))
    choose(page, "c-concepts", concept_label("ball-b"))
    field(page, "c-steps").fill("4")
    field(page, "c-n").fill("1")
    page.locator("#compare").click()
    expect(page.locator("#c-grid img")).to_have_count(1, timeout=TIMEOUT_MS)
    shoot(page, "compare")

    # -- Library: the new concept with its card and loss plot; export; rename and delete (after a confirmation)
    tab(page, "Library")
    page.get_by_role("button", name="Refresh").click()
    choose(page, "l-pick", concept_label("ball-a"))
    expect(page.locator("#l-card")).to_contain_text("textual_inversion")
    expect(page.locator("#l-info")).to_contain_text("ball")
    exported = app["library"] / ".exports" / "ball-a.zip"
    page.get_by_role("button", name="Export (zip)").click()
    expect(page.locator("#l-zip")).to_contain_text(re.compile(r"ball-a\s*\.zip"))  # name and suffix: 2 spans
    assert exported.exists()
    with zipfile.ZipFile(exported) as z:
        names = z.namelist()
    assert "ball-a/limner.json" in names and not any("checkpoints" in n for n in names), names
    shoot(page, "library")
    choose(page, "l-pick", concept_label("ball-b"))
    labelled(page, "new name").fill("ball-b2")
    page.get_by_role("button", name="Rename").click()
    expect(page.locator("#l-note")).to_contain_text("renamed to")
    page.locator("#l-delete").click()
    expect(page.get_by_text("Delete ball-b2 and its files?")).to_be_visible()
    assert (app["library"] / "concepts" / "ball-b2").exists()  # nothing goes before the confirmation
    page.locator("#l-confirm").click()
    expect(page.locator("#l-note")).to_contain_text("deleted")
    assert not (app["library"] / "concepts" / "ball-b2").exists()

    # -- the evaluation's scores and report in the page
    tab(page, "Evaluate")
    expect(page.locator("#e-table")).to_contain_text("subject fidelity", timeout=TIMEOUT_MS)
    shoot(page, "evaluate")

    # -- a reload (and a second tab) lists the same jobs, with their states
    page.reload()
    other = browser.new_page()
    for p in (page, other):
        p.goto(app["url"])
        table = p.locator("#jobs")
        expect(table).to_contain_text("ball-a", timeout=TIMEOUT_MS)
        expect(table).to_contain_text("ball-b")
        for kind in ("train", "generate", "compare", "eval"):
            expect(table).to_contain_text(kind)
    shoot(page, "jobs")
    other.close()
    page.close()
