"""Streaming safetensors: read tensors by byte range, write shards tensor by tensor.

The `safetensors` library writes a file from tensors held in memory all at once. A 13-65 GB
checkpoint does not fit that pattern, so we use the format directly (it is tiny: an 8-byte
little-endian header length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then the
raw data): every header is known before any data is produced, so each shard's header is written
first and the data follows in chunks. Reading validates the header against the file size, which
turns a truncated or corrupt file into a one-line error instead of garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from oss_mlx.errors import OssMlxError

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
CHUNK = 64 << 20  # bytes per read/write: bounds the converter's working memory
MAX_HEADER = 100 << 20


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None = None
    offset: int = 0  # absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """All tensors of one safetensors file, checked against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise OssMlxError(f"{path.name} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise OssMlxError(f"{path.name} has a corrupt safetensors header (length {n})")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise OssMlxError(f"missing weight file {path}") from None
    except (UnicodeDecodeError, ValueError):
        raise OssMlxError(f"{path.name} has a corrupt safetensors header (not valid JSON)") from None
    except OSError as e:
        raise OssMlxError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise OssMlxError(f"{path.name} has a corrupt safetensors header")
    data_start = 8 + n
    tensors = {}
    end_max = 0
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            t = TensorInfo(name, v["dtype"], tuple(int(d) for d in v["shape"]), path)
            begin, end = (int(x) for x in v["data_offsets"])
            ok = t.dtype in ITEMSIZE and 0 <= begin <= end and end - begin == t.nbytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise OssMlxError(f"{path.name} has a corrupt safetensors header (entry {name!r})")
        t.offset = data_start + begin
        tensors[name] = t
        end_max = max(end_max, end)
    if data_start + end_max > size:
        raise OssMlxError(
            f"{path.name} is truncated: its header needs {data_start + end_max} bytes, "
            f"the file has {size}"
        )
    return tensors


def shard_files(folder: Path, pattern: str = "*.safetensors") -> tuple[list[Path], dict | None]:
    """The weight files of a checkpoint or model folder, and the index's weight_map if any: the
    files the index lists (each must exist), else the files matching `pattern`. The one way
    oss-mlx finds shards (the converter and the model's loader)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(folder.glob(pattern))
        if not files:
            raise OssMlxError(f"{folder} has no {pattern} weights")
        return files, None
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise OssMlxError(f"cannot read {index}: {e}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise OssMlxError(f"{index} has no weight_map")
    names = sorted(set(weight_map.values()))
    for f in names:
        if not (folder / f).is_file():
            raise OssMlxError(f"missing shard {f} (listed in {index.name}) in {folder}")
    return [folder / f for f in names], weight_map


def read_bytes(t: TensorInfo, start: int = 0, length: int | None = None) -> bytearray:
    """`length` bytes of a tensor's data from byte `start` (default: all of it)."""
    length = t.nbytes - start if length is None else length
    buf = bytearray(length)
    with open(t.file, "rb") as f:
        f.seek(t.offset + start)
        if f.readinto(buf) != length:
            raise OssMlxError(f"{t.file.name} is truncated (reading {t.name})")
    return buf


def iter_bytes(t: TensorInfo, chunk: int = CHUNK) -> Iterator[bytearray]:
    """A tensor's data in chunks, never the whole of a large tensor in memory."""
    for start in range(0, t.nbytes, chunk):
        yield read_bytes(t, start, min(chunk, t.nbytes - start))


# ---- writing ----------------------------------------------------------------------------


@dataclass
class Job:
    """Tensors written back to back, and a producer of their bytes in that order (in chunks)."""

    tensors: list[TensorInfo]
    produce: Callable[[], Iterable]  # yields bytes-like chunks (bytes, bytearray, numpy arrays)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def header_bytes(tensors: list[TensorInfo], metadata: dict | None = None) -> bytes:
    header = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(jobs: list[Job], max_shard_bytes: int) -> list[list[Job]]:
    """Greedy split into shards of at most `max_shard_bytes` (a job is never split)."""
    shards: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


def write_shards(folder: Path, jobs: list[Job], max_shard_bytes: int,
                 name: Callable[[int, int], str], metadata: dict | None = None,
                 index: str | None = "model.safetensors.index.json",
                 on_bytes: Callable[[int], None] | None = None) -> dict[str, str]:
    """Write `jobs` as sharded safetensors files in `folder` (+ the HF index file).

    `name(i, n)` names shard i of n. Returns {file name: sha256}, hashed while writing so the
    data is never read twice.
    """
    shards = plan_shards(jobs, max_shard_bytes)
    weight_map = {}
    hashes = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = name(i, len(shards))
        tensors = [t for job in shard for t in job.tensors]
        h = hashlib.sha256()
        with open(folder / fname, "wb") as f:
            head = header_bytes(tensors, metadata)
            f.write(head)
            h.update(head)
            for job in shard:
                written = 0
                for chunk in job.produce():
                    mv = memoryview(chunk).cast("B")
                    f.write(mv)
                    h.update(mv)
                    written += mv.nbytes
                    if on_bytes:
                        on_bytes(mv.nbytes)
                if written != job.nbytes:  # a producer bug must never yield a bad file
                    raise RuntimeError(f"{job.tensors[0].name}: wrote {written} of {job.nbytes} bytes")
        hashes[fname] = h.hexdigest()
        for t in tensors:
            weight_map[t.name] = fname
            total += t.nbytes
    if index:
        with open(folder / index, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return hashes


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
