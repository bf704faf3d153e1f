"""Pretraining data (limner.data): the world stream (seeded, pure per sample, never a held-out subject or one
near it, two pairings) and a user's own data (image folder with metadata.jsonl, tar shards, parquet, a saved
dataset): sharded across ranks, deterministic, resumable mid-epoch, bad samples skipped and counted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from limner.data import Sample, SampleStream, open_stream
from limner.data.world import WorldStream, near_heldout_identity
from limner.errors import LimnerError
from limner.images import BACKGROUND_GREY
from limner.world import vocab
from limner.world.heldout import IDENTITIES, SUBJECTS, heldout_identity_keys
from limner.world.render import Identity, Subject
from limner.world.scenes import near_heldout_subject

# --------------------------------------------------------------------------------------------
# Small sources written on the spot: each sample's image is one flat colour its caption names
# --------------------------------------------------------------------------------------------


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def _png(i: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 4), _colour(i)).save(buf, "PNG")
    return buf.getvalue()


def image_folder(root: Path, n: int, lines: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{i:03d}.png").write_bytes(_png(i))
    rows = [json.dumps({"file_name": f"{i:03d}.png", "text": f"sample {i}"}) for i in range(n)]
    (root / "metadata.jsonl").write_text("\n".join(rows + (lines or [])) + "\n")
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def tar_shards(root: Path, shards: int, per_shard: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tf:
            for j in range(per_shard):
                i = s * per_shard + j
                _add(tf, f"{i:05d}.png", _png(i))
                if i % 2:  # captions both ways
                    _add(tf, f"{i:05d}.txt", f"sample {i}".encode())
                else:
                    _add(tf, f"{i:05d}.json", json.dumps({"caption": f"sample {i}"}).encode())
    return root


def parquet_files(root: Path, n: int) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    half = n // 2
    for f, rows in enumerate((range(half), range(half, n))):
        table = pa.table(
            {
                "image": [{"bytes": _png(i), "path": None} for i in rows],
                "text": [f"sample {i}" for i in rows],
            }
        )
        pq.write_table(table, root / f"train-{f}.parquet", row_group_size=4)
    return root


def saved_dataset(root: Path, n: int) -> Path:
    """The layout datasets' save_to_disk writes: arrow stream files listed in state.json."""
    pa = pytest.importorskip("pyarrow")
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"image": [{"bytes": _png(i), "path": None} for i in range(n)], "text": [f"s {i}" for i in range(n)]}
    )
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=5)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "dataset_info.json").write_text("{}")
    return root


