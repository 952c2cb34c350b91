"""Row slices of an uncompressed, sharded Zarr v3 array read straight from its shard files.

zarr-python spends about 0.6 ms of CPU in its async machinery on every slice, whatever its size;
a view of a small model is a few hundred kilobytes, so on a machine whose loader workers share the
cores with training that overhead is most of a step's reading. For the layout our writer produces
(regular chunk grid, "default" chunk keys with "/", one `sharding_indexed` codec whose inner chunks
are plain little-endian bytes, the shard index at the end with a crc32c), the bytes of rows
[a, b) are found from the shard index and read with one `os.pread` (local disk) or one ranged GET
(an fsspec filesystem: S3, GCS, ...) per run of adjacent inner chunks, where zarr-python asks for
the shard index and then every inner chunk on each read. This follows the Zarr v3 sharding
specification, not zarr-python's internals; any other layout (compressors, another key encoding)
is refused by `open_raw` and the caller reads through zarr. Shard indexes are read once per
process and verified by their checksum, so use it only for a complete cache (a finished shard
never changes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c  # a dependency of zarr's crc32c codec
import numpy as np

_DTYPES = {"float16": "<f2", "float32": "<f4", "uint8": "u1", "int16": "<i2", "int32": "<i4", "int64": "<i8"}
_MISSING = np.iinfo(np.uint64).max  # offset and length of an inner chunk that was never written
_LITTLE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}


class LocalFiles:
    """Byte ranges of local files (descriptors kept open, one per shard)."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)  # FileNotFoundError: never written
        return self._fds[path]

    def read(self, path: str, offset: int, length: int) -> bytes:
        return os.pread(self._fd(path), length, offset)

    def size(self, path: str) -> int:
        return os.fstat(self._fd(path)).st_size

    def text(self, path: str) -> str:
        return Path(path).read_text()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


class FsspecFiles:
    """Byte ranges of objects on an fsspec filesystem: one ranged request each."""

    def __init__(self, fs):
        self.fs = fs

    def read(self, path: str, offset: int, length: int) -> bytes:
        return self.fs.cat_file(path, start=offset, end=offset + length)

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def text(self, path: str) -> str:
        return self.fs.cat_file(path).decode()

    def close(self) -> None:
        pass


class RawShardArray:
    """Rows [a, b) of one array (1-D, or 2-D whose shards and chunks span whole rows)."""

    def __init__(self, folder: str, meta: dict, files):
        self.folder, self.files = folder.rstrip("/"), files
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(_DTYPES[meta["data_type"]])
        sharding = meta["codecs"][0]["configuration"]
        self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.chunk_rows = int(sharding["chunk_shape"][0])
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.chunks_per_shard = self.shard_rows // self.chunk_rows
        self.fill = np.array(meta["fill_value"], dtype=self.dtype)
        self._indexes: dict[int, np.ndarray | None] = {}

    def _path(self, shard: int) -> str:
        return f"{self.folder}/c/{shard}/0" if self.row_shape else f"{self.folder}/c/{shard}"

    def _index(self, shard: int) -> np.ndarray | None:
        """[chunks_per_shard, 2] (offset, nbytes) of the inner chunks, checksum verified; None for
        a shard never written (every row is the fill value)."""
        if shard not in self._indexes:
            path, nbytes = self._path(shard), self.chunks_per_shard * 16
            try:
                raw = self.files.read(path, self.files.size(path) - nbytes - 4, nbytes + 4)
            except FileNotFoundError:
                self._indexes[shard] = None
                return None
            if len(raw) != nbytes + 4 or google_crc32c.value(raw[:nbytes]) != int.from_bytes(raw[nbytes:], "little"):
                raise OSError(f"{path}: the shard index does not match its checksum")
            self._indexes[shard] = np.frombuffer(raw[:nbytes], dtype="<u8").reshape(-1, 2)
        return self._indexes[shard]

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.shape[0]})")
        out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        flat = out.reshape(-1).view(np.uint8)  # the same memory, as bytes
        row = start
        while row < stop:
            shard = row // self.shard_rows
            end = min(stop, (shard + 1) * self.shard_rows)
            index = self._index(shard)
            if index is None:
                out[row - start:end - start] = self.fill
            else:
                self._read_in_shard(index, shard, row, end, flat, (row - start) * self.row_bytes)
            row = end
        return out

    def _read_in_shard(self, index: np.ndarray, shard: int, row: int, end: int, flat: np.ndarray, at: int) -> None:
        base = shard * self.shard_rows
        full = self.chunk_rows * self.row_bytes
        while row < end:
            # The longest run of inner chunks from `row` stored back to back at full size: one read.
            c = (row - base) // self.chunk_rows
            offset, nbytes = (int(x) for x in index[c])
            if offset == _MISSING:
                stop = min(end, base + (c + 1) * self.chunk_rows)
                flat[at:at + (stop - row) * self.row_bytes].view(self.dtype)[:] = self.fill
            else:
                if nbytes != full:
                    raise OSError(f"{self._path(shard)}: inner chunk {c} holds {nbytes} bytes, expected {full}")
                last = c
                while (base + (last + 1) * self.chunk_rows < end and index[last + 1, 0] == index[last, 0] + full
                       and index[last + 1, 1] == full):
                    last += 1
                stop = min(end, base + (last + 1) * self.chunk_rows)
                skip = (row - base - c * self.chunk_rows) * self.row_bytes
                length = (stop - row) * self.row_bytes
                data = self.files.read(self._path(shard), offset + skip, length)
                if len(data) != length:
                    raise OSError(f"{self._path(shard)}: short read ({len(data)} of {length} bytes)")
                flat[at:at + length] = np.frombuffer(data, dtype=np.uint8)
            at += (stop - row) * self.row_bytes
            row = stop


def open_raw(folder: str | Path, fs=None) -> RawShardArray | None:
    """A raw reader for the array in `folder` (a local path, or a path on the fsspec filesystem
    `fs`), or None when its layout is not the plain sharded one described above."""
    files = LocalFiles() if fs is None else FsspecFiles(fs)
    folder = str(folder).rstrip("/")
    try:
        meta = json.loads(files.text(f"{folder}/zarr.json"))
    except (OSError, ValueError):
        return None
    try:
        codecs = meta["codecs"]
        sharding = codecs[0]["configuration"] if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed" else None
        shape, shard_shape = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        ok = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array" and not meta.get("storage_transformers")
              and meta["data_type"] in _DTYPES and meta["chunk_grid"]["name"] == "regular"
              and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
              and sharding is not None and sharding["codecs"] in ([_LITTLE_BYTES], [{"name": "bytes"}])
              and sharding["index_codecs"] == [_LITTLE_BYTES, {"name": "crc32c"}]
              and sharding.get("index_location", "end") == "end"
              and len(shape) in (1, 2) and list(shard_shape[1:]) == list(shape[1:])
              and list(sharding["chunk_shape"][1:]) == list(shape[1:])
              and shard_shape[0] % sharding["chunk_shape"][0] == 0)
    except (KeyError, IndexError, TypeError):
        return None
    return RawShardArray(folder, meta, files) if ok else None
