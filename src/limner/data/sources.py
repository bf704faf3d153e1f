"""The formats a user's data come in, each read as blocks of candidates for `real.RealStream`:

- an image folder with `metadata.jsonl` (one JSON object a line, `file_name` and `text`: the convention of
  the datasets library's imagefolder), one block of all its lines, read by byte offset;
- webdataset tar shards (`KEY.jpg|png|webp` with `KEY.txt` or `KEY.json` holding "text" or "caption"), a
  block per shard, read by seeking to members found from their headers, with the standard library;
- parquet files (a block per row group) and a datasets dataset saved with `save_to_disk` (arrow files,
  memory-mapped, a block per slice of rows), with columns `image` and `text`; these need pyarrow.

Nothing holds more than one group of blocks: a folder keeps the byte offset of each line, a shard the
offsets of its members, parquet one or two row groups.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from array import array
from collections.abc import Callable
from pathlib import Path

from limner.data.real import Raw
from limner.errors import LimnerError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
TEXT_COLUMNS = ("text", "caption")


def _text_of(record: dict) -> object:
    return next((record[k] for k in TEXT_COLUMNS if k in record), None)


# --------------------------------------------------------------------------------------------
# An image folder with metadata.jsonl
# --------------------------------------------------------------------------------------------


def _inside(name: str) -> bool:
    """Whether a metadata file name stays inside its folder. Judged on the name alone, not on where links lead:
    a folder of symlinks into a photo library is the user's choice, a "../" in a downloaded file is not."""
    norm = os.path.normpath(name)
    return not (os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep))


class FolderBlock:
    def __init__(self, source: FolderSource):
        self.source, self.file = source, open(source.metadata, "rb")  # closed by close()

    def __len__(self) -> int:
        return len(self.source.offsets)

    def candidate(self, i: int) -> Raw:
        self.file.seek(self.source.offsets[i])
        record = json.loads(self.file.readline())  # checked when the folder was opened
        return Raw(self.source.folder / record["file_name"], _text_of(record))

    def close(self) -> None:
        self.file.close()


