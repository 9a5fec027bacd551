"""Training and evaluation data: COCO-format datasets and the built-in synthetic scenes.

Both kinds give the same thing per index, a `Sample` (image + boxes, labels, masks in the
model's contiguous label space 1..C), and can describe themselves as a COCO ground-truth
dict for pycocotools' evaluation.

A COCO dataset is checked once, when it is opened: every annotation that cannot be trained
on is dropped and counted by reason in `skipped` (missing image file, unknown image or
category id, zero-area or out-of-image box, unusable segmentation, ...), so a bad entry
never stops an epoch halfway. What makes the whole dataset unusable (no such file, not a
COCO dict, duplicate ids, no usable image) raises `DatasetError` naming the file and the
entry. An image that exists but cannot be decoded is only found when it is read: the
training loop counts it and moves on.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
from maskstream.model import converters
from maskstream.model.dataset_error import DatasetError
from maskstream.model.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from maskstream.model.synthetic import make_scene, to_coco
from pycocotools import mask as _pycoco_mask

# pycocotools' stubs type RLEs as TypedDicts; ours come from JSON as plain dicts.
mask_utils: Any = _pycoco_mask

__all__ = [
    "CocoDataset",
    "Dataset",
    "DatasetError",
    "DatasetFormat",
    "DatasetSpec",
    "Sample",
    "SyntheticDataset",
    "SyntheticSpec",
    "open_dataset",
    "read_image",
    "segmentation_rle",
]


@dataclass(frozen=True, eq=False)
class Sample:
    image_id: int
    image: np.ndarray  # uint8 [H, W, 3] RGB
    boxes: np.ndarray  # float32 [N, 4] x0, y0, x1, y1 in pixels
    labels: np.ndarray  # int64 [N], 1..C (0 is background)
    masks: np.ndarray  # uint8 [N, H, W], 0/1


class Dataset(Protocol):
    """What training and evaluation need from a dataset."""

    class_names: tuple[str, ...]  # index = label; [0] is "__background__"
    label_to_category: dict[int, int]  # model label -> category id of `coco_gt()`

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def coco_gt(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- specs (configs)


@dataclass(frozen=True)
class SyntheticSpec:
    count: int = 200  # scenes; scene i uses seed `seed + i`
    seed: int = 0
    height: int = 320
    width: int = 320
    max_objects: int = 6


DatasetFormat = Literal["coco", "yolo_seg", "instance_png", "davis", "synthetic"]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset is and how it is laid out; mirrored by the `data.train`/`data.val` keys.

    coco: `path` is the instances JSON, `images` the image folder (default: the JSON's folder).
    yolo_seg: `path` is the dataset root with images/<split>/ and labels/<split>/.
    instance_png: `path` holds images/ and masks/ (one PNG of instance ids per image).
    davis: `path` is the DAVIS root (JPEGImages/480p, Annotations/480p); one class, "object".
    synthetic: generated in memory from `synthetic`.
    """

    format: DatasetFormat = "coco"
    path: Path | None = None
    images: Path | None = None
    split: str = "train2017"  # yolo_seg only: the sub-folder of images/ and labels/
    categories: tuple[str, ...] = ()  # keep only these category names, in this label order; empty = all
    drop_empty: bool = False  # leave out images with no (kept) object; counted as no_annotations
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)


def open_dataset(spec: DatasetSpec) -> Dataset:
    """The dataset a spec describes (converters run in memory; nothing is written)."""
    if spec.format == "synthetic":
        s = spec.synthetic
        return SyntheticDataset(s.count, s.seed, s.height, s.width, s.max_objects)
    if spec.path is None:
        raise DatasetError(f"dataset format {spec.format!r}: `path` is required")
    if spec.format == "coco":
        return CocoDataset.from_json(spec.path, spec.images, categories=spec.categories, drop_empty=spec.drop_empty)
    if spec.format == "yolo_seg":
        coco = converters.yolo_seg_to_coco(spec.path, spec.split)
        image_root = spec.path / "images" / spec.split
    elif spec.format == "instance_png":
        coco = converters.instance_png_to_coco(spec.path / "images", spec.path / "masks")
        image_root = spec.path / "images"
    elif spec.format == "davis":
        coco = converters.davis_to_coco(spec.path)
        image_root = spec.path / "JPEGImages" / "480p"
    else:  # pragma: no cover - the config loader admits only the literals above
        raise DatasetError(f"unknown dataset format {spec.format!r}")
    return CocoDataset(coco, image_root, categories=spec.categories, drop_empty=spec.drop_empty, source=str(spec.path))


# --------------------------------------------------------------------------- COCO


@dataclass(frozen=True)
class _Instance:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1, clipped to the image
    label: int
    rle: dict[str, Any]  # pycocotools RLE (bytes counts) of the full-image mask


@dataclass(frozen=True)
class _Image:
    image_id: int
    path: Path
    height: int
    width: int
    instances: tuple[_Instance, ...]