SOURCES = {"folder": image_folder, "tar": lambda r, n: tar_shards(r, 6, n // 6), "parquet": parquet_files}
SOURCES["arrow"] = saved_dataset


def take(stream, n: int) -> list[Sample]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def texts(samples: list[Sample]) -> list[str]:
    return [s.text for s in samples]


# --------------------------------------------------------------------------------------------
# The world stream
# --------------------------------------------------------------------------------------------


def test_world_stream_is_seeded_pure_per_sample_and_resumes_exactly():
    stream = open_stream("world", seed=3)
    assert isinstance(stream, SampleStream)
    first = take(stream, 6)
    s = first[0]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8 and s.text and s.subject
    assert s.mask.shape == (64, 64) and s.mask.dtype == bool and 20 < s.mask.sum() < 64 * 64 * 0.9
    assert s.references[0] is s.image, "pair=self: the paper's pairing conditions on the target itself"
    assert len({x.subject for x in first}) == 6
    # sample k is a function of (seed, rank, world_size, k) alone: resume is setting k
    state = stream.state_dict()
    json.dumps(state)
    resumed = open_stream("world", seed=3)
    resumed.load_state_dict(state)
    assert texts(take(resumed, 3)) == texts(take(stream, 3))
    assert np.array_equal(open_stream("world", seed=3).sample(4).image, first[4].image)
    assert texts(take(open_stream("world", seed=4), 6)) != texts(first)
    # rank r of W sees sample k * W + r of the one sequence: disjoint ranks, together the single-process stream
    ranks = [take(open_stream("world", seed=3, rank=r, world_size=2), 3) for r in (0, 1)]
    assert [x.subject for pair in zip(*ranks) for x in pair] == [x.subject for x in first]
    with pytest.raises(LimnerError, match="world_size=2"):
        resumed.load_state_dict(open_stream("world", seed=3, world_size=2).state_dict())
    described = stream.describe()
    assert described["kind"] == "world" and described["seed"] == 3 and described["pair"] == "self"
    assert described["samples"] == 9 and described["skipped"] == {}
    json.dumps(described)


def test_world_stream_never_shows_a_heldout_subject_or_anything_near_it():
    """Over 15000 subjects (drawn as the stream draws them, without rendering) and 200 rendered samples: no
    instance `near_heldout_subject` (the world's own check, which the base's training data pass too) and no
    face a held-out identity or one factor away from one. Wide enough coverage that the check means something."""
    held_faces = heldout_identity_keys()
    stream = WorldStream(seed=11)
    kinds, looks = {}, set()
    for k in range(15000):
        s = stream.subject(k)
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
        if s.kind == "instance":
            assert not near_heldout_subject(s.instance), s.key()
            assert all(
                (s.instance.cls, s.instance.colour_a, s.instance.colour_b) != (h.cls, h.colour_a, h.colour_b)
                or s.instance.emblem != h.emblem
                for h in SUBJECTS
            )
            looks.add((s.instance.cls, s.instance.emblem, s.instance.colour_a))
        elif s.kind == "character":
            assert s.identity.key() not in held_faces and not near_heldout_identity(s.identity)
    assert set(kinds) == {"instance", "object", "character"} and min(kinds.values()) > 1500
    assert len(looks) > 0.9 * len(vocab.OBJECT_CLASSES) * len(vocab.EMBLEMS) * len(vocab.COLOURS)
    for sample in take(stream, 200):  # what is drawn is what was checked: the key, parsed back
        kind, cls, *rest = sample.subject.split(":")
        if kind == "instance":
            assert not near_heldout_subject(Subject("x", cls, *rest))
        elif kind == "character":
            face = Identity(*(int(c) for c in rest[0][3:]))
            assert not near_heldout_identity(face) and face.key() not in held_faces
    # and the checks do fire where they should
    ada = IDENTITIES[0].identity.factors()
    assert near_heldout_identity(Identity(*ada)) and near_heldout_identity(Identity((ada[0] + 1) % 3, *ada[1:]))
    assert not near_heldout_identity(Identity((ada[0] + 1) % 3, (ada[1] + 1) % 5, *ada[2:]))


def test_world_view_pairing_shows_another_view_on_grey():
    self_pair, view_pair = take(open_stream("world", seed=5), 4), take(open_stream("world", seed=5, pair="view"), 4)
    for a, b in zip(self_pair, view_pair):
        assert a.subject == b.subject and np.array_equal(a.image, b.image), "the same targets either way"
        ref = b.references[0]
        assert ref.shape == b.image.shape and not np.array_equal(ref, b.image), "another view"
        grey = (ref == BACKGROUND_GREY).all(-1)
        assert grey[0, 0] and grey[-1, -1] and 0.4 < grey.mean() < 0.98, "the background painted out"
    big = take(open_stream("world", resolution=96, pair="view"), 1)[0]
    assert big.image.shape == big.references[0].shape == (96, 96, 3) and big.mask.shape == (96, 96)


def test_world_crop_pairing_fills_the_frame_with_the_subject():
    """pair=crop: the same targets and the same other view as pair=view, cropped to the subject's box, so the
    subject's marks take more of the encoder's pixels."""
    view_pair, crop_pair = (
        take(open_stream("world", seed=5, pair="view"), 8),
        take(open_stream("world", seed=5, pair="crop"), 8),
    )
    grey = [[(s.references[0] == BACKGROUND_GREY).all(-1).mean() for s in pairs] for pairs in (view_pair, crop_pair)]
    for a, b, g_view, g_crop in zip(view_pair, crop_pair, *grey):
        assert a.subject == b.subject and np.array_equal(a.image, b.image) and b.references[0].shape == a.image.shape
        assert g_crop < g_view, "less background, a larger subject"
    assert 1 - np.mean(grey[1]) > 1.4 * (1 - np.mean(grey[0])), "the subject's area grows by half or more"
    with pytest.raises(LimnerError, match="pair='crop' is for objects"):
        open_stream("world", pair="crop", subjects="characters")
    with pytest.raises(LimnerError, match="pair='crop' with data"):
        open_stream("world-does-not-exist", pair="crop")


def test_world_cut_pairing_is_the_target_itself_on_grey():
    """pair=cut: the same targets as pair=self, conditioned on the target with its background painted out by its
    own mask (FastComposer's pairing), so the subject's pixels are exactly the target's."""
    self_pair, cut_pair = take(open_stream("world", seed=5), 8), take(open_stream("world", seed=5, pair="cut"), 8)
    for a, b in zip(self_pair, cut_pair):
        assert a.subject == b.subject and np.array_equal(a.image, b.image), "the same targets either way"
        ref = b.references[0]
        assert np.array_equal(ref[b.mask], b.image[b.mask]), "the subject as the target shows it"
        assert (ref[~b.mask] == BACKGROUND_GREY).all(), "everything else grey"
    with pytest.raises(LimnerError, match="pair='cut' is for objects"):
        open_stream("world", pair="cut", subjects="characters")
    with pytest.raises(LimnerError, match="pair='cut' with data"):
        open_stream("world-does-not-exist", pair="cut")


def test_crop_to_subject_magnifies_a_small_subject():
    from limner.images import crop_to_subject

    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[40:52, 2:14] = True  # a 12 px subject near the edge: its box with margins reaches past the picture
    image[mask] = 200
    image[45:47, 7:9] = 30  # a 2 px mark
    out = crop_to_subject(image, mask)
    dark = (out < 80).all(-1)  # the mark, resampled bicubically
    assert out.shape == image.shape and dark.sum() >= 40, "the 4 px of the mark now cover 40 or more"
    assert abs(int(out[16, 48, 0]) - 200) <= 8 and abs(int(out[0, 0, 0]) - BACKGROUND_GREY) <= 2
    assert np.array_equal(crop_to_subject(image, np.zeros_like(mask)), np.full_like(image, BACKGROUND_GREY))


def test_world_class_captions_leave_the_looks_to_the_image(tmp_path):
    full, bare = take(open_stream("world", seed=3), 40), take(open_stream("world", seed=3, captions="class"), 40)
    looks = set(vocab.COLOURS) | set(vocab.PATTERNS) - {"plain"}
    for a, b in zip(full, bare):
        assert a.subject == b.subject and np.array_equal(a.image, b.image), "the same pictures either way"
        assert not looks & set(b.text.split()), b.text
    assert sum(bool(looks & set(a.text.split())) for a in full) > 20, "the full captions do name them"
    with pytest.raises(LimnerError, match="captions='class' with data"):
        open_stream(str(SOURCES["folder"](tmp_path / "f", 2)), captions="class")


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SOURCES))
def test_real_data_two_ranks_are_disjoint_and_together_complete(kind, tmp_path):
    root = SOURCES[kind](tmp_path / kind, 12)
    everything = {s.text for s in take(open_stream(str(root)), 12)}
    assert len(everything) == 12, "one epoch of one process sees every sample once"
    ranks = [texts(take(open_stream(str(root), rank=r, world_size=2), 6)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and set(ranks[0]) | set(ranks[1]) == everything
    s = take(open_stream(str(root), resolution=16), 1)[0]
    assert s.image.shape == (16, 16, 3) and s.references == [s.image] and s.mask is None and s.subject is None
    assert (s.image == _colour(int(s.text.split()[-1]))).all(), "the image its caption goes with"


@pytest.mark.parametrize("kind", list(SOURCES))
def test_real_data_resumes_mid_epoch_exactly_and_is_shuffled_per_epoch_from_the_seed(kind, tmp_path):
    root = str(SOURCES[kind](tmp_path / kind, 12))
    straight = texts(take(open_stream(root, seed=7, rank=1, world_size=2), 20))  # crosses three epochs
    stream = open_stream(root, seed=7, rank=1, world_size=2)
    head = texts(take(stream, 4))
    state = json.loads(json.dumps(stream.state_dict()))
    resumed = open_stream(root, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + texts(take(resumed, 16)) == straight
    # each epoch a new order of all the samples, of which this rank takes every other
    assert straight[:6] != straight[6:12] and len(set(straight[:6])) == len(set(straight[6:12])) == 6
    assert texts(take(open_stream(root, seed=8, rank=1, world_size=2), 6)) != straight[:6]
    with pytest.raises(LimnerError, match="seed"):
        open_stream(root, seed=8, rank=1, world_size=2).load_state_dict(state)


def test_undecodable_tiny_and_uncaptioned_samples_are_skipped_and_counted(tmp_path):
    root = image_folder(tmp_path / "f", 4)
    (root / "bad.png").write_bytes(b"not a png at all")
    Image.new("RGB", (8, 40)).save(root / "tiny.png")
    extra = [
        json.dumps({"file_name": "bad.png", "text": "broken"}),
        json.dumps({"file_name": "tiny.png", "text": "tiny"}),
        json.dumps({"file_name": "000.png"}),
        json.dumps({"file_name": "001.png", "text": "   "}),
        json.dumps({"file_name": "gone.png", "text": "missing"}),
    ]
    image_folder(root, 4, extra)
    stream = open_stream(str(root))
    got = texts(take(stream, 8))  # the four good samples twice: the first epoch read whole, the second in part
    assert sorted(got) == sorted([f"sample {i}" for i in range(4)] * 2)
    each_epoch = {"undecodable": 1, "too small": 1, "no caption": 2, "missing image": 1}
    assert stream.skipped.keys() == each_epoch.keys()
    assert all(n <= stream.skipped[reason] <= 2 * n for reason, n in each_epoch.items())
    state = stream.state_dict()
    assert sum(stream.skipped.values()) == state["tried"] - state["yielded"] and state["yielded"] == 8
    assert stream.describe()["skipped"] == stream.skipped and stream.describe()["kind"] == "folder"


def test_a_source_with_nothing_usable_is_an_error_naming_it(tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    (few / "x.png").write_bytes(b"junk")
    (few / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a"}) + "\n")
    with pytest.raises(LimnerError, match=f"{few}.*none of the first 1 samples is usable.*1 undecodable"):
        take(open_stream(str(few)), 1)
    many = tmp_path / "many"
    many.mkdir()
    (many / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": "a"}) + "\n" for i in range(500))
    )
    with pytest.raises(LimnerError, match="none of the first 64 samples.*64 missing image"):
        take(open_stream(str(many)), 1)
    with pytest.raises(LimnerError, match="fewer samples than processes"):
        take(open_stream(str(image_folder(tmp_path / "two", 2)), rank=2, world_size=3), 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LimnerError, match=f"data {empty}: found no files"):
        open_stream(str(empty))
    (empty / "metadata.jsonl").write_text("\n\n")
    with pytest.raises(LimnerError, match="lists no image"):
        open_stream(str(empty))
    with pytest.raises(LimnerError, match="no such file"):
        open_stream(str(tmp_path / "nowhere"))


def test_malformed_metadata_names_file_and_line_and_paths_stay_inside(tmp_path):
    root = image_folder(tmp_path / "f", 2, ['{"file_name": "000.png", "text": "ok"', json.dumps({"text": "x"})])
    with pytest.raises(LimnerError, match=r"metadata\.jsonl, line 3: not a JSON object"):
        open_stream(str(root))
    image_folder(root, 2, [json.dumps({"text": "x"})])
    with pytest.raises(LimnerError, match=r"metadata\.jsonl, line 3: no \"file_name\""):
        open_stream(str(root))
    for escape in ("../outside.png", "/etc/passwd", "a/../../outside.png"):
        image_folder(root, 2, [json.dumps({"file_name": escape, "text": "x"})])
        with pytest.raises(LimnerError, match="line 3: file_name .* points outside"):
            open_stream(str(root))
    image_folder(root, 2, [json.dumps({"file_name": "sub/../000.png", "text": "inside after all"})])
    assert len(take(open_stream(str(root)), 3)) == 3


def test_truncated_tar_shard_keeps_the_samples_before_the_damage(tmp_path):
    root = tar_shards(tmp_path / "t", 1, 6)
    shard = root / "shard-0000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tf:
        cut_in, caption_3 = (next(m for m in tf.getmembers() if m.name == n) for n in ("00004.png", "00003.txt"))
    for cut, kept, spec in (
        (cut_in.offset_data + 10, 4, root),  # inside sample 4's image
        (caption_3.offset_data + 4, 3, root / "*.tar"),  # inside sample 3's caption
        (cut_in.offset + 100, 4, shard),  # inside sample 4's header: what follows is unknown
    ):
        shard.write_bytes(data[:cut])
        stream = open_stream(str(spec))
        got = texts(take(stream, 2 * kept))  # the first epoch read whole
        assert sorted(set(got)) == [f"sample {i}" for i in range(kept)] and len(got) == 2 * kept
        assert stream.skipped.keys() == {"truncated shard"} and 1 <= stream.skipped["truncated shard"] <= 2
    shard.write_bytes(b"\0garbage" * 10)
    with pytest.raises(LimnerError, match="unreadable shard"):
        take(open_stream(str(root)), 1)


def test_bad_arguments_are_errors_naming_them(tmp_path):
    root = str(image_folder(tmp_path / "f", 3))
    with pytest.raises(LimnerError, match="pair='view' with data .*only in the world stream"):
        open_stream(root, pair="view")
    with pytest.raises(LimnerError, match="pair='other'"):
        open_stream("world", pair="other")
    with pytest.raises(LimnerError, match="rank=2"):
        open_stream(root, rank=2, world_size=2)
    with pytest.raises(LimnerError, match="resolution=8"):
        open_stream("world", resolution=8)
    with pytest.raises(LimnerError, match="mixes .tar shards and .parquet"):
        (tmp_path / "mixed").mkdir()
        (tmp_path / "mixed" / "a.tar").write_bytes(b"")
        (tmp_path / "mixed" / "b.parquet").write_bytes(b"")
        open_stream(str(tmp_path / "mixed"))


def test_parquet_without_pyarrow_says_how_to_get_it(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(LimnerError, match=r"needs pyarrow: pip install 'limner\[data\]'"):
        open_stream(str(tmp_path))


def test_character_stream_gives_the_identity_methods_keypoints_and_a_whole_second_view():
    """subjects="characters": every sample a person never near a held-out identity, its face keypoints on the
    face (inside the person's mask) and scaled with the resolution; pair="view" gives another, uncut view with
    its mask, the shirt redrawn with clothes="vary" and kept with clothes="same"."""
    held_faces = heldout_identity_keys()
    varied = take(open_stream("world", seed=2, pair="view", subjects="characters"), 40)
    same = take(open_stream("world", seed=2, pair="view", subjects="characters", clothes="same"), 40)
    shirts_differ = 0
    for a, b in zip(varied, same):
        assert a.subject == b.subject and a.subject.startswith("character:")
        face = Identity(*(int(c) for c in a.subject.split(":")[2][3:]))
        assert face.key() not in held_faces and not near_heldout_identity(face)
        x, y = np.round(a.face_keypoints).astype(int).clip(0, 63).T
        assert a.mask[y, x].mean() >= 0.8, "the keypoints lie on the person"
        assert {"neck", "left_shoulder", "right_shoulder"} <= set(a.body_keypoints)
        ref, ref_mask = a.references[0], a.reference_masks[0]
        assert not np.array_equal(ref, a.image) and ref_mask.shape == ref.shape[:2] and ref_mask.any()
        assert (ref[~ref_mask] != BACKGROUND_GREY).any(), "the second view keeps its background"
        shirts_differ += not np.array_equal(a.references[0], b.references[0])
    assert shirts_differ > 30, "clothes=vary redraws the shirt of the second view"
    big = take(open_stream("world", seed=2, pair="view", subjects="characters", resolution=128), 3)
    for small, large in zip(varied, big):
        assert large.image.shape == (128, 128, 3) and np.allclose(large.face_keypoints, 2 * small.face_keypoints)
    with pytest.raises(LimnerError, match="clothes='hats'"):
        open_stream("world", subjects="characters", clothes="hats")
