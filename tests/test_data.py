"""Datasets and converters: COCO checks with counted skips, YOLO-seg / PNG / DAVIS converters,
synthetic scenes and clips."""
from __future__ import annotations

import json

import av
import cv2
import numpy as np
import pytest
from maskstream.model.converters import COCO80_IDS, davis_to_coco, instance_png_to_coco, yolo_seg_to_coco
from maskstream.model.datasets import (
    CocoDataset,
    DatasetError,
    DatasetSpec,
    SyntheticDataset,
    SyntheticSpec,
    open_dataset,
)
from maskstream.model.synthetic import make_clip, make_scene, to_coco, write_synthetic_clip, write_synthetic_dataset
from pycocotools import mask as mask_utils

from tests.shared_data import DATA, require


def write_image(path, h=40, w=60, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))


def square(x, y, size):
    return [x, y, x + size, y, x + size, y + size, x, y + size]


def coco_dict(annotations, images=None, categories=None):
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "box"}, {"id": 7, "name": "ball"}],
    }


def ann(ann_id, bbox, category=1, image=1, segmentation=None, **extra):
    seg = segmentation if segmentation is not None else [square(5, 5, 10)]
    return {"id": ann_id, "image_id": image, "category_id": category, "bbox": bbox, "segmentation": seg, **extra}


# --------------------------------------------------------------------------- COCO checks


def test_good_annotations_become_samples(tmp_path):
    write_image(tmp_path / "a.png")
    data = CocoDataset(coco_dict([ann(1, [5, 5, 10, 10]), ann(2, [20, 10, 8, 8], category=7)]), tmp_path)
    assert len(data) == 1 and data.class_names == ("__background__", "box", "ball")
    assert data.label_to_category == {1: 1, 2: 7}
    sample = data[0]
    assert sample.image.shape == (40, 60, 3) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.boxes, [[5, 5, 15, 15], [20, 10, 28, 18]])
    np.testing.assert_array_equal(sample.labels, [1, 2])
    assert sample.masks.shape == (2, 40, 60) and sample.masks.dtype == np.uint8
    assert sample.masks[0, 10, 10] == 1 and sample.masks[0, 30, 50] == 0
    assert data.describe_skips() == "nothing skipped"


def test_bad_annotations_are_skipped_and_counted(tmp_path):
    write_image(tmp_path / "a.png")
    anns = [
        ann(1, [5, 5, 10, 10]),  # fine
        ann(2, [5, 5, 0, 10]),  # zero width
        ann(3, [100, 100, 10, 10]),  # entirely outside the 60x40 image
        ann(4, [50, 30, 20, 20]),  # partly outside: clipped, kept
        ann(5, [5, 5, 10, 10], category=99),  # category id not in the categories list
        ann(6, [5, 5, 10, 10], image=42),  # image id not in the images list
        ann(7, [5, 5, 10, 10], segmentation=[[1, 2, 3]]),  # a "polygon" of 1.5 points
        ann(8, [5, 5, 10, 10], segmentation=[[30, 30, 30, 30, 30, 30]]),  # polygon with no area
        ann(9, [5, 5, "x", 10]),  # malformed box
        ann(10, [5, 5, 10, 10], iscrowd=1),  # crowd: evaluation only
    ]
    data = CocoDataset(coco_dict(anns), tmp_path)
    assert dict(data.skipped) == {
        "zero_area_box": 1,
        "out_of_image_box": 1,
        "unknown_category": 1,
        "unknown_image": 1,
        "bad_segmentation": 1,
        "empty_mask": 1,
        "bad_box": 1,
        "crowd": 1,
    }
    assert data.clipped_boxes == 1
    sample = data[0]
    np.testing.assert_array_equal(sample.boxes, [[5, 5, 15, 15], [50, 30, 60, 40]])
    gt_ids = [a["id"] for a in data.coco_gt()["annotations"]]
    assert gt_ids == [1, 4, 10]  # the crowd region stays for COCOeval
    assert "1 unknown category" in data.describe_skips() and "1 boxes clipped" in data.describe_skips()