class CocoDataset:
    """A COCO instances dict plus its image folder, checked and indexed once.

    `categories` (names) keeps only those categories, labelled 1.. in the order given;
    empty keeps all, labelled in order of category id. Crowd annotations are not trained
    on but stay in `coco_gt()`, where COCOeval treats them as "ignore" regions.
    `drop_empty`: leave out images with nothing to train on (counted as `no_annotations`).
    """

    def __init__(
        self,
        coco: dict[str, Any],
        image_root: str | Path,
        *,
        categories: Sequence[str] = (),
        drop_empty: bool = False,
        source: str = "<dict>",
    ):
        self.source = source
        self.image_root = Path(image_root)
        for key in ("images", "annotations", "categories"):
            if not isinstance(coco.get(key), list):
                raise DatasetError(f"{source}: expected a COCO instances dict with a list under {key!r}")
        self.skipped: Counter[str] = Counter()
        self.clipped_boxes = 0
        self._categories = self._select_categories(coco["categories"], categories)
        category_label = {c["id"]: label for label, c in enumerate(self._categories, start=1)}
        known_categories = {c.get("id") for c in coco["categories"]}
        self.class_names = ("__background__", *(c["name"] for c in self._categories))
        self.label_to_category = {label: cid for cid, label in category_label.items()}

        records: dict[int, dict[str, Any]] = {}
        for record in coco["images"]:
            image_id = record.get("id") if isinstance(record, dict) else None
            if not isinstance(image_id, int) or not isinstance(record.get("file_name"), str):
                raise DatasetError(f"{source}: image entry {record!r:.80}: expected an int 'id' and a 'file_name'")
            if image_id in records:
                raise DatasetError(f"{source}: image id {image_id} appears twice")
            h, w = record.get("height"), record.get("width")
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
                raise DatasetError(
                    f"{source}: image {image_id} ({record['file_name']}): expected positive int height, width"
                )
            records[image_id] = record

        per_image: dict[int, list[_Instance]] = {i: [] for i in records}
        self._gt_annotations: list[dict[str, Any]] = []
        for ann in coco["annotations"]:
            reason = self._check_annotation(ann, records, known_categories, category_label)
            if reason == "other_category":
                continue  # a category left out on purpose, not a fault of the data
            if reason is not None:
                self.skipped[reason] += 1
                continue
            record = records[ann["image_id"]]
            box, rle = self._box_and_mask(ann, record)
            if box is None or rle is None:
                continue  # counted inside
            self._gt_annotations.append(ann)
            if ann.get("iscrowd", 0):
                self.skipped["crowd"] += 1
                continue
            per_image[ann["image_id"]].append(_Instance(box, category_label[ann["category_id"]], rle))

        self._images: list[_Image] = []
        self._gt_images: list[dict[str, Any]] = []
        for image_id, record in records.items():
            path = self.image_root / record["file_name"]
            if not path.is_file():
                self.skipped["missing_image"] += 1
                continue
            self._gt_images.append(
                {k: record[k] for k in ("id", "file_name", "height", "width")}
            )
            if drop_empty and not per_image[image_id]:
                self.skipped["no_annotations"] += 1
                continue
            self._images.append(
                _Image(image_id, path, record["height"], record["width"], tuple(per_image[image_id]))
            )
        kept_ids = {r["id"] for r in self._gt_images}
        self._gt_annotations = [a for a in self._gt_annotations if a["image_id"] in kept_ids]
        if not self._images:
            raise DatasetError(f"{source}: no usable images (skipped: {dict(self.skipped) or 'none'})")

    @classmethod
    def from_json(
        cls, path: str | Path, image_root: str | Path | None = None, **kwargs: Any
    ) -> CocoDataset:
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: no such annotation file")
        try:
            coco = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(coco, dict):
            raise DatasetError(f"{path}: expected a COCO instances object at the top level")
        return cls(coco, image_root if image_root is not None else path.parent, source=str(path), **kwargs)

    def _select_categories(self, categories: list[Any], wanted: Sequence[str]) -> list[dict[str, Any]]:
        for c in categories:
            if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
                raise DatasetError(f"{self.source}: category {c!r:.80}: expected an int 'id' and a str 'name'")
        if not wanted:
            return sorted(categories, key=lambda c: c["id"])
        by_name = {c["name"]: c for c in categories}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise DatasetError(
                f"{self.source}: categories {unknown} not in the dataset (it has: {', '.join(by_name)})"
            )
        return [by_name[n] for n in wanted]

    @staticmethod
    def _check_annotation(
        ann: Any, records: dict[int, dict], known: set[Any], selected: dict[int, int]
    ) -> str | None:
        """The reason this annotation cannot be used, or None."""
        if not isinstance(ann, dict):
            return "malformed"
        if not isinstance(ann.get("image_id"), int) or ann["image_id"] not in records:
            return "unknown_image"
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in known:
            return "unknown_category"
        if ann["category_id"] not in selected:
            return "other_category"
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, (list, tuple))
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            return "bad_box"
        if bbox[2] <= 0 or bbox[3] <= 0:
            return "zero_area_box"
        return None

    def _box_and_mask(
        self, ann: dict[str, Any], record: dict[str, Any]
    ) -> tuple[tuple[float, float, float, float] | None, dict[str, Any] | None]:
        h, w = record["height"], record["width"]
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
        if x1 - x0 < 1 or y1 - y0 < 1:  # nothing (or less than a pixel) left inside the image
            self.skipped["out_of_image_box"] += 1
            return None, None
        if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
            self.clipped_boxes += 1  # partly outside: trained on the part inside
        rle = segmentation_rle(ann.get("segmentation"), h, w)
        if rle is None:
            self.skipped["bad_segmentation"] += 1
            return None, None
        if int(mask_utils.area(rle)) == 0:
            self.skipped["empty_mask"] += 1
            return None, None
        return (x0, y0, x1, y1), rle

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Sample:
        entry = self._images[index]
        image = read_image(entry.path)
        if image.shape[:2] != (entry.height, entry.width):
            raise DatasetError(
                f"{self.source}: image {entry.image_id} ({entry.path}) is {image.shape[1]}x{image.shape[0]}, "
                f"the annotation file says {entry.width}x{entry.height}"
            )
        n = len(entry.instances)
        if n:
            with warnings.catch_warnings():  # pycocotools predates numpy 2's `copy` keyword; harmless
                warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                masks = mask_utils.decode([i.rle for i in entry.instances])  # [H, W, N], Fortran order
            masks = np.ascontiguousarray(masks.transpose(2, 0, 1))  # [N, H, W]
        else:
            masks = np.zeros((0, entry.height, entry.width), np.uint8)
        return Sample(
            image_id=entry.image_id,
            image=image,
            boxes=np.asarray([i.box for i in entry.instances], np.float32).reshape(n, 4),
            labels=np.asarray([i.label for i in entry.instances], np.int64),
            masks=masks,
        )

    def coco_gt(self) -> dict[str, Any]:
        """The ground truth for COCOeval: the kept images (also those without annotations),
        the selected categories' annotations, crowd regions included."""
        annotations = []
        for ann in self._gt_annotations:
            copy = dict(ann)
            copy.setdefault("iscrowd", 0)
            if "area" not in copy:
                copy["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            annotations.append(copy)
        return {"images": list(self._gt_images), "annotations": annotations, "categories": list(self._categories)}

    def describe_skips(self) -> str:
        parts = [f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(self.skipped.items())]
        if self.clipped_boxes:
            parts.append(f"{self.clipped_boxes} boxes clipped to the image")
        return ", ".join(parts) if parts else "nothing skipped"


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    """pycocotools RLE of a COCO segmentation (polygons, RLE or uncompressed RLE), or None if unusable."""
    if isinstance(segmentation, list):
        # A polygon needs 3 points; pycocotools would read shorter lists as a box or fail.
        polygons: list[list[float]] = [
            [float(v) for v in p]
            for p in segmentation
            if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, (int, float)) for v in p)
        ]
        if not polygons or not all(math.isfinite(v) for p in polygons for v in p):
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            return None
        try:
            if isinstance(segmentation["counts"], list):
                if sum(segmentation["counts"]) != height * width:  # runs must cover the image exactly
                    return None
                return mask_utils.frPyObjects(segmentation, height, width)
            counts = segmentation["counts"]
            return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        except (TypeError, ValueError, UnicodeEncodeError):
            return None
    return None


