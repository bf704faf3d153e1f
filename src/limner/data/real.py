"""Streaming a user's own data: order, sharding across processes, exact resume and skipping, written once
for every source format (sources.py reads the formats).

A source is a list of blocks (an image folder's metadata file, a tar shard, a parquet row group, a slice
of an arrow file), each a list of candidates read by index. An epoch visits the blocks in an order drawn
from (seed, epoch), `group_size` blocks at a time, and the candidates of each group in an order drawn from
(seed, epoch, group): only one group is ever open, so the data are streamed, and candidates of several
blocks mix. Candidate j of the epoch (counting across groups) belongs to rank j % world_size: ranks are
disjoint and together see every candidate once an epoch. The position (epoch, group, candidate) is the
whole state: the order is recomputed from the seed on resume.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from limner.data.sample import MIN_SIDE, Sample, square
from limner.errors import LimnerError

# a source none of whose first candidates decode is an error, not an endless search through a broken dataset
FIRST_CANDIDATES = 64


@dataclass
class Raw:
    """One candidate as a source stores it: image bytes or a path to them, and its caption."""

    image: bytes | Path | None
    text: object  # a str where the source has one; anything else is a missing caption


class Block(Protocol):
    def __len__(self) -> int: ...

    def candidate(self, i: int) -> Raw | str: ...  # the candidate, or why it is skipped

    def close(self) -> None: ...


class Source(Protocol):
    kind: str  # folder | tar | parquet | arrow
    path: Path  # what the user named
    group_size: int  # blocks open at once: how far candidates mix

    def block_count(self) -> int: ...

    def open_block(self, b: int) -> Block: ...


def decode(raw: Raw, resolution: int) -> np.ndarray | str:
    """The candidate as a square uint8 image at `resolution`, or why it is skipped."""
    if raw.image is None:
        return "no image"
    try:
        if isinstance(raw.image, Path) and not raw.image.is_file():
            return "missing image"
        with Image.open(raw.image if isinstance(raw.image, Path) else io.BytesIO(raw.image)) as im:
            if min(im.size) < MIN_SIDE:
                return "too small"
            im.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale no smaller than needed
            return np.asarray(square(im.convert("RGB"), resolution))
    except Exception:  # PIL's decoders raise many kinds of error on damaged files (OSError, SyntaxError, EOFError,
        return "undecodable"  # struct.error, ...): any of them makes the file a skip, not the end of a long run


def caption(text: object) -> str | None:
    return text.strip() if isinstance(text, str) and text.strip() else None


class RealStream:
    """An endless, sharded, resumable stream over a `Source` (see the module docstring)."""

    def __init__(self, source: Source, *, seed: int = 0, rank: int = 0, world_size: int = 1, resolution: int = 64):
        self.source, self.seed, self.rank, self.world_size, self.resolution = (
            source,
            seed,
            rank,
            world_size,
            resolution,
        )
        self.blocks = source.block_count()
        if self.blocks == 0:
            raise LimnerError(f"{source.kind} data {source.path}: nothing to read (it holds no samples)")
        self.epoch = self.group = self.row = self.start = 0  # start: the epoch position of the group's first row
        self.tried = self.yielded = 0
        self.skipped: dict[str, int] = {}
        self._group: tuple | None = None  # the open group: ((epoch, group), blocks, ends, order)

    # ---- order ------------------------------------------------------------------------------
    def _group_blocks(self, epoch: int, group: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.blocks)
        k = self.source.group_size
        return [int(b) for b in order[group * k : (group + 1) * k]]

    def _groups(self) -> int:
        return -(-self.blocks // self.source.group_size)

    # ---- iteration --------------------------------------------------------------------------
    # The stream is its own iterator and keeps no position outside its state: load_state_dict() takes effect
    # at the next sample even when iteration has begun.
    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        while True:
            blocks, ends, order = self._open_group()
            j = self.row + (self.rank - self.start - self.row) % self.world_size  # this rank's next row
            if j >= len(order):
                self._next_group(len(order))
                continue
            self.row = j + 1
            q = int(order[j])  # the candidate's place in its group: block b, row q - (rows before b)
            b = int(np.searchsorted(ends, q, side="right"))
            sample = self._sample(blocks[b], q - (int(ends[b - 1]) if b else 0))
            if sample is not None:
                return sample

    def _open_group(self) -> tuple:
        """The blocks of the current group, where each block's rows end in the group's count, and the order its
        candidates are read in, opened once per group. The order is all the memory a group costs: 8 bytes a
        candidate."""
        key = (self.epoch, self.group)
        if self._group is None or self._group[0] != key:
            self.close()
            blocks = [self.source.open_block(b) for b in self._group_blocks(*key)]
            ends = np.cumsum([len(b) for b in blocks])
            order = np.random.default_rng([self.seed, *key]).permutation(int(ends[-1]))
            self._group = (key, blocks, ends, order)
        return self._group[1:]

    def _next_group(self, rows: int) -> None:
        self.close()
        self.start, self.group, self.row = self.start + rows, self.group + 1, 0
        if self.group == self._groups():
            if self.yielded == 0:
                self._nothing_usable()
            self.epoch, self.group, self.start = self.epoch + 1, 0, 0

    def close(self) -> None:
        """Closes the files of the open group (the next sample opens them again)."""
        if self._group is not None:
            for b in self._group[1]:
                b.close()
            self._group = None

    def _sample(self, block: Block, i: int) -> Sample | None:
        """The candidate as a sample, or None (counted in `skipped`) where it cannot be one."""
        self.tried += 1
        raw = block.candidate(i)
        text = caption(raw.text) if isinstance(raw, Raw) else None
        if isinstance(raw, Raw) and text is None:
            raw = "no caption"
        image = decode(raw, self.resolution) if isinstance(raw, Raw) else raw
        if isinstance(image, str):
            self.skipped[image] = self.skipped.get(image, 0) + 1
            if self.yielded == 0 and self.tried >= FIRST_CANDIDATES:
                self._nothing_usable()
            return None
        self.yielded += 1
        return Sample(image=image, text=text, references=[image])

    def _nothing_usable(self) -> None:
        where = f"{self.source.kind} data {self.source.path}"
        if self.tried == 0:
            raise LimnerError(
                f"{where}: process {self.rank} of {self.world_size} has no sample to read (fewer samples than "
                "processes); give more data or run fewer processes"
            )
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        raise LimnerError(
            f"{where}: none of the first {self.tried} samples is usable ({reasons}); each needs an image of at "
            f"least {MIN_SIDE}x{MIN_SIDE} px that decodes, and a non-empty caption"
        )

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kind": self.source.kind,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "blocks": self.blocks,
            "epoch": self.epoch,
            "group": self.group,
            "row": self.row,
            "start": self.start,
            "tried": self.tried,
            "yielded": self.yielded,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for name in ("kind", "seed", "rank", "world_size", "blocks"):
            if state.get(name) != mine[name]:
                raise LimnerError(
                    f"the saved data position is for {name}={state.get(name)!r}, but {self.source.kind} data "
                    f"{self.source.path} opened with {mine[name]!r}: resume on the same data with the same seed "
                    "and number of processes"
                )
        try:
            self.epoch, self.group, self.row, self.start = (int(state[k]) for k in ("epoch", "group", "row", "start"))
            self.tried, self.yielded = int(state["tried"]), int(state["yielded"])
            self.skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LimnerError(f"the saved data position for {self.source.path} is incomplete or damaged: {e}") from e

    def describe(self) -> dict:
        return {
            "kind": self.source.kind,
            "path": str(self.source.path),
            "seed": self.seed,
            "pair": "self",
            "resolution": self.resolution,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "samples": self.yielded,
            "skipped": dict(self.skipped),
        }
