"""The direct shard-file reader returns exactly what zarr returns, for every layout it accepts, and
steps aside (zarr reads) for every layout it does not."""

import numpy as np
import pytest

from cache_teacher.rawshards import open_raw
from cache_teacher.reader import CacheReader
from tests.conftest import dump_tiny_cache


def _dump(tiny, teacher, out, **kw):
    return CacheReader(dump_tiny_cache(tiny, teacher, out, img_scale=(160, 160), shard_mb=0.05, **kw))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


@pytest.mark.parametrize("kind", ["fp16", "uint8", "sparse", "ld+bckd"])
def test_raw_reads_equal_zarr_reads(kind, tiny_coco, tiny_teacher, tmp_path):
    kw = {"fp16": {}, "uint8": {"box_dtype": "uint8"},
          "sparse": {"store_regions": "main+vlr", "min_vlr_gamma": 0.25},
          "ld+bckd": {"store_regions": "ld+bckd", "box_dtype": "uint8", "cls_topk": 2}}[kind]  # two row spaces
    cache = _dump(tiny_coco, tiny_teacher["path"], tmp_path / "c.zarr", **kw)
    names = cache.array_names()
    raws = {n: cache.raw(n) for n in names}
    assert all(r is not None for r in raws.values()), raws
    assert max(r.read(0, 0).shape[0] for r in raws.values()) == 0
    num_shards = {n: -(-cache.array(n).shape[0] // raws[n].shard_rows) for n in names}
    assert max(num_shards.values()) >= 3  # small shards: views and reads cross shard boundaries
    for v in range(len(cache.records)):  # every view, as the loader reads it
        expected = cache.read_rows(v, ("box", "cls", "edges"), direct=False)  # through zarr-python
        got = cache.read_rows(v, ("box", "cls", "edges"))
        assert set(got) == set(expected) == set(names)
        assert all(_same(got[n], expected[n]) for n in names), v
    for n in names:  # whole array in uneven pieces: shard padding (chunks never written) included
        total, step = cache.array(n).shape[0], raws[n].shard_rows // 3 + 7
        for a in range(0, total, step):
            assert _same(raws[n].read(a, min(total, a + step)), cache.array(n)[a:min(total, a + step)]), (n, a)
    with pytest.raises(IndexError):
        raws["box"].read(0, cache.array("box").shape[0] + 1)


def test_other_layouts_read_through_zarr(tiny_coco, tiny_teacher, tmp_path):
    compressed = _dump(tiny_coco, tiny_teacher["path"], tmp_path / "zstd.zarr", compressor="zstd")
    assert compressed.raw("box") is None and compressed.raw("cls") is None
    assert compressed.read_rows(0)["box"].shape[0] == compressed.num_rows[0]
    assert open_raw(tmp_path / "zstd.zarr" / "views" / "image_id") is None  # not sharded
    assert open_raw(tmp_path / "nowhere") is None


def test_a_damaged_shard_index_is_an_error_not_wrong_rows(tiny_coco, tiny_teacher, tmp_path):
    cache = _dump(tiny_coco, tiny_teacher["path"], tmp_path / "c.zarr")
    shard = tmp_path / "c.zarr" / "box" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before the checksum
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match="checksum"):
        cache.raw("box").read(0, 1)
