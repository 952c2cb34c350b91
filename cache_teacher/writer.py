"""Creating, resuming and filling a teacher cache. With reader.py, the only code that imports zarr.

The unit of writing is the shard: a writer fills one in memory and stores it with a single
assignment (zarr rewrites a whole shard on any partial write, and two writers touching one shard
lose data). progress[s] becomes 1 only after shard s was stored, so a killed dump leaves at worst a
torn shard whose flag is still 0, and resuming rewrites it whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from cache_teacher import schema
from cache_teacher.layout import Layout, view_table
from cache_teacher.reader import is_url, open_group
from core.errors import UserError

COMPRESSORS = ("none", "zstd", "lz4")


def _compressors(name: str):
    if name == "none":
        return None
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    if name == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2)
    raise UserError(f"unknown compressor {name!r}; use one of {COMPRESSORS}")


class CacheWriter:
    def __init__(self, group, meta: schema.CacheMetadata):
        self.group = group
        self.meta = meta
        self.num_shards = meta.layout.num_shards
        self._progress = group[schema.PROGRESS]
        self._arrays = {name: group[name] for name in schema.ROW_ARRAYS if name in group}

    @classmethod
    def create(cls, url: str, meta: schema.CacheMetadata, layout: Layout, image_ids, num_specs: int,
               storage_options: dict | None = None, image_digests: np.ndarray | None = None) -> CacheWriter:
        """A new, empty cache (the caller decides whether an existing store may be replaced)."""
        # Identity first, in the group's own metadata document: a dump killed while creating the
        # arrays leaves a store that a re-run recognises as its own and creates again.
        group = open_group(url, mode="w", storage_options=storage_options,
                           attributes={schema.ATTRS_KEY: meta.to_json()})
        compressors = _compressors(meta.layout.compressor)
        two = meta.regions.two_spaces
        dense = (layout.total_rows, layout.chunk_rows, layout.rows_per_shard)
        region = (layout.num_shards * layout.region_rows_per_shard, layout.region_chunk_rows,
                  layout.region_rows_per_shard) if two else dense

        def create(name, width, dtype, space, fill=0, compress=True):
            total, chunk, shard = space
            inner = (width,) if width else ()
            group.create_array(name, shape=(total, *inner), chunks=(chunk, *inner), shards=(shard, *inner),
                               dtype=dtype, fill_value=fill, compressors=compressors if compress else None)

        create(schema.BOX, meta.box_row_width, meta.box_dtype, region)
        if meta.box_dtype == "uint8":
            for name in (schema.BOX_LO, schema.BOX_SCALE):
                create(name, 4, "float16", region, compress=False)
        if meta.regions.sparse:
            create(schema.LOCATION, None, "int32", region, fill=-1, compress=False)
        if two:  # every location: the expected edges and the top-k class logits
            k = meta.regions.cls_topk
            create(schema.EDGES, 4, "float16", dense)
            create(schema.CLS_TOPK, k, "float16", dense)
            create(schema.CLS_INDEX, k, "uint8" if meta.num_classes <= 256 else "int16", dense)
            create(schema.CLS_FLOOR, None, "float16", dense)
        elif meta.has_cls:
            create(schema.CLS, meta.num_classes, meta.cls_dtype, dense)
        views = group.create_group("views")
        for name, values in view_table(layout).items():
            views.create_array(name, data=np.ascontiguousarray(values))
        dataset = group.create_group("dataset")
        dataset.create_array("image_ids", data=np.asarray(image_ids, dtype=np.int64))
        dataset.create_array("lookup", data=layout.lookup(len(image_ids), num_specs))
        if image_digests is not None:
            dataset.create_array("image_digests", data=np.ascontiguousarray(image_digests, dtype=np.uint8))
        # Last: a store without progress was killed while being created (resume() creates it again),
        # so a resumed store always has its whole view table. One chunk per flag: ranks of a
        # distributed dump never write the same object.
        group.create_array(schema.PROGRESS, shape=(layout.num_shards,), chunks=(1,), dtype="uint8", fill_value=0)
        return cls(group, meta)

    @classmethod
    def resume(cls, url: str, storage_options: dict | None = None, clean: bool = True) -> CacheWriter | None:
        """The writer of an existing cache, or None if its creation never finished. clean: remove
        the leftovers of killed writes (only while no other writer is running: rank 0 before the
        others start, never a rank that joins a store rank 0 may already be writing to)."""
        if clean:
            _remove_partial_writes(url)
        group = open_group(url, mode="r+", storage_options=storage_options)
        meta = schema.CacheMetadata.from_json(dict(group.attrs.get(schema.ATTRS_KEY, {})), url)
        try:
            writer = cls(group, meta)
            writer.shards_done()
        except (KeyError, FileNotFoundError):
            return None
        return writer

    def shards_done(self) -> np.ndarray:
        return self._progress[:].astype(bool)

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """arrays: name -> [rows per shard of its space, width] buffer holding the whole shard
        (unused rows = fill)."""
        for name, array in self._arrays.items():
            data, rows = arrays[name], self.meta.layout.rows_per_shard_of(name, self.meta.regions)
            if data.shape[0] != rows:
                raise ValueError(f"shard buffer {name} has {data.shape[0]} rows, expected {rows}")
            array[shard * rows:(shard + 1) * rows] = data
        self._progress[shard] = 1  # only now is the shard done

    def finalize(self) -> None:
        if not self.shards_done().all():
            missing = int((~self.shards_done()).sum())
            raise RuntimeError(f"cannot finalize: {missing} shards are not written")
        self.meta = self.meta.completed()
        self.group.attrs[schema.ATTRS_KEY] = self.meta.to_json()

    def array_names(self) -> list[str]:
        return list(self._arrays)


def _remove_partial_writes(url: str) -> None:
    """A local store writes each object to a temporary `*.partial` file and renames it; a killed
    write leaves that file behind (up to a shard's size). The object itself was never replaced, so
    the leftover is garbage: remove it before resuming."""
    if is_url(url) and not str(url).startswith("file://"):
        return
    root = Path(str(url).removeprefix("file://"))
    for leftover in root.rglob("*.partial"):
        try:
            leftover.unlink(missing_ok=True)
        except OSError:  # a read-only store: harmless, and a shard write says so if one is needed
            pass


def what_is_at(out: str, storage_options: dict | None) -> str | None:
    """What a new store at `out` would replace (it clears its location first): None (nothing, or an
    empty folder), "zarr" (a Zarr store: its root metadata document) or "other" (other files).
    A killed local write's `*.partial` leftover is the store's own, not another file."""
    roots = ("zarr.json", ".zgroup", ".zarray")  # Zarr v3, or v2
    if not is_url(out) or out.startswith("file://"):
        path = Path(out.removeprefix("file://"))
        if any((path / name).is_file() for name in roots):
            return "zarr"
        if path.is_dir():
            return "other" if any(not p.name.endswith(".partial") for p in path.iterdir()) else None
        return "other" if path.exists() else None
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
        root = root.rstrip("/")
        if any(fs.exists(f"{root}/{name}") for name in roots):
            return "zarr"
        return "other" if fs.ls(root, detail=False) else None
    except OSError:  # nothing there (or nothing this user may list)
        return None