def read_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB; raises DatasetError naming the file."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"image {path}: missing or not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- synthetic


class SyntheticDataset:
    """`count` synthetic scenes, scene i drawn on demand from seed `seed + i` (nothing cached:
    a few thousand scenes would not fit in memory, and drawing one takes ~50 ms at 320x320)."""

    class_names = ("__background__", *SYNTHETIC_CLASS_NAMES)
    label_to_category = {i: i for i in range(1, len(SYNTHETIC_CLASS_NAMES) + 1)}

    def __init__(self, count: int, seed: int = 0, height: int = 320, width: int = 320, max_objects: int = 6):
        if count < 1:
            raise DatasetError(f"synthetic dataset: count must be >= 1, got {count}")
        self.count, self.seed, self.height, self.width, self.max_objects = count, seed, height, width, max_objects
        self.skipped: Counter[str] = Counter()
        self._gt: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        scene = make_scene(self.seed + index, self.height, self.width, self.max_objects)
        return Sample(
            image_id=index + 1,  # the ids `to_coco` gives
            image=scene.image,
            boxes=scene.boxes,
            labels=scene.labels,
            masks=scene.masks.astype(np.uint8),
        )

    def coco_gt(self) -> dict[str, Any]:
        if self._gt is None:  # drawing every scene again is the slow part: once per dataset
            scenes = [make_scene(self.seed + i, self.height, self.width, self.max_objects) for i in range(self.count)]
            self._gt = to_coco(scenes)
        return self._gt

    def describe_skips(self) -> str:
        return "nothing skipped"
