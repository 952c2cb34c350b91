"""COCO dataset: mmdet's annotation rules, filtering, per-view samples, collate, loader workers."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from data.coco import CocoDetection, collate
from data.coco_json import labels_to_cat_ids
from data.views import ViewSpec, build_view_input

SMALL_ORIG = ViewSpec(flip=False, img_scale=(128, 96))
SMALL_FLIP = ViewSpec(flip=True, img_scale=(128, 96))

# (id, file, width, height), listed out of id order on purpose
IMAGES = [
    (5, "e.png", 40, 36),
    (1, "a.png", 64, 48),
    (3, "c.png", 60, 40),
    (2, "b.png", 50, 40),
    (4, "d.png", 20, 20),
]
CATEGORIES = [{"id": 12, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]


def _ann(ann_id, image_id, category_id, bbox, **extra):
    area = extra.pop("area", bbox[2] * bbox[3])
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox}
    return {**ann, "area": area, "iscrowd": 0, **extra}


ANNOTATIONS = [
    _ann(10, 1, 7, [4, 6, 20, 10]),  # usable -> label 1
    _ann(11, 1, 12, [30, 20, 30, 25]),  # usable -> label 2
    _ann(12, 1, 3, [0, 0, 10, 10], iscrowd=1),  # crowd: ignored
    _ann(13, 1, 3, [5, 5, 0.5, 10]),  # w < 1: dropped
    _ann(14, 1, 3, [5, 5, 10, 10], area=0),  # area 0: dropped
    _ann(15, 1, 3, [70, 10, 5, 5]),  # starts right of the 64 px wide image: no overlap, dropped
    _ann(16, 1, 3, [-10, 40, 20, 20]),  # overlaps partly: kept, unclipped in original pixels
    _ann(17, 1, 3, [1, 1, 5, 5], ignore=1),  # mmdet's 'ignore' flag: dropped
    _ann(18, 1, 3, [63.9999999, 10, 5, 5]),  # overlaps by 1e-7 px: usable, empty once in float32
    _ann(20, 2, 3, [1, 1, 20, 20], iscrowd=1),  # image 2 has only a crowd box
    _ann(30, 4, 7, [2, 2, 10, 10]),  # image 4 is below min_size
    _ann(50, 5, 3, [1, 1, 0.2, 0.2]),  # image 5 has only a degenerate box
]


def write_coco(root, annotations=ANNOTATIONS, images=IMAGES, write_pixels=True):
    """Tiny COCO set under root: images/ with random PNGs (lossless) and ann.json."""
    image_dir = root / "images"
    image_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    if write_pixels:
        for _, name, w, h in images:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_dir / name)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
        "annotations": annotations,
        "categories": CATEGORIES,
    }))
    return image_dir, ann_file


@pytest.fixture
def coco_dir(tmp_path):
    return write_coco(tmp_path)


def test_category_mapping_non_contiguous_ids(coco_dir):
    ds = CocoDetection(*coco_dir, views=[SMALL_ORIG])
    assert ds.cat_ids == [3, 7, 12]  # sorted ids, whatever the order in the json
    assert ds.class_names == ["car", "train", "kite"]
    assert labels_to_cat_ids([2, 0, 1], ds.label_to_cat_id) == [12, 3, 7]


def test_usable_boxes_follow_mmdet_rules(coco_dir):
    ds = CocoDetection(*coco_dir, views=[SMALL_ORIG])
    boxes, labels = ds.ground_truth(ds.image_ids.index(1))
    # annotations 10, 11, 16, 18 survive (crowd, w < 1, area 0, no overlap, 'ignore' do not);
    # xywh -> (x, y, x + w, y + h)
    expected = torch.tensor(
        [[4, 6, 24, 16], [30, 20, 60, 45], [-10, 40, 10, 60], [63.9999999, 10, 68.9999999, 15]]
    )
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(boxes, expected.float())
    assert labels.tolist() == [1, 2, 0, 0]  # category 7 -> 1, 12 -> 2, 3 -> 0, in annotation order
    for image_id in (2, 5):  # only crowd / only degenerate annotations: no usable box
        assert ds.ground_truth(ds.image_ids.index(image_id))[0].shape == (0, 4)


def test_train_filters_unannotated_and_small_images_eval_keeps_all(coco_dir):
    train = CocoDetection(*coco_dir, views=[SMALL_ORIG], train=True)
    # 3 has no annotation, 4 is 20 px < min_size 32; 2 and 5 have (unusable) annotations, which is
    # what mmdet's filter_empty_gt looks at, so they stay
    assert train.image_ids == [1, 2, 5]
    evaluation = CocoDetection(*coco_dir, views=[SMALL_ORIG], train=False)
    assert evaluation.image_ids == [1, 2, 3, 4, 5]  # every image, sorted by id
    assert len(evaluation) == 5
    assert CocoDetection(*coco_dir, views=[SMALL_ORIG], min_size=10).image_ids == [1, 2, 4, 5]


def test_ann_sha256_is_the_file_digest(coco_dir):
    ds = CocoDetection(*coco_dir, views=[SMALL_ORIG])
    assert ds.ann_sha256 == hashlib.sha256(coco_dir[1].read_bytes()).hexdigest()


def test_unknown_category_names_annotation_and_category(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, ANNOTATIONS + [_ann(99, 1, 42, [1, 1, 5, 5])])
    with pytest.raises(UserError, match="annotation 99 .*category_id 42"):
        CocoDetection(image_dir, ann_file, views=[SMALL_ORIG])


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"annotations": [], "categories": []}',
        '{"images": [{"id": 1}], "categories": [{"id": 1}]}',
        '{"images": [], "annotations": [{"id": 1, "image_id": 1}], "categories": [{"id": 1}]}',
    ],
)
def test_malformed_json_is_a_one_line_user_error(tmp_path, content):
    image_dir, ann_file = write_coco(tmp_path, write_pixels=False)
    ann_file.write_text(content)
    with pytest.raises(UserError) as info:
        CocoDetection(image_dir, ann_file, views=[SMALL_ORIG])
    # the CLI prints the message as is: one line that names the file
    assert str(ann_file) in str(info.value) and "\n" not in str(info.value)


def test_missing_files_and_folders_are_user_errors(tmp_path, coco_dir):
    image_dir, ann_file = coco_dir
    with pytest.raises(UserError, match="nope.json"):
        CocoDetection(image_dir, tmp_path / "nope.json", views=[SMALL_ORIG])
    with pytest.raises(UserError, match="images directory"):
        CocoDetection(tmp_path / "no_images", ann_file, views=[SMALL_ORIG])
    (image_dir / "a.png").unlink()
    ds = CocoDetection(image_dir, ann_file, views=[SMALL_ORIG])
    assert ds.view_record(0).resized_hw == (96, 128)  # geometry needs the json only, not the pixels
    with pytest.raises(UserError, match=r"a\.png not found, but .*ann\.json references it"):
        ds[0]


def test_corrupt_image_and_size_mismatch_are_user_errors(coco_dir):
    image_dir, ann_file = coco_dir
    (image_dir / "a.png").write_bytes(b"not a png")
    Image.new("RGB", (30, 30)).save(image_dir / "b.png")  # the json says 50x40
    ds = CocoDetection(image_dir, ann_file, views=[SMALL_ORIG])
    with pytest.raises(UserError, match="cannot be read"):
        ds[0]
    with pytest.raises(UserError, match=r"b\.png.*width/height"):
        ds[1]


def test_samples_for_plain_and_flipped_views(coco_dir):
    image_dir, ann_file = coco_dir
    ds = CocoDetection(image_dir, ann_file, views=[SMALL_ORIG, SMALL_FLIP])
    pixels = torch.from_numpy(np.array(Image.open(image_dir / "a.png"))).permute(2, 0, 1)
    assert torch.equal(ds.load_image(0), pixels)  # PNG is lossless: exactly the stored pixels

    plain, flipped = ds[0, 0], ds[(0, 1)]
    assert torch.equal(ds[0].image, plain.image)  # a plain int means view 0
    # 64x48 fitted into (128, 96): scale 2 -> 128x96, already a multiple of 32
    assert plain.record.resized_hw == (96, 128) and plain.image.shape == (3, 96, 128)
    assert torch.equal(plain.image, build_view_input(pixels, plain.record))
    # no padding here, so the whole canvas mirrors
    assert torch.equal(flipped.image, plain.image.flip(-1))
    # scale 2; annotation 18 collapses to zero width at the border and is dropped; 16 is clipped
    expected = torch.tensor([[8.0, 12, 48, 32], [60, 40, 120, 90], [0, 80, 20, 96]])
    assert torch.equal(plain.boxes, expected) and plain.labels.tolist() == [1, 2, 0]
    x1, y1, x2, y2 = expected.unbind(1)
    mirrored = torch.stack([128 - x2, y1, 128 - x1, y2], 1)  # x -> 128 - x, the resized width
    assert torch.equal(flipped.boxes, mirrored) and flipped.labels.tolist() == [1, 2, 0]
    assert plain.index == flipped.index == 0 and flipped.record.flip and not plain.record.flip


def test_collate_pads_with_zeros_and_keeps_records(coco_dir):
    ds = CocoDetection(*coco_dir, views=[SMALL_ORIG, SMALL_FLIP])
    a, b = ds[0, 0], ds[1, 1]  # 64x48 -> 96x128; 50x40 -> scale 2.4 -> 96x120, padded 96x128
    c = ds[2, 0]  # image 5, 40x36 -> scale min(3.2, 2.67) -> 96x107, padded 96x128
    small = CocoDetection(*coco_dir, views=[ViewSpec(flip=False, img_scale=(64, 48))], train=False)
    d = small[small.image_ids.index(3)]  # 60x40 -> scale 64/60 -> 43x64, padded 64x64
    batch = collate([a, d, c])
    assert batch.images.shape == (3, 3, 96, 128)  # the largest canvas in the batch
    assert torch.equal(batch.images[1, :, :64, :64], d.image)
    assert torch.all(batch.images[1, :, 64:, :] == 0) and torch.all(batch.images[1, :, :, 64:] == 0)
    assert batch.records == [a.record, d.record, c.record] and batch.indices == [0, d.index, 2]
    assert [len(x) for x in batch.boxes] == [len(x) for x in batch.labels] == [3, 0, 0]
    assert collate([b]).images.shape == (1, 3, 96, 128)


def test_dataloader_workers_match_single_process(coco_dir):
    ds = CocoDetection(*coco_dir, views=[SMALL_ORIG, SMALL_FLIP], train=False)
    keys = [(i, i % 2) for i in range(len(ds))]

    def load(num_workers):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=2, sampler=keys, collate_fn=collate, num_workers=num_workers
        )
        return list(loader)

    # Loader workers run torch single-threaded, and CPU bilinear interpolation can differ in the
    # last bit with the thread count (see test_views' xfail), so compare at equal thread counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_process = load(0)
    finally:
        torch.set_num_threads(threads)
    for single, multi in zip(single_process, load(2), strict=True):
        assert torch.equal(single.images, multi.images)  # the view transform is deterministic
        assert all(torch.equal(x, y) for x, y in zip(single.boxes, multi.boxes))
        assert single.records == multi.records and single.indices == multi.indices


def test_a_16_bit_grey_image_trains_as_its_high_byte_in_three_channels(coco_dir):
    """PIL's convert("RGB") clips a 16-bit grey PNG's values above 255 to white; the dataset keeps
    each value's high byte, as OpenCV (mmdetection's reader) does, in all three channels."""
    image_dir, ann_file = coco_dir
    rng = np.random.default_rng(1)
    grey, low = rng.integers(0, 256, (2, 48, 64), dtype=np.uint8)  # a.png is 64x48
    Image.fromarray(grey.astype(np.uint16) * 256 + low).save(image_dir / "a.png")  # high byte: grey
    with Image.open(image_dir / "a.png") as image:
        assert image.mode.startswith("I")
    pixels = CocoDetection(image_dir, ann_file, views=[SMALL_ORIG]).load_image(0)
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, torch.from_numpy(grey).expand(3, -1, -1))