def test_missing_images_and_empty_images(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "c.png")
    images = [
        {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 2, "file_name": "b.png", "height": 40, "width": 60},  # no such file
        {"id": 3, "file_name": "c.png", "height": 40, "width": 60},  # no annotations
    ]
    coco = coco_dict([ann(1, [5, 5, 10, 10]), ann(2, [5, 5, 10, 10], image=2)], images=images)
    data = CocoDataset(coco, tmp_path)
    assert data.skipped["missing_image"] == 1 and len(data) == 2
    assert [img["id"] for img in data.coco_gt()["images"]] == [1, 3]
    assert [a["id"] for a in data.coco_gt()["annotations"]] == [1]
    assert data[1].boxes.shape == (0, 4) and data[1].masks.shape == (0, 40, 60)
    train = CocoDataset(coco, tmp_path, drop_empty=True)
    assert len(train) == 1 and train.skipped["no_annotations"] == 1


@pytest.mark.parametrize(
    "coco, message",
    [
        ({"images": []}, "list under 'annotations'"),
        (coco_dict([], images=[{"id": 1, "file_name": "a.png", "height": 40, "width": 60}] * 2), "appears twice"),
        (coco_dict([], images=[{"id": 1, "file_name": "a.png", "height": 0, "width": 60}]), "positive int height"),
        (coco_dict([], images=[{"id": 1, "file_name": "zzz.png", "height": 4, "width": 6}]), "no usable images"),
        (coco_dict([], categories=[{"id": "1", "name": "box"}]), "expected an int 'id'"),
    ],
)
def test_unusable_datasets_raise_clear_errors(tmp_path, coco, message):
    write_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=message):
        CocoDataset(coco, tmp_path, source="my.json")


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such annotation file"):
        CocoDataset.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json: not valid JSON"):
        CocoDataset.from_json(tmp_path / "bad.json")
    write_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"categories \['horse'\] not in the dataset"):
        CocoDataset(coco_dict([]), tmp_path, categories=["horse"])


def test_unreadable_or_wrong_size_image_raises_when_read(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    data = CocoDataset(coco_dict([ann(1, [5, 5, 10, 10])]), tmp_path)
    with pytest.raises(DatasetError, match="a.png: missing or not a readable image"):
        data[0]
    write_image(tmp_path / "a.png", h=20, w=20)
    with pytest.raises(DatasetError, match="is 20x20, the annotation file says 60x40"):
        data[0]


def test_category_restriction_orders_labels(tmp_path):
    write_image(tmp_path / "a.png")
    data = CocoDataset(
        coco_dict([ann(1, [5, 5, 10, 10]), ann(2, [20, 10, 8, 8], category=7)]), tmp_path, categories=["ball"]
    )
    assert data.class_names == ("__background__", "ball") and data.label_to_category == {1: 7}
    np.testing.assert_array_equal(data[0].labels, [1])
    assert data.coco_gt()["categories"] == [{"id": 7, "name": "ball"}]
    assert data.skipped == {}  # leaving a category out is a choice, not a fault


def test_rle_segmentations(tmp_path):
    write_image(tmp_path / "a.png")
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:45] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    compressed["counts"] = compressed["counts"].decode("ascii")
    uncompressed = {"size": [40, 60], "counts": [10, 10, 30, 10, 2340]}  # column-major runs: x 0..1, y 10..19
    anns = [ann(1, [30, 10, 15, 10], segmentation=compressed), ann(2, [0, 10, 2, 10], segmentation=uncompressed)]
    sample = CocoDataset(coco_dict(anns), tmp_path)[0]
    np.testing.assert_array_equal(sample.masks[0], mask)
    assert sample.masks[1].sum() == 20 and sample.masks[1][10:20, 0:2].all()
    short = {"size": [40, 60], "counts": [10, 10]}  # runs that do not cover the image
    data = CocoDataset(coco_dict([ann(1, [5, 5, 10, 10]), ann(2, [0, 10, 2, 10], segmentation=short)]), tmp_path)
    assert data.skipped == {"bad_segmentation": 1}


# --------------------------------------------------------------------------- converters


