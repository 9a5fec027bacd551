import contextlib
import dataclasses
import io
import json

import av
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from maskstream.model.rle import decode_rle
from maskstream.model.synthetic import (
    CLASS_NAMES,
    encode_png,
    make_scene,
    scene_file_name,
    to_coco,
    write_png,
    write_sample_images,
)
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def test_deterministic():
    a, b = make_scene(7), make_scene(7)
    for name in ("image", "masks", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.image, make_scene(8).image)


def test_shapes_and_dtypes():
    scene = make_scene(1, height=120, width=160, max_objects=5)
    n = len(scene.labels)
    assert scene.image.shape == (120, 160, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape == (n, 120, 160) and scene.masks.dtype == np.bool_
    assert scene.boxes.shape == (n, 4) and scene.boxes.dtype == np.float32
    assert scene.labels.dtype == np.int64
    assert (scene.height, scene.width) == (120, 160)
    assert scene.class_names == CLASS_NAMES
    with pytest.raises(ValueError):  # arrays are read-only
        scene.image[0, 0, 0] = 1


@pytest.mark.parametrize("seed", range(12))
def test_masks_boxes_labels_consistent(seed):
    scene = make_scene(seed, height=96, width=128, max_objects=10, min_area=30)
    assert len(scene.labels) <= 10
    assert ((scene.labels >= 1) & (scene.labels <= len(CLASS_NAMES))).all()
    # occlusion is resolved: each pixel belongs to at most one object
    assert scene.masks.sum(axis=0).max(initial=0) <= 1
    for mask, box in zip(scene.masks, scene.boxes):
        assert mask.sum() >= 30
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        np.testing.assert_array_equal(box, [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])


def test_objects_differ_from_background():
    """A visible object's pixels have its own colour, not the background's."""
    scene = make_scene(3)
    background = scene.masks.sum(axis=0) == 0
    bg_mean = scene.image[background].mean(axis=0)
    for mask in scene.masks:
        assert np.abs(scene.image[mask].mean(axis=0) - bg_mean).sum() > 30


def test_no_objects():
    scene = make_scene(0, height=32, width=48, max_objects=0)
    assert scene.masks.shape == (0, 32, 48) and scene.boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seed": -1}, "seed: expected a non-negative int"),
        ({"seed": 0, "height": 4}, "height: expected an int >= 16, got 4"),
        ({"seed": 0, "width": 20.5}, "width: expected an int >= 16, got 20.5"),
        ({"seed": 0, "max_objects": -2}, "max_objects: expected an int >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_scene(**kwargs)


def _coco_from_dict(dataset):
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_to_coco_loads_in_pycocotools(tmp_path):
    scenes = [make_scene(s, height=90, width=120) for s in range(4)]
    dataset = to_coco(scenes)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))  # JSON-friendly throughout
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))

    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    assert coco.getImgIds() == [1, 2, 3, 4]
    assert coco.imgs[2]["file_name"] == scene_file_name(scenes[1]) == "scene_000001.png"
    for image_id, scene in enumerate(scenes, start=1):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(scene.labels)
        for ann, mask, box, label in zip(anns, scene.masks, scene.boxes, scene.labels):
            np.testing.assert_array_equal(coco.annToMask(ann), mask)
            np.testing.assert_array_equal(decode_rle(ann["segmentation"]), mask)
            assert ann["category_id"] == label and ann["iscrowd"] == 0
            assert ann["area"] == mask.sum()
            x0, y0, x1, y1 = box
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            # the same xywh pycocotools derives from the mask itself
            np.testing.assert_array_equal(mask_utils.toBbox(ann["segmentation"]), ann["bbox"])


def test_ground_truth_scores_perfectly_in_cocoeval():
    gt = _coco_from_dict(to_coco([make_scene(s, height=100, width=140) for s in range(3)]))
    detections = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in gt.dataset["annotations"]
    ]
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(d) for d in detections])
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), iou_type  # AP@[.5:.95]


def test_to_coco_rejects_empty_and_mixed():
    with pytest.raises(ValueError, match="scenes: expected at least one Scene"):
        to_coco([])
    scene = make_scene(0, height=32, width=32)
    other = dataclasses.replace(scene, class_names=("blob",))
    with pytest.raises(ValueError, match=r"scenes\[1\]: expected class_names"):
        to_coco([scene, other])


# ------------------------------------------------------------------ PNG


def decode_png(data: bytes) -> np.ndarray:
    """A PNG as FFmpeg (PyAV) decodes it: another library than the OpenCV that encodes, so a
    channel order or layout gone wrong in encode_png shows. 8-bit grey, RGB or RGBA only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with av.open(io.BytesIO(data), format="png_pipe") as container:
        [frame] = container.decode(video=0)
    assert frame.format.name in ("gray", "rgb24", "rgba"), frame.format.name
    return frame.to_ndarray(format=frame.format.name)


@pytest.mark.parametrize("shape", [(5, 7), (6, 4, 3), (3, 9, 4), (1, 1, 3)])
def test_png_round_trip(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(image)), image)


def test_png_rejects_bad_images():
    with pytest.raises(ValueError, match="image: expected a uint8 numpy array, got float64 array"):
        encode_png(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"image: expected \[H, W\].*got \[3, 3, 2\]"):
        encode_png(np.zeros((3, 3, 2), np.uint8))


def test_write_sample_images(tmp_path):
    paths = write_sample_images(tmp_path / "samples", count=2, seed=5)
    assert [p.name for p in paths] == ["scene_000005.png", "scene_000006.png"]
    np.testing.assert_array_equal(decode_png(paths[1].read_bytes()), make_scene(6).image)
    write_png(tmp_path / "g.png", np.zeros((2, 2), np.uint8))
    assert decode_png((tmp_path / "g.png").read_bytes()).shape == (2, 2)
