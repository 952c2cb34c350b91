"""Reading a teacher cache. With writer.py, the only code that imports zarr.

CacheReader reads the metadata and the small view table when constructed, and opens the row
arrays lazily, once per process: a DataLoader worker forked from the main process opens its own
handle on first use. A view's rows come from ONE contiguous slice per array (zarr's fancy indexing
is an order of magnitude slower). For a complete cache in the plain uncompressed layout, on a
local disk or an fsspec URL, the slices are read straight from the shard files (rawshards.py):
a fraction of zarr-python's per-read overhead, and one ranged request per array and view on
object storage; anything else reads through zarr.

Rows leave the reader encoded (read_rows: what is stored, small to ship from a loader worker) and
are decoded by decode() where they are needed (on the training device): nothing outside this
package touches the codec or the array names."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import torch
import zarr

from cache_teacher import schema
from cache_teacher.codec import decode_rows, decode_topk
from cache_teacher.decoded import DecodedRows, DecodedView
from cache_teacher.layout import REGION_FIELDS, VIEW_FIELDS, records_from_table
from cache_teacher.rawshards import open_raw
from core.errors import UserError
from data.views import ViewRecord, ViewSpec


def is_url(location: str) -> bool:
    return "://" in str(location)


def open_group(location, mode: str = "r", storage_options: dict | None = None, attributes: dict | None = None):
    """A Zarr v3 group at a local path or an fsspec URL (s3://, gs://, file://, ...); `attributes`
    are written with the group when it is created (mode "w"), in the same metadata document."""
    location = str(location)
    read_only = mode == "r"
    try:
        if is_url(location):
            store = zarr.storage.FsspecStore.from_url(location, storage_options=storage_options or {},
                                                      read_only=read_only)
        else:
            if read_only and not Path(location).exists():
                raise FileNotFoundError(location)
            store = zarr.storage.LocalStore(location, read_only=read_only)
        if mode == "w":
            return zarr.open_group(store=store, mode=mode, zarr_format=3, attributes=attributes or {})
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise UserError(f"no cache at {location}; pass the --out of a dump-teacher run") from None
    except (ValueError, KeyError, OSError) as err:
        if isinstance(err, PermissionError):
            raise UserError(f"cannot open {location} ({err.strerror}); check the permissions") from None
        raise UserError(f"{location} is not a readable Zarr v3 cache ({type(err).__name__}: {err}); "
                        "pass the --out of a dump-teacher run") from None


def _read_slices(arrays, names, rows: slice) -> dict[str, np.ndarray]:
    """The same row slice of several arrays, fetched concurrently on zarr's event loop: each zarr
    read carries a fixed cost that dominates for small views (measured ~20% faster for box + cls)."""
    try:
        from zarr.core.sync import sync

        async def gather():
            return await asyncio.gather(*(a.async_array.getitem(rows) for a in arrays))

        values = sync(gather())
    except (ImportError, AttributeError):  # another zarr-python layout: plain sequential reads
        values = [a[rows] for a in arrays]
    return dict(zip(names, values))


class CacheReader:
    def __init__(self, location, storage_options: dict | None = None):
        self.location = str(location)
        self.storage_options = storage_options
        group = open_group(self.location, "r", storage_options)
        self.meta = schema.CacheMetadata.from_json(dict(group.attrs.get(schema.ATTRS_KEY, {})), self.location)
        self.specs: list[ViewSpec] = list(self.meta.specs)
        fields = VIEW_FIELDS + (REGION_FIELDS if self.meta.regions.two_spaces else ())
        table = {name: group["views"][name][:] for name in fields}
        self.view_table = table
        self.records: list[ViewRecord] = records_from_table(table)
        self.row_offset = table["row_offset"].astype(np.int64)
        self.num_rows = table["num_rows"].astype(np.int64)
        self.region_offset = table["region_offset"].astype(np.int64) if "region_offset" in table else None
        self.region_rows = table["region_rows"].astype(np.int64) if "region_rows" in table else None
        self.lookup = group["dataset"]["lookup"][:]
        self.image_ids = group["dataset"]["image_ids"][:]
        names = set(group["dataset"].array_keys())
        self.image_digests = group["dataset"]["image_digests"][:] if "image_digests" in names else None  # v2
        self.index_of_image = {int(image_id): i for i, image_id in enumerate(self.image_ids)}
        self._group, self._pid, self._handles, self._raw = None, None, {}, {}

    # -- lazily opened per process --------------------------------------------------------------
    def __getstate__(self):  # picklable for spawned workers: handles are reopened there
        state = dict(self.__dict__)
        state["_group"], state["_pid"], state["_handles"], state["_raw"] = None, None, {}, {}
        return state

    def _arrays(self):
        if self._group is None or self._pid != os.getpid():
            self._group = open_group(self.location, "r", self.storage_options)
            self._pid, self._handles, self._raw = os.getpid(), {}, {}
        return self._group

    def array(self, name: str):
        """An array's handle, opened once per process: opening reads and parses its metadata, which
        cost as much as reading a small view's rows."""
        group = self._arrays()
        if name not in self._handles:
            self._handles[name] = group[name]
        return self._handles[name]

    def raw(self, name: str):
        """A direct shard-file reader for an array of a complete cache (None: read through zarr)."""
        self._arrays()  # resets per-process state after a fork
        if name not in self._raw:
            self._raw[name] = None
            if not self.complete:
                pass  # shards may still change: zarr reads
            elif not is_url(self.location) or self.location.startswith("file://"):
                self._raw[name] = open_raw(Path(self.location.removeprefix("file://")) / name)
            else:
                import fsspec

                fs, root = fsspec.core.url_to_fs(self.location, **(self.storage_options or {}))
                self._raw[name] = open_raw(f"{root.rstrip('/')}/{name}", fs=fs)
        return self._raw[name]

    # -- what the cache holds -------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.meta.complete

    @property
    def has_cls(self) -> bool:
        return self.meta.has_cls

    @property
    def sparse(self) -> bool:
        return self.meta.regions.sparse

    def array_names(self) -> list[str]:
        """The row arrays this cache holds (box, box_lo, box_scale, cls, location)."""
        group = self._arrays()
        return [name for name in schema.ROW_ARRAYS if name in group]

    def shards_done(self) -> np.ndarray:
        return self._arrays()[schema.PROGRESS][:].astype(bool)  # not cached: it changes during a dump

    def view_index(self, image_index: int, spec_index: int) -> int:
        v = int(self.lookup[image_index, spec_index])
        if v < 0:
            raise KeyError(f"view {spec_index} of image index {image_index} is not cached")
        return v

    def subset_problem(self, image_ids, digests: np.ndarray) -> str | None:
        """Why a run on these images (ids, CocoDetection.image_digests) cannot read this cache's
        rows, or None: each must be a cached image with the annotations it had when dumped."""
        if self.image_digests is None:
            return (f"cache format v{self.meta.format_version} has no per-image annotation digests, so only the "
                    "exact dataset it was dumped from can read it; dump again with this ldcache to train on subsets")
        for image_id, digest in zip(image_ids, digests):
            i = self.index_of_image.get(int(image_id))
            if i is None:
                return f"image {image_id} is not in the cache; train on a subset of the cached images"
            if not np.array_equal(self.image_digests[i], digest):
                return (f"image {image_id} differs from the cached one (its annotations, size or file name changed "
                        "since the dump); use the cached annotations or dump again")
        return None

    def require_complete(self) -> None:
        if not self.complete:
            done = self.shards_done()
            raise UserError(f"cache {self.location} is incomplete ({int(done.sum())}/{len(done)} shards written); "
                            "re-run the same dump-teacher command to finish it")

    # -- rows -----------------------------------------------------------------------------------
    def read_rows(self, v: int, kinds=("box", "cls"), direct: bool = True) -> dict[str, np.ndarray]:
        """The stored (encoded) rows of view v, one contiguous slice per array: straight from the
        shard files where the layout allows (direct=False: always through zarr). kinds: any of box,
        cls and edges (an ld+bckd cache's expected edges)."""
        out = {}
        for rows, group in self._by_row_space(v, self.arrays_of(kinds)):
            raw = [self.raw(name) for name in group] if direct else [None]
            if all(r is not None for r in raw):
                out.update({name: r.read(rows.start, rows.stop) for name, r in zip(group, raw)})
            else:
                out.update(_read_slices([self.array(name) for name in group], group, rows))
        return out

    def arrays_of(self, kinds) -> list[str]:
        """The arrays a read of these kinds (box, cls, edges) touches."""
        two = self.meta.regions.two_spaces
        names = []
        if "box" in kinds:
            names.append(schema.BOX)
            if self.meta.box_dtype == "uint8":
                names += [schema.BOX_LO, schema.BOX_SCALE]
            if self.sparse:
                names.append(schema.LOCATION)
        if "cls" in kinds and self.has_cls:
            names += [schema.CLS_TOPK, schema.CLS_INDEX, schema.CLS_FLOOR] if two else [schema.CLS]
        if "edges" in kinds and two:
            names.append(schema.EDGES)
        if self.sparse and not two and schema.LOCATION not in names:
            names.append(schema.LOCATION)  # a main+vlr cache's rows are its box rows' places
        return names

    def stored_bytes(self, kinds=("box", "cls", "edges")) -> np.ndarray:
        """[V] the encoded bytes a read of view v of these kinds returns."""
        group, total = self._arrays(), np.zeros(len(self.records), dtype=np.int64)
        for name in self.arrays_of(kinds):
            array = group[name]
            region = self.meta.regions.two_spaces and name in schema.REGION_ARRAYS
            total += (self.region_rows if region else self.num_rows) * array.dtype.itemsize * int(
                np.prod(array.shape[1:]))
        return total

    def _by_row_space(self, v: int, names: list[str]) -> list[tuple[slice, list[str]]]:
        """The arrays to read for view v grouped by the row slice they share (one group, or two in
        an ld+bckd cache: its region rows and its dense rows)."""
        dense = slice(int(self.row_offset[v]), int(self.row_offset[v] + self.num_rows[v]))
        if not self.meta.regions.two_spaces:
            return [(dense, names)] if names else []
        region = slice(int(self.region_offset[v]), int(self.region_offset[v] + self.region_rows[v]))
        groups = [(region, [n for n in names if n in schema.REGION_ARRAYS]),
                  (dense, [n for n in names if n not in schema.REGION_ARRAYS])]
        return [(rows, group) for rows, group in groups if group]

    def decode(self, stored: dict, device=None) -> DecodedRows:
        """Rows as read_rows returns them (numpy or torch, one view or several concatenated) ->
        float32 logits on `device`. Only the stored bytes travel; the decode runs on the device."""
        box = None
        if schema.BOX in stored:
            box = decode_rows(stored[schema.BOX], stored.get(schema.BOX_LO), stored.get(schema.BOX_SCALE), device)
        cls = decode_rows(stored[schema.CLS], device=device) if schema.CLS in stored else None
        if schema.CLS_TOPK in stored:
            cls = decode_topk(stored[schema.CLS_TOPK], stored[schema.CLS_INDEX], stored[schema.CLS_FLOOR],
                              self.meta.num_classes, device)
        edges = decode_rows(stored[schema.EDGES], device=device) if schema.EDGES in stored else None
        location = stored.get(schema.LOCATION)
        if location is not None:
            location = torch.as_tensor(location).to(device, non_blocking=True).long()
        return DecodedRows(box, cls, location, edges)

    def read_view(self, v: int, kinds=("box", "cls", "edges")) -> DecodedView:
        box, cls, location, edges = self.decode(self.read_rows(v, kinds))
        return DecodedView(self.records[v], box, cls, location, edges)

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """The stored values of one whole shard, each array's own rows of it (every row array but
        location): contiguous reads."""
        out = {}
        for name in self.array_names():
            if name != schema.LOCATION:
                rows = self.meta.layout.rows_per_shard_of(name, self.meta.regions)
                out[name] = self.array(name)[shard * rows:(shard + 1) * rows]
        return out

    def row_bytes(self) -> dict[str, int]:
        """Bytes of the rows each array holds for the views (no shard padding): what is stored before
        compression."""
        group = self._arrays()
        out = {}
        for name in self.array_names():
            region = self.meta.regions.two_spaces and name in schema.REGION_ARRAYS
            rows = int((self.region_rows if region else self.num_rows).sum())
            out[name] = rows * group[name].dtype.itemsize * int(np.prod(group[name].shape[1:]))
        return out

    def bytes_on_disk(self) -> dict[str, int]:
        """Stored bytes per array (local stores and fsspec stores that can list sizes)."""
        group = self._arrays()
        out = {}
        for name in schema.ROW_ARRAYS:
            if name in group:
                out[name] = int(group[name].nbytes_stored())
        return out