def test_yolo_seg_converter(tmp_path):
    write_image(tmp_path / "images" / "train" / "000000000042.jpg", h=100, w=200)
    write_image(tmp_path / "images" / "train" / "000000000043.jpg", h=100, w=200)  # no label file: no objects
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "000000000042.txt").write_text(
        "0 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n\n2 0.6 0.6 0.9 0.6 0.9 0.9\n"
    )
    coco = yolo_seg_to_coco(tmp_path, "train")
    assert [i["id"] for i in coco["images"]] == [42, 43]
    a, b = coco["annotations"]
    assert (a["category_id"], b["category_id"]) == (1, 3)  # person, car: COCO's ids
    assert a["segmentation"] == [[20.0, 10.0, 100.0, 10.0, 100.0, 50.0, 20.0, 50.0]]
    assert a["bbox"] == [20.0, 10.0, 80.0, 40.0] and a["area"] == 3200.0
    assert len(coco["categories"]) == 80 and coco["categories"][-1]["id"] == 90
    named = yolo_seg_to_coco(tmp_path, "train", class_names=["a", "b", "c"])
    assert [c["id"] for c in named["categories"]] == [1, 2, 3] and named["annotations"][1]["category_id"] == 3


@pytest.mark.parametrize(
    "line, message",
    [("0 0.1 0.1 0.5", "even number"), ("80 0.1 0.1 0.5 0.1 0.5 0.5", "class 80 outside"), ("x 1 2", "expected")],
)
def test_yolo_seg_bad_lines_name_file_and_line(tmp_path, line, message):
    write_image(tmp_path / "images" / "train" / "a.jpg")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n" + line + "\n")
    with pytest.raises(DatasetError, match=rf"a.txt:2: .*{message}"):
        yolo_seg_to_coco(tmp_path, "train")


def test_yolo_seg_converter_matches_the_reference_conversion_of_coco128():
    root = require(DATA / "datasets" / "coco128-seg")
    ours = yolo_seg_to_coco(root, "train2017")
    reference = json.loads((root / "instances_train2017_from_yolo.json").read_text())
    assert [i["id"] for i in ours["images"]] == [i["id"] for i in reference["images"]]
    assert [c["id"] for c in ours["categories"]] == [c["id"] for c in reference["categories"]] == list(COCO80_IDS)
    assert len(ours["annotations"]) == len(reference["annotations"]) == 929
    for a, b in zip(ours["annotations"], reference["annotations"]):
        for key in ("image_id", "category_id", "segmentation"):
            assert a[key] == b[key]
        assert a["bbox"] == pytest.approx(b["bbox"]) and a["area"] == pytest.approx(b["area"])
    person_car = open_dataset(
        DatasetSpec(format="yolo_seg", path=root, categories=("person", "car"))
    )
    labels = np.concatenate([person_car[i].labels for i in range(len(person_car))])
    assert (labels == 1).sum() == 254 and (labels == 2).sum() == 46  # the data README's counts


