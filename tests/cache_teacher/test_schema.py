"""The cache contract: metadata parsed once, written as format v1, identity and its mismatches."""

import dataclasses

import pytest

from cache_teacher import schema
from cache_teacher.layout import plan_layout
from core.errors import UserError
from data.views import ViewSpec, plan_view

SPECS = [ViewSpec(False, (200, 200)), ViewSpec(True, (200, 200))]


def _records(sizes):
    return [[plan_view(i + 1, hw, spec) for spec in SPECS] for i, hw in enumerate(sizes)]


def _meta(**kw):
    layout = plan_layout(_records([(200, 150)]), row_bytes=160)
    args = dict(teacher_config={"depth": 50}, teacher_sha256="a" * 64, ann_sha256="b" * 64, image_ids=[1],
                specs=SPECS, strides=(8, 16, 32, 64, 128), reg_max=16, num_classes=80, box_dtype="float16",
                cls_dtype="float16", layout=layout, compressor="none", package_version="t", created="now")
    return schema.build_metadata(**{**args, **kw})


def test_identity_mismatches_name_each_difference():
    layout = plan_layout(_records([(200, 150)]), row_bytes=160)
    meta = schema.build_metadata(
        teacher_config={"depth": 50}, teacher_sha256="a" * 64, ann_sha256="b" * 64, image_ids=[1],
        specs=SPECS, strides=(8, 16, 32, 64, 128), reg_max=16, num_classes=80, box_dtype="float16",
        cls_dtype="float16", layout=layout, compressor="none", package_version="t", created="now")
    assert meta.mismatches(num_classes=80, image_ids=[1], specs=SPECS) == []
    problems = meta.mismatches(
        num_classes=7, reg_max=8, ann_sha256="c" * 64, image_ids=[2], strides=(8, 16),
        specs=[ViewSpec(False, (100, 100))], transform={**schema.transform_spec(), "size_divisor": 64},
    )
    text = " | ".join(problems)
    for expected in ("num_classes", "reg_max", "annotation file", "image ids", "strides", "not cached",
                     "transform size_divisor"):
        assert expected in text, expected


@pytest.mark.parametrize("kw", [{}, {"box_dtype": "uint8", "cls_dtype": None},
                                {"regions": schema.Regions("main+vlr", 0.25, "official", "atss-topk9", 10, 40)}])
def test_metadata_round_trips_through_its_json_document(kw):
    meta = _meta(**kw)
    doc = meta.to_json()
    assert doc["format"] == schema.FORMAT_NAME and doc["format_version"] == schema.FORMAT_VERSION
    assert doc["box"]["row_width"] == 68 and (doc["cls"] is None) == (meta.cls_dtype is None)
    assert (doc["box"]["quantization"] is not None) == (meta.box_dtype == "uint8")
    assert schema.CacheMetadata.from_json(doc, "here") == meta  # parsed once, nothing lost


def test_identity_ignores_history_but_not_content():
    meta = _meta()
    later = dataclasses.replace(meta, created="later", complete=True, package_version="9", source={"ann": "x"})
    assert meta.identity_differences(later) == []  # when, by which version and from where: not identity
    assert meta.identity_differences(_meta(cls_dtype=None)) == ["cls"]
    assert meta.identity_differences(_meta(specs=SPECS[:1])) == ["views"]


def test_precision_is_identity_once_both_caches_record_it():
    bf16, fp32, unrecorded = _meta(precision="bf16"), _meta(precision="fp32"), _meta()
    assert bf16.identity_differences(fp32) == ["precision"] and fp32.identity_differences(bf16) == ["precision"]
    assert unrecorded.identity_differences(bf16) == [] and bf16.identity_differences(unrecorded) == []
    assert "precision" not in unrecorded.to_json()  # a cache from before: its document key for key
    assert schema.CacheMetadata.from_json(bf16.to_json(), "here").precision == "bf16"


@pytest.mark.parametrize("doc, fragment", [
    ({}, "not an ldcache teacher cache"),
    ({"format": schema.FORMAT_NAME, "format_version": 99}, "format v99"),
    ({"format": schema.FORMAT_NAME, "format_version": schema.FORMAT_VERSION, "teacher": {}}, "damaged"),
])
def test_foreign_or_damaged_metadata_is_a_user_error(doc, fragment):
    with pytest.raises(UserError, match=fragment):
        schema.CacheMetadata.from_json(doc, "store.zarr")
