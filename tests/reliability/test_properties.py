"""Property tests (hypothesis) for everything that parses what a user typed or gave as a file: `--set` settings,
regional prompts, subject manifests, concept manifests, captions files and image files. Whatever the input, the
answer is a value or a LimnerError, never another exception."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limner.errors import LimnerError

EXAMPLES = 150
FAST = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)

# text as people type it and as files hold it: any unicode, and the characters parsers split on, often
TEXT = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.sampled_from(["=", ",", " ", "BREAK", "none", "1e3", "-5", "nan", "true", "../", "/", "\n", "<s*>"])
    ).map("".join),
)


class Tally:
    """Counts what each example gave: a value, a LimnerError, or anything else (the failure)."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def run(self, call):
        try:
            value = call()
        except LimnerError:
            self.counts["LimnerError"] += 1
            return None
        except Exception as e:
            self.counts[f"{type(e).__name__} (a defect)"] += 1
            raise
        self.counts["value"] += 1
        return value

    def said(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))


def record(report, given_text: str, tally: Tally) -> None:
    report.case(
        "properties",
        "API",
        given_text,
        "a value or a LimnerError for every example",
        tally.said() or "no example ran",
    )


def test_set_settings(report):
    from limner.methods import get_method, method_names
    from limner.methods.settings import command_line_settings

    tally = Tally()
    names = method_names()
    keys = sorted({"flip", "num_vectors", "learning_rate", "max_steps", "lora_rank", "identifier", "mode", "nosuch"})

    @FAST
    @given(st.sampled_from(names), st.lists(st.tuples(st.sampled_from(keys) | TEXT, TEXT), max_size=3), st.booleans())
    def check(method, pairs, with_equals):
        items = [f"{k}={v}" if with_equals else f"{k}{v}" for k, v in pairs]
        tally.run(lambda: command_line_settings(get_method(method), items))

    try:
        check()
    finally:
        record(report, f"{EXAMPLES} random `--set KEY=VALUE` lists for every method", tally)


def test_regional_prompts(report):
    from limner.regions import prompt_names, split_regions

    tally = Tally()

    prompts = st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=4).map(" BREAK ".join))

    @FAST
    @given(prompts, st.lists(TEXT, max_size=3))
    def check(prompt, tokens):
        parts = tally.run(lambda: split_regions(prompt))
        if parts is not None:
            assert len(parts) >= 2 and all(parts)
            for part in parts:
                prompt_names(part, tokens)

    try:
        check()
    finally:
        record(report, f"{EXAMPLES} random regional prompts (split at BREAK, tokens looked up in each region)", tally)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(TEXT | st.sampled_from(["path", "name"]), inner, max_size=3)
    ),
    max_leaves=8,
)


def test_subject_manifests(report, tmp_path_factory):
    from helpers import image_folder

    from limner.evaluation.subjects import load_subjects

    root = tmp_path_factory.mktemp("manifests")
    image_folder(root / "refs")
    tally = Tally()

    @FAST
    @given(
        st.one_of(
            JSON,
            st.lists(
                st.fixed_dictionaries(
                    {"path": st.sampled_from(["refs", "../refs", "missing", "/etc", ""]) | TEXT},
                    optional={"name": TEXT, "class_noun": TEXT},
                ),
                max_size=2,
            ),
        ),
        st.booleans(),
    )
    def check(content, raw_bytes):
        path = root / "subjects.json"
        if raw_bytes:
            path.write_bytes(json.dumps(content).encode()[:-1] + b"\xff")  # cut and not UTF-8
        else:
            path.write_text(json.dumps(content))
        tally.run(lambda: load_subjects(str(path), None))

    try:
        check()
    finally:
        record(report, f"{EXAMPLES} random subject manifests (JSON of any shape, cut or not UTF-8)", tally)


def test_concept_manifests(report):
    from limner.concepts import read_manifest

    tally = Tally()

    @FAST
    @given(st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60)))
    def check(content):
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "limner.json").write_bytes(content)
            manifest = tally.run(lambda: read_manifest(Path(folder)))
            assert manifest is None or isinstance(manifest, dict)

    try:
        check()
    finally:
        record(report, f"{EXAMPLES} random limner.json files (any JSON, any bytes): a dict or a LimnerError", tally)


def test_captions_files(report, tmp_path_factory):
    from helpers import image_folder

    from limner.evaluation.subjects import load_captions

    folder = image_folder(tmp_path_factory.mktemp("captions") / "refs", n=2)
    tally = Tally()

    @FAST
    @given(st.one_of(TEXT.map(str.encode), st.binary(max_size=80)), st.booleans())
    def check(content, both):
        (folder / "0.txt").write_bytes(content)
        (folder / "1.txt").unlink(missing_ok=True)
        if both:
            (folder / "1.txt").write_bytes(content[::-1])
        captions = tally.run(lambda: load_captions(folder))
        assert captions is None or (len(captions) == 2 and all(isinstance(c, str) for c in captions))

    try:
        check()
    finally:
        record(report, f"{EXAMPLES} random captions files beside the images (any text, any bytes)", tally)


def png_like() -> st.SearchStrategy[bytes]:
    """Random bytes, and real PNG and JPEG files with random bytes changed or cut: what decoders meet."""
    import io

    import numpy as np
    from PIL import Image

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), 90, dtype=np.uint8)).save(buf, format=fmt)
        return buf.getvalue()

    real = st.sampled_from([encoded("PNG"), encoded("JPEG"), encoded("BMP")])

    def damaged(data: bytes, cut: int, at: list[tuple[int, int]]) -> bytes:
        b = bytearray(data[: max(1, len(data) - cut)])
        for i, v in at:
            b[i % len(b)] = v
        return bytes(b)

    return st.one_of(
        st.binary(max_size=200),
        st.builds(
            damaged,
            real,
            st.integers(0, 300),
            st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
        ),
    )


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_decoding_of_random_bytes(report, tmp_path_factory, suffix):
    from limner.evaluation.subjects import read_image

    path = tmp_path_factory.mktemp("decode") / f"image{suffix}"
    tally = Tally()

    @FAST
    @given(png_like())
    def check(data):
        path.write_bytes(data)
        image = tally.run(lambda: read_image(path))
        assert image is None or (image.ndim == 3 and image.shape[2] == 3)

    try:
        check()
    finally:
        record(report, f"{EXAMPLES} random or damaged image files named {suffix} read as references", tally)