def test_instance_png_converter(tmp_path):
    write_image(tmp_path / "images" / "x.png")
    write_image(tmp_path / "images" / "y.png")  # no mask file: no objects
    ids = np.zeros((40, 60), np.uint16)
    ids[2:10, 2:10] = 1
    ids[20:30, 30:50] = 2
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "masks" / "x.png"), ids)
    coco = instance_png_to_coco(tmp_path / "images", tmp_path / "masks")
    assert [a["bbox"] for a in coco["annotations"]] == [[2, 2, 8, 8], [30, 20, 20, 10]]
    assert coco["categories"] == [{"id": 1, "name": "object", "supercategory": ""}]
    data = open_dataset(DatasetSpec(format="instance_png", path=tmp_path))
    assert len(data) == 2 and data[0].masks.sum() == 64 + 200
    cv2.imwrite(str(tmp_path / "masks" / "y.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match="y.png: 10x10, but its image is 60x40"):
        instance_png_to_coco(tmp_path / "images", tmp_path / "masks")


def test_davis_converter(tmp_path):
    for seq, frames in (("bear", 2), ("car", 1)):
        for t in range(frames):
            write_image(tmp_path / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg")
            mask = np.zeros((40, 60), np.uint8)
            mask[5 + t : 15 + t, 5:20] = 255
            (tmp_path / "Annotations" / "480p" / seq).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "Annotations" / "480p" / seq / f"{t:05d}.png"), mask)
    coco = davis_to_coco(tmp_path)
    assert [i["file_name"] for i in coco["images"]] == ["bear/00000.jpg", "bear/00001.jpg", "car/00000.jpg"]
    assert [a["bbox"] for a in coco["annotations"]] == [[5, 5, 15, 10], [5, 6, 15, 10], [5, 5, 15, 10]]
    data = open_dataset(DatasetSpec(format="davis", path=tmp_path))
    assert data.class_names == ("__background__", "object") and len(data) == 3
    (tmp_path / "Annotations" / "480p" / "car" / "00000.png").unlink()
    with pytest.raises(DatasetError, match="car/00000.png: missing"):
        davis_to_coco(tmp_path)


def test_davis_converter_on_the_real_subset():
    root = require(DATA / "datasets" / "davis2016-subset" / "DAVIS")
    coco = davis_to_coco(root)
    assert len(coco["images"]) == 199 and len(coco["annotations"]) == 199


# --------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_matches_its_coco_ground_truth():
    data = SyntheticDataset(count=3, seed=5, height=64, width=80)
    gt = data.coco_gt()
    assert gt == to_coco([make_scene(5 + i, 64, 80) for i in range(3)])
    for i in range(3):
        sample = data[i]
        anns = [a for a in gt["annotations"] if a["image_id"] == sample.image_id]
        assert len(anns) == len(sample.labels)
        assert [a["category_id"] for a in anns] == sample.labels.tolist()
    assert open_dataset(DatasetSpec(format="synthetic", synthetic=SyntheticSpec(count=2, height=32, width=32)))[1]


def test_written_synthetic_dataset_reads_back(tmp_path):
    path = write_synthetic_dataset(tmp_path, count=3, seed=9, height=48, width=64)
    data = CocoDataset.from_json(path, tmp_path / "images")
    assert len(data) == 3 and data.skipped == {}
    scene = make_scene(9, 48, 64)
    np.testing.assert_array_equal(data[0].image, scene.image)
    np.testing.assert_array_equal(data[0].masks, scene.masks)
    np.testing.assert_array_equal(data[0].boxes, scene.boxes)


def test_clip_objects_move_smoothly_and_are_reproducible():
    scenes, tracks = make_clip(seed=4, frames=12, height=96, width=96)
    again, _ = make_clip(seed=4, frames=12, height=96, width=96)
    np.testing.assert_array_equal(scenes[7].image, again[7].image)
    assert all(s.masks.sum(axis=0).max(initial=0) <= 1 for s in scenes)  # occlusion resolved
    # A track seen in consecutive frames moves by at most a few pixels per frame.
    for t in range(11):
        for tid in set(tracks[t]) & set(tracks[t + 1]):
            a = scenes[t].boxes[tracks[t].index(tid)]
            b = scenes[t + 1].boxes[tracks[t + 1].index(tid)]
            centre_shift = np.abs((a[:2] + a[2:]) - (b[:2] + b[2:])) / 2
            assert centre_shift.max() <= 6, (t, tid)


def test_clip_is_written_as_video_with_per_frame_ground_truth(tmp_path):
    video, annotations = write_synthetic_clip(tmp_path / "clip.mp4", frames=8, seed=2, height=64, width=96, fps=10)
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    scenes, tracks = make_clip(seed=2, frames=8, height=64, width=96)
    assert len(frames) == 8 and frames[0].shape == (64, 96, 3)
    assert np.abs(frames[3].astype(int) - scenes[3].image).mean() < 8  # near-lossless encode
    gt = json.loads(annotations.read_text())
    assert [i["frame_index"] for i in gt["images"]] == [i["id"] for i in gt["images"]] == list(range(8))
    assert [a["track_id"] for a in gt["annotations"] if a["image_id"] == 0] == tracks[0]
    with pytest.raises(ValueError, match="even height and width"):
        write_synthetic_clip(tmp_path / "odd.mp4", frames=2, height=63, width=96)
