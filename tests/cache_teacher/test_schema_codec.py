import numpy as np
import torch

from cache_teacher import schema
from cache_teacher.codec import all_finite, decode_rows, encode_rows
from cache_teacher.fidelity import edge_kl
from detector.views import ViewSpec, plan_view

SPECS = [ViewSpec(False, (200, 200)), ViewSpec(True, (200, 200))]


def _records(sizes):
    return [[plan_view(i + 1, hw, spec) for spec in SPECS] for i, hw in enumerate(sizes)]


def test_layout_packs_whole_views_into_shards_grouped_by_canvas():
    sizes = [(200, 150), (120, 200), (200, 200), (90, 120), (200, 150), (150, 200)]
    layout = schema.plan_layout(_records(sizes), row_bytes=160, shard_mb=0.002)
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
    a = schema.plan_layout(_records([(200, 150), (90, 120)]), row_bytes=160, shard_mb=1)
    b = schema.plan_layout(_records([(200, 150), (90, 120)]), row_bytes=160, shard_mb=1)
    assert np.array_equal(a.row_offset, b.row_offset) and a.rows_per_shard == b.rows_per_shard


def test_identity_mismatches_name_each_difference():
    layout = schema.plan_layout(_records([(200, 150)]), row_bytes=160)
    meta = schema.build_metadata(
        teacher_config={"depth": 50}, teacher_sha256="a" * 64, ann_sha256="b" * 64, image_ids=[1], num_images=1,
        specs=SPECS, strides=(8, 16, 32, 64, 128), reg_max=16, num_classes=80, box_dtype="float16",
        cls_dtype="float16", layout=layout, compressor="none", package_version="t", created="now")
    assert schema.identity_mismatches(meta, {"num_classes": 80, "image_ids": [1], "specs": SPECS}) == []
    problems = schema.identity_mismatches(meta, {
        "num_classes": 7, "reg_max": 8, "ann_sha256": "c" * 64, "image_ids": [2], "strides": (8, 16),
        "specs": [ViewSpec(False, (100, 100))], "transform": {**schema.transform_spec(), "size_divisor": 64},
    })
    text = " | ".join(problems)
    for expected in ("num_classes", "reg_max", "annotation file", "image ids", "strides", "not cached",
                     "transform size_divisor"):
        assert expected in text, expected


def test_fp16_and_fp32_round_trip():
    rows = torch.randn(50, 68) * 5
    assert torch.equal(decode_rows(encode_rows(rows, "float32")["data"].numpy()), rows)  # fp32 is exact
    fp16 = decode_rows(encode_rows(rows, "float16")["data"].numpy())
    assert torch.allclose(fp16, rows, rtol=2**-11, atol=0)  # fp16 keeps 11 significant bits


def test_uint8_error_is_bounded_by_half_a_step():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 68, generator=gen) * torch.rand(500, 1, generator=gen) * 10
    rows[0] = 3.0  # a constant edge: zero span must not divide by zero
    enc = {k: v.numpy() for k, v in encode_rows(rows, "uint8", reg_max=16).items()}
    decoded = decode_rows(enc["data"], enc["lo"], enc["scale"])
    step = torch.from_numpy(enc["scale"].astype(np.float32)).repeat_interleave(17, dim=1)
    assert torch.all((decoded - rows).abs() <= step / 2 + 1e-6)  # the rounding error of one level at most
    assert torch.allclose(decoded[0], rows[0])
    # What it means for distillation: the KL at T=10 stays tiny.
    assert float(edge_kl(rows, decoded, 10.0).mean()) < 1e-4


def test_non_finite_rows_are_detected_in_every_encoding():
    rows = torch.randn(4, 68)
    rows[2, 5] = float("nan")
    rows[3, 0] = float("inf")
    for dtype in ("float16", "uint8", "float32"):
        enc = {k: v.numpy() for k, v in encode_rows(rows, dtype, reg_max=16).items()}
        assert all_finite(enc).tolist() == [True, True, False, False], dtype


def test_edge_kl_is_the_mean_over_bins_times_t_squared():
    s, t = torch.randn(3, 68), torch.randn(3, 68)
    p = torch.softmax(s.reshape(-1, 17) / 2, -1)
    q = torch.softmax(t.reshape(-1, 17) / 2, -1)
    expected = 4 * (p * (p.log() - q.log())).mean(-1)  # ld-spec section 4 with T = 2
    assert torch.allclose(edge_kl(s, t, 2.0).float(), expected, atol=1e-6)
    assert float(edge_kl(s, s, 10.0).abs().max()) < 1e-7  # KL of a distribution with itself
