"""Where every view's rows live in a teacher cache: the physical layout (pure arithmetic on view
sizes, known before any teacher runs) and the view table that records it.

Views are ordered by padded canvas, then image, then view spec, so a dump can batch equal canvases
(GroupNorm makes a view's maps depend on its canvas); they are packed into shards of
rows_per_shard rows without straddling a shard boundary; each shard is written whole by one writer,
and the unused tail of a shard is fill value (nothing on disk when a whole inner chunk is unused).
An ld+bckd cache has a second row space for its region rows (with_region_space): shard s of it
holds the region rows of the views of dense shard s, so one writer still owns whole shards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from core.errors import UserError
from data.views import ViewRecord

VIEW_FIELDS = ("image_id", "image_index", "spec_index", "flip", "img_scale", "orig_hw", "resized_hw",
               "padded_hw", "level_hw", "row_offset", "num_rows")
REGION_FIELDS = ("region_offset", "region_rows")  # ld+bckd caches only


@dataclass(frozen=True)
class Layout:
    """Where every view's rows live. Arrays are in physical view order."""

    records: list[ViewRecord]
    image_index: np.ndarray  # [V] dataset index of each view's image
    spec_index: np.ndarray  # [V] index into the view specs
    row_offset: np.ndarray  # [V] int64
    num_rows: np.ndarray  # [V] int64
    shard_of_view: np.ndarray  # [V] int64
    rows_per_shard: int
    chunk_rows: int
    num_shards: int
    region_offset: np.ndarray | None = None  # [V] ld+bckd: where each view's region rows start
    region_rows: np.ndarray | None = None  # [V] and how many it has
    region_rows_per_shard: int | None = None
    region_chunk_rows: int | None = None

    @property
    def total_rows(self) -> int:
        return self.num_shards * self.rows_per_shard

    def rows_of(self, space: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(row offsets, row counts, rows per shard) of the dense space or the region space."""
        if space == "region":
            return self.region_offset, self.region_rows, self.region_rows_per_shard
        return self.row_offset, self.num_rows, self.rows_per_shard

    def views_of_shard(self, shard: int) -> range:
        idx = np.nonzero(self.shard_of_view == shard)[0]
        return range(int(idx[0]), int(idx[-1]) + 1) if len(idx) else range(0)

    def batches_of_shard(self, shard: int, batch_size: int) -> list[list[int]]:
        """Consecutive views of a shard in runs of equal canvas, cut into batches: fixed for a
        shard, so a resumed shard is computed with exactly the batches of an uninterrupted run."""
        batches, current = [], []
        for v in self.views_of_shard(shard):
            if current and (len(current) == batch_size
                            or self.records[v].padded_hw != self.records[current[0]].padded_hw):
                batches.append(current)
                current = []
            current.append(v)
        if current:
            batches.append(current)
        return batches

    def lookup(self, num_images: int, num_specs: int) -> np.ndarray:
        table = np.full((num_images, num_specs), -1, dtype=np.int64)
        table[self.image_index, self.spec_index] = np.arange(len(self.records))
        return table


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def plan_layout(records_per_image: list[list[ViewRecord]], row_bytes: int, shard_mb: float = 64.0,
                chunk_rows: int | None = None, rows_per_view: list[list[int]] | None = None) -> Layout:
    """records_per_image[i][s] = view s of image i -> the physical layout (pure arithmetic).
    rows_per_view[i][s] overrides a view's row count (region-sparse caches store fewer rows)."""
    entries = [(rec.padded_hw, i, s, rec) for i, recs in enumerate(records_per_image) for s, rec in enumerate(recs)]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    count = (lambda e: rows_per_view[e[1]][e[2]]) if rows_per_view is not None else (lambda e: e[3].num_rows)
    rows = np.array([count(e) for e in entries], dtype=np.int64)
    if len(rows) == 0:
        raise UserError("the dataset has no images to cache; check the annotation file")
    if chunk_rows is None:
        # Small enough that reading one view over-reads little, large enough to keep the shard index small.
        typical = int(np.median(rows[rows > 0])) if (rows > 0).any() else 1
        chunk_rows = min(16384, max(128, _pow2_floor(typical // 2)))
    max_rows = int(rows.max())
    target = int(shard_mb * 2**20 / max(row_bytes, 1))
    rows_per_shard = max(target, max_rows)
    rows_per_shard = -(-rows_per_shard // chunk_rows) * chunk_rows  # whole inner chunks
    offsets, shards = np.zeros_like(rows), np.zeros_like(rows)
    shard, used = 0, 0
    for v, n in enumerate(rows):
        if used + n > rows_per_shard:  # a view never straddles two shards
            shard, used = shard + 1, 0
        offsets[v], shards[v] = shard * rows_per_shard + used, shard
        used += n
    return Layout(
        records=[e[3] for e in entries],
        image_index=np.array([e[1] for e in entries], dtype=np.int64),
        spec_index=np.array([e[2] for e in entries], dtype=np.int64),
        row_offset=offsets, num_rows=rows, shard_of_view=shards,
        rows_per_shard=rows_per_shard, chunk_rows=chunk_rows, num_shards=shard + 1,
    )


def with_region_space(layout: Layout, rows_per_view: list[list[int]], chunk_rows: int | None = None) -> Layout:
    """The layout with a second row space: view v's rows_per_view[image][spec] region rows, packed
    in shard order (shard s of the region space holds the views of dense shard s)."""
    rows = np.array([rows_per_view[int(i)][int(s)] for i, s in zip(layout.image_index, layout.spec_index)],
                    dtype=np.int64)
    per_shard = np.bincount(layout.shard_of_view, weights=rows, minlength=layout.num_shards).astype(np.int64)
    if chunk_rows is None:
        typical = int(np.median(rows[rows > 0])) if (rows > 0).any() else 1
        chunk_rows = min(16384, max(64, _pow2_floor(max(typical // 2, 1))))
    rows_per_shard = -(-max(int(per_shard.max()), 1) // chunk_rows) * chunk_rows
    offsets = np.zeros_like(rows)
    used = np.zeros(layout.num_shards, dtype=np.int64)
    for v, n in enumerate(rows):
        shard = int(layout.shard_of_view[v])
        offsets[v] = shard * rows_per_shard + used[shard]
        used[shard] += n
    return dataclasses.replace(layout, region_offset=offsets, region_rows=rows, region_rows_per_shard=rows_per_shard,
                               region_chunk_rows=chunk_rows)


def view_table(layout: Layout) -> dict[str, np.ndarray]:
    """The views/* arrays of a layout."""
    recs = layout.records
    return {
        "image_id": np.array([r.image_id for r in recs], dtype=np.int64),
        "image_index": layout.image_index,
        "spec_index": layout.spec_index,
        "flip": np.array([r.flip for r in recs], dtype=np.uint8),
        "img_scale": np.array([r.img_scale for r in recs], dtype=np.int32).reshape(-1, 2),
        "orig_hw": np.array([r.orig_hw for r in recs], dtype=np.int32).reshape(-1, 2),
        "resized_hw": np.array([r.resized_hw for r in recs], dtype=np.int32).reshape(-1, 2),
        "padded_hw": np.array([r.padded_hw for r in recs], dtype=np.int32).reshape(-1, 2),
        "level_hw": np.array([r.level_hw for r in recs], dtype=np.int32),
        "row_offset": layout.row_offset,
        "num_rows": layout.num_rows,
        **({"region_offset": layout.region_offset, "region_rows": layout.region_rows}
           if layout.region_offset is not None else {}),
    }


def records_from_table(table: dict[str, np.ndarray]) -> list[ViewRecord]:
    return [
        ViewRecord(
            image_id=int(table["image_id"][v]), flip=bool(table["flip"][v]),
            img_scale=tuple(int(x) for x in table["img_scale"][v]), orig_hw=tuple(int(x) for x in table["orig_hw"][v]),
            resized_hw=tuple(int(x) for x in table["resized_hw"][v]),
            padded_hw=tuple(int(x) for x in table["padded_hw"][v]),
            level_hw=tuple(tuple(int(x) for x in hw) for hw in table["level_hw"][v]),
        )
        for v in range(len(table["image_id"]))
    ]
