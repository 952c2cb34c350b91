"""Where rows live: the physical layout of a cache, from view sizes alone."""

import numpy as np

from cache_teacher.layout import plan_layout
from data.views import ViewSpec, plan_view

SPECS = [ViewSpec(False, (200, 200)), ViewSpec(True, (200, 200))]


def _records(sizes):
    return [[plan_view(i + 1, hw, spec) for spec in SPECS] for i, hw in enumerate(sizes)]


def test_layout_packs_whole_views_into_shards_grouped_by_canvas():
    sizes = [(200, 150), (120, 200), (200, 200), (90, 120), (200, 150), (150, 200)]
    layout = plan_layout(_records(sizes), row_bytes=160, shard_mb=0.002)
    ends = layout.row_offset + layout.num_rows
    # No view straddles a shard and views never overlap.
    assert np.all(layout.row_offset // layout.rows_per_shard == (ends - 1) // layout.rows_per_shard)
    order = np.argsort(layout.row_offset)
    assert np.all(layout.row_offset[order][1:] >= ends[order][:-1])
    assert layout.num_shards > 2  # the tiny shard size forces several shards
    assert layout.rows_per_shard % layout.chunk_rows == 0  # shards are whole inner chunks
    # Physical order groups equal canvases, so a dump batches them without changing results.
    canvases = [r.padded_hw for r in layout.records]
    assert canvases == sorted(canvases)
    # lookup finds every (image, spec) pair.
    lookup = layout.lookup(len(sizes), len(SPECS))
    for v, rec in enumerate(layout.records):
        assert lookup[layout.image_index[v], layout.spec_index[v]] == v
        assert rec.image_id == layout.image_index[v] + 1


def test_layout_depends_only_on_sizes_and_views():
    a = plan_layout(_records([(200, 150), (90, 120)]), row_bytes=160, shard_mb=1)
    b = plan_layout(_records([(200, 150), (90, 120)]), row_bytes=160, shard_mb=1)
    assert np.array_equal(a.row_offset, b.row_offset) and a.rows_per_shard == b.rows_per_shard


def test_shard_batches_hold_equal_canvases_and_never_cross_a_shard():
    sizes = [(200, 150), (120, 200), (200, 200), (90, 120), (200, 150), (150, 200)]
    layout = plan_layout(_records(sizes), row_bytes=160, shard_mb=0.002)
    seen = []
    for shard in range(layout.num_shards):
        for batch in layout.batches_of_shard(shard, batch_size=2):
            assert 1 <= len(batch) <= 2
            assert len({layout.records[v].padded_hw for v in batch}) == 1  # one canvas per batch
            assert {int(layout.shard_of_view[v]) for v in batch} == {shard}
            seen += batch
    assert seen == list(range(len(layout.records)))  # every view once, in physical order