class FolderSource:
    kind, group_size = "folder", 1

    def __init__(self, folder: Path):
        self.folder = self.path = folder
        self.metadata = folder / "metadata.jsonl"
        self.offsets = self._scan()

    def _scan(self) -> array:
        """Each line's byte offset (8 bytes a line is all a folder keeps), every line checked now: a malformed
        one stops the run before it starts, with its line number, instead of some hours in."""
        offsets, offset = array("q"), 0
        with open(self.metadata, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    self._check(line, number)
                    offsets.append(offset)
                offset += len(line)
        if not offsets:
            raise LimnerError(f"{self.metadata} lists no image: add one line per image, {_EXAMPLE}")
        return offsets

    def _check(self, line: bytes, number: int) -> None:
        where = f"{self.metadata}, line {number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LimnerError(f"{where}: not a JSON object ({e}); each line must be one, {_EXAMPLE}") from e
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or not record["file_name"]:
            raise LimnerError(f'{where}: no "file_name"; each line must name its image, {_EXAMPLE}')
        if not _inside(record["file_name"]):
            raise LimnerError(
                f"{where}: file_name {record['file_name']!r} points outside {self.folder}; name images by their "
                "path inside the folder"
            )

    def block_count(self) -> int:
        return 1

    def open_block(self, b: int) -> FolderBlock:
        return FolderBlock(self)


_EXAMPLE = '{"file_name": "0001.png", "text": "a red ball on the grass"}'


# --------------------------------------------------------------------------------------------
# Webdataset tar shards
# --------------------------------------------------------------------------------------------


def _key_and_extension(name: str) -> tuple[str, str]:
    """webdataset's split: the key is the path up to the first dot of the file name, the rest its extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarBlock:
    """One shard: its samples found from the member headers (the data are read only when asked for). A shard
    cut short keeps the samples before the damage; those it cut, and one for the unreadable rest, are skipped
    as "truncated shard"."""

    def __init__(self, path: Path):
        self.path, self.file = path, None
        self.samples: list[dict[str, tuple[int, int]] | str] = []  # ext -> (offset, size), or why it is skipped
        self._index()

    def _index(self) -> None:
        size, members, damaged = self.path.stat().st_size, {}, False
        try:
            with tarfile.open(self.path, "r:") as tf:
                while (m := tf.next()) is not None:
                    if m.isfile():
                        key, ext = _key_and_extension(m.name)
                        complete = m.offset_data + m.size <= size
                        members.setdefault(key, {})[ext] = (m.offset_data, m.size) if complete else None
                        damaged |= not complete
                damaged |= not self._ends_well(tf.offset)
        except (tarfile.TarError, EOFError, OSError):
            if not members:
                self.samples = ["unreadable shard"]
                return
            damaged = True
        cut = [key for key, parts in members.items() if None in parts.values()]
        self.samples = [("truncated shard" if None in p.values() else p) for p in members.values()]
        if damaged and not cut:
            self.samples.append("truncated shard")  # the samples past the damage: their headers are gone

    def _ends_well(self, offset: int) -> bool:
        """Whether the archive ends with its end-of-archive block of zeros. tarfile takes a header cut short
        for the end of the archive, without a word: a shard cut at a header would look whole."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            end = f.read(512)
        return len(end) == 512 and not any(end)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, part: tuple[int, int]) -> bytes:
        if self.file is None:
            self.file = open(self.path, "rb")  # closed by close()
        self.file.seek(part[0])
        return self.file.read(part[1])

    def candidate(self, i: int) -> Raw | str:
        parts = self.samples[i]
        if isinstance(parts, str):
            return parts
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            return "no image"
        if "txt" in parts:
            return Raw(self._read(image), self._read(parts["txt"]).decode("utf-8", errors="replace"))
        if "json" in parts:
            try:
                record = json.loads(self._read(parts["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "bad json"
            return Raw(self._read(image), _text_of(record) if isinstance(record, dict) else None)
        return "no caption"

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class TarSource:
    kind, group_size = "tar", 4  # four shards' samples mix

    def __init__(self, path: Path, shards: list[Path]):
        self.path, self.shards = path, shards

    def block_count(self) -> int:
        return len(self.shards)

    def open_block(self, b: int) -> TarBlock:
        return TarBlock(self.shards[b])


# --------------------------------------------------------------------------------------------
# Parquet and arrow (datasets' save_to_disk)
# --------------------------------------------------------------------------------------------


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise LimnerError(
            f"reading {path} (parquet or a saved datasets dataset) needs pyarrow: pip install 'limner[data]', or "
            "convert the data to an image folder with metadata.jsonl or to tar shards"
        ) from e
    return pyarrow


def _columns(names: list[str], where: Path) -> tuple[str, str]:
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    text = next((c for c in TEXT_COLUMNS if c in names), None)
    if image is None or text is None:
        raise LimnerError(
            f"{where} has columns {', '.join(names) or 'none'}: it needs an image column ({', '.join(IMAGE_COLUMNS)}) "
            f"and a caption column ({', '.join(TEXT_COLUMNS)})"
        )
    return image, text


def _image_value(value: object, base: Path) -> bytes | Path | None:
    """datasets' Image feature stores {"bytes", "path"}; a plain binary or a path string also does."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value:
        return Path(value) if os.path.isabs(value) else base / value
    return None


class TableBlock:
    """Rows of an arrow table (a parquet row group read into memory, or a slice of a memory-mapped file)."""

    def __init__(self, read: Callable[[], object], columns: tuple[str, str], base: Path):
        table = read()
        self.images, self.texts, self.base = table.column(columns[0]), table.column(columns[1]), base

    def __len__(self) -> int:
        return len(self.images)

    def candidate(self, i: int) -> Raw:
        return Raw(_image_value(self.images[i].as_py(), self.base), self.texts[i].as_py())

    def close(self) -> None:
        self.images = self.texts = None


class ParquetSource:
    kind, group_size = "parquet", 2  # a row group holds many images: two at a time

    def __init__(self, path: Path, files: list[Path]):
        pa = _pyarrow(path)
        self.path, self.blocks = path, []  # (file, row group)
        self.columns: dict[Path, tuple[str, str]] = {}
        for f in files:
            meta = pa.parquet.ParquetFile(f)
            self.columns[f] = _columns(meta.schema_arrow.names, f)
            self.blocks += [(f, g) for g in range(meta.num_row_groups) if meta.metadata.row_group(g).num_rows]

    def block_count(self) -> int:
        return len(self.blocks)

    def open_block(self, b: int) -> TableBlock:
        pa = _pyarrow(self.path)
        f, g = self.blocks[b]
        return TableBlock(
            lambda: pa.parquet.ParquetFile(f).read_row_group(g, columns=list(self.columns[f])),
            self.columns[f],
            f.parent,
        )


class ArrowSource:
    kind, group_size = "arrow", 4
    ROWS = 1000  # rows a block: the file is memory-mapped, a block only says which rows mix

    def __init__(self, path: Path, files: list[Path]):
        pa = _pyarrow(path)
        self.path, self.tables, self.blocks = path, [], []  # tables: memory-mapped, nothing read until asked
        for f in files:
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(f))).read_all()
            except pa.ArrowInvalid as e:
                raise LimnerError(f"{f} is not an arrow file datasets' save_to_disk wrote ({e})") from e
            columns = _columns(table.column_names, f)
            t = len(self.tables)
            self.tables.append((table, columns))
            self.blocks += [(t, start) for start in range(0, table.num_rows, self.ROWS)]

    def block_count(self) -> int:
        return len(self.blocks)

    def open_block(self, b: int) -> TableBlock:
        t, start = self.blocks[b]
        table, columns = self.tables[t]
        return TableBlock(lambda: table.slice(start, self.ROWS), columns, self.path)


def saved_dataset_files(folder: Path) -> list[Path]:
    """The arrow files of a dataset datasets' save_to_disk wrote (state.json lists them); a DatasetDict's
    train split."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise LimnerError(f"{folder} holds the splits {', '.join(splits)}: give one, e.g. {folder / splits[0]}")
        folder = folder / "train"
    try:
        state = json.loads((folder / "state.json").read_text())
        return [folder / d["filename"] for d in state["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LimnerError(f"{folder / 'state.json'} is not one datasets' save_to_disk wrote ({e})") from e


# --------------------------------------------------------------------------------------------
# Which format a path is
# --------------------------------------------------------------------------------------------


def open_source(spec: str):
    """The source a path names: a folder (metadata.jsonl, a saved dataset, tar shards or parquet files), one
    .tar or .parquet file, a metadata.jsonl, or a glob of shards or parquet files."""
    if any(c in spec for c in "*?["):
        return _files_source(Path(spec), sorted(Path(p) for p in glob.glob(spec)))
    path = Path(spec).expanduser()
    if not path.exists():
        raise LimnerError(
            f"data {spec}: no such file or folder; give 'world', an image folder with metadata.jsonl, "
            "a saved datasets dataset, parquet files or tar shards"
        )
    if path.is_file():
        if path.name == "metadata.jsonl":
            return FolderSource(path.parent)
        return _files_source(path, [path])
    if (path / "metadata.jsonl").is_file():
        return FolderSource(path)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return ArrowSource(path, saved_dataset_files(path))
    files = sorted(p for p in path.rglob("*") if p.suffix in (".tar", ".parquet") and p.is_file())
    return _files_source(path, files)


def _files_source(path: Path, files: list[Path]):
    kinds = {p.suffix for p in files}
    if not files or not kinds <= {".tar", ".parquet"}:
        found = ", ".join(sorted(kinds)) or "no files"
        raise LimnerError(
            f"data {path}: found {found}; give an image folder with metadata.jsonl ({_EXAMPLE} a line), a "
            "dataset saved with save_to_disk, .parquet files, or .tar shards"
        )
    if len(kinds) > 1:
        raise LimnerError(f"data {path} mixes .tar shards and .parquet files: give one kind")
    return TarSource(path, files) if kinds == {".tar"} else ParquetSource(path, files)
