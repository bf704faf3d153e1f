"""Pretraining data for the encoder and identity methods: streams of `Sample` (a target image, its caption,
the image(s) to condition on) from the procedural world or from a user's own data.

`open_stream("world")` draws subjects the bench never shows, endlessly; `open_stream(PATH)` streams an
image folder with metadata.jsonl, a saved datasets dataset, parquet files or webdataset tar shards. Every
stream is endless, seeded, sharded across processes by (rank, world_size) and resumable: the training
loop keeps its `state_dict()` in each checkpoint (`train(..., data=stream)`).
"""

from __future__ import annotations

from limner.data.real import RealStream
from limner.data.sample import CAPTIONS, PAIRS, Sample, SampleStream, check_stream_args
from limner.data.world import WorldStream
from limner.errors import LimnerError

__all__ = ["CAPTIONS", "PAIRS", "Sample", "SampleStream", "open_stream"]


def open_stream(
    spec: str,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    resolution: int = 64,
    pair: str = "self",
    captions: str = "full",
    subjects: str = "all",
    clothes: str = "vary",
) -> SampleStream:
    """The stream `spec` names: "world", or a path (see limner.data.sources for the formats). Real data
    offer one view of each image, no mask, and the captions they come with: pair="view", "crop" or "cut" and
    captions="class" are the world's alone. subjects="characters" (with clothes="vary"|"same" for the second
    view) is the world's identity stream; on real data the identity methods keep the images where a face is
    found."""
    check_stream_args(spec, seed, rank, world_size, resolution, pair, captions)
    if spec == "world":
        return WorldStream(
            seed=seed,
            rank=rank,
            world_size=world_size,
            resolution=resolution,
            pair=pair,
            captions=captions,
            subjects=subjects,
            clothes=clothes,
        )
    if pair != "self":
        raise LimnerError(
            f"pair={pair!r} with data {spec}: a second view of each subject, or its mask, exists only in the world "
            "stream; use pair=self (condition on the target image itself, as the IP-Adapter paper does) on your own "
            "data"
        )
    if captions != "full":
        raise LimnerError(
            f"captions={captions!r} with data {spec}: your data's captions are used as they are; the world stream "
            "alone can leave a subject's looks out of its captions"
        )
    from limner.data.sources import open_source

    return RealStream(open_source(spec), seed=seed, rank=rank, world_size=world_size, resolution=resolution)
