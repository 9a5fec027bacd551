"""Other common instance-segmentation layouts -> COCO instances dicts (in memory).

- YOLO-seg (as coco128-seg): images/<split>/NAME.jpg + labels/<split>/NAME.txt, one object
  per line: `class x1 y1 x2 y2 ...`, polygon vertices normalised to 0..1.
- Per-image instance PNGs: images/NAME.* + masks/NAME.png, pixel value = instance id
  (0 = background). Values >= 1000 follow Cityscapes: class = value // 1000.
- DAVIS: JPEGImages/480p/SEQ/NNNNN.jpg + Annotations/480p/SEQ/NNNNN.png; every non-zero
  value of a mask is one object (DAVIS 2016 has a single one, 255), all of category "object".

The results feed `model.datasets.CocoDataset`, which checks them like any COCO file.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from maskstream.model.coco import COCO_CATEGORY_NAMES
from maskstream.model.dataset_error import DatasetError
from pycocotools import mask as _pycoco_mask

# pycocotools' stubs type RLEs as TypedDicts; ours come from JSON as plain dicts.
mask_utils: Any = _pycoco_mask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# YOLO's COCO class index k is the k-th real entry of COCO's 91-slot id list.
COCO80_IDS: tuple[int, ...] = tuple(i for i, n in enumerate(COCO_CATEGORY_NAMES) if i > 0 and n != "N/A")
COCO80_NAMES: tuple[str, ...] = tuple(COCO_CATEGORY_NAMES[i] for i in COCO80_IDS)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _image_ids(files: Sequence[Path]) -> list[int]:
    """COCO's own ids when every name is one (000000000009.jpg -> 9), else 1..N."""
    stems = [p.stem for p in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))


def _image_size(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"image {path}: not a readable image")
    return int(image.shape[0]), int(image.shape[1])


def _annotation(ann_id: int, image_id: int, category_id: int, rle: dict[str, Any], segmentation: Any) -> dict:
    """One COCO annotation; area and box from the rasterised mask, as COCO's own tools do."""
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


def _rle_json(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    return {"size": [int(s) for s in rle["size"]], "counts": text}


def _mask_annotations(
    mask: np.ndarray, image_id: int, first_ann_id: int, category_of: Any
) -> list[dict[str, Any]]:
    """One annotation per non-zero value of an instance-id mask [H, W]."""
    out: list[dict[str, Any]] = []
    for value in np.unique(mask):
        if value == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(mask == value, dtype=np.uint8))
        out.append(_annotation(first_ann_id + len(out), image_id, category_of(int(value)), rle, _rle_json(rle)))
    return out


# --------------------------------------------------------------------------- YOLO-seg


def yolo_seg_to_coco(
    root: str | Path, split: str = "train2017", class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """COCO dict of a YOLO-seg dataset. Without `class_names` the classes are COCO's 80 and
    keep COCO's category ids (class 0 -> 1 person, 2 -> 3 car, 45 -> 51 bowl)."""
    root = Path(root)
    files = _image_files(root / "images" / split)
    if class_names is None:
        names, ids = COCO80_NAMES, COCO80_IDS
    else:
        names, ids = tuple(class_names), tuple(range(1, len(class_names) + 1))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for path, image_id in zip(files, _image_ids(files)):
        h, w = _image_size(path)
        images.append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        label_file = root / "labels" / split / f"{path.stem}.txt"
        if not label_file.is_file():
            continue  # YOLO's convention: no label file = no objects
        for line_no, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{label_file}:{line_no}"
            try:
                fields = line.split()
                cls, coords = int(fields[0]), [float(v) for v in fields[1:]]
            except (ValueError, IndexError) as exc:
                raise DatasetError(f"{where}: expected `class x1 y1 x2 y2 ...` ({exc})") from exc
            if not 0 <= cls < len(names):
                raise DatasetError(f"{where}: class {cls} outside 0..{len(names) - 1}")
            if len(coords) < 6 or len(coords) % 2:
                raise DatasetError(f"{where}: expected an even number (>= 6) of polygon coordinates, got {len(coords)}")
            xy = np.asarray(coords, np.float64).reshape(-1, 2) * (w, h)  # [P, 2] pixels
            polygon = [round(float(v), 2) for v in xy.reshape(-1)]
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))
            annotations.append(_annotation(len(annotations) + 1, image_id, ids[cls], rle, [polygon]))
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(ids, names)]
    return {"images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------- instance PNGs


def instance_png_to_coco(images_dir: str | Path, masks_dir: str | Path, category: str = "object") -> dict[str, Any]:
    """COCO dict of images + per-image instance-id PNGs (8 or 16 bit). An image without a mask
    file has no objects. Values < 1000 are instances of `category`; >= 1000, of class value // 1000."""
    files = _image_files(Path(images_dir))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    class_ids: set[int] = set()

    def category_of(value: int) -> int:
        cid = value // 1000 if value >= 1000 else 1
        class_ids.add(cid)
        return cid

    for path, image_id in zip(files, _image_ids(files)):
        h, w = _image_size(path)
        images.append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        mask_path = Path(masks_dir) / f"{path.stem}.png"
        if not mask_path.is_file():
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2:
            raise DatasetError(f"mask {mask_path}: expected a single-channel PNG of instance ids")
        if mask.shape != (h, w):
            raise DatasetError(f"mask {mask_path}: {mask.shape[1]}x{mask.shape[0]}, but its image is {w}x{h}")
        annotations += _mask_annotations(mask, image_id, len(annotations) + 1, category_of)
    categories = [
        {"id": cid, "name": category if cid == 1 and len(class_ids) <= 1 else f"class_{cid}", "supercategory": ""}
        for cid in sorted(class_ids or {1})
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------- DAVIS


def davis_to_coco(
    root: str | Path, resolution: str = "480p", sequences: Sequence[str] | None = None
) -> dict[str, Any]:
    """COCO dict of DAVIS frames (file names SEQ/NNNNN.jpg under JPEGImages/<resolution>)."""
    frames_root = Path(root) / "JPEGImages" / resolution
    masks_root = Path(root) / "Annotations" / resolution
    if not frames_root.is_dir():
        raise DatasetError(f"{frames_root}: no such folder (expected a DAVIS root)")
    names = sorted(p.name for p in frames_root.iterdir() if p.is_dir()) if sequences is None else list(sequences)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for seq in names:
        for frame in _image_files(frames_root / seq):
            mask_path = masks_root / seq / f"{frame.stem}.png"
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise DatasetError(f"mask {mask_path}: missing or not readable (frame {frame})")
            image_id = len(images) + 1
            h, w = mask.shape
            images.append({"id": image_id, "file_name": f"{seq}/{frame.name}", "height": h, "width": w})
            annotations += _mask_annotations(mask, image_id, len(annotations) + 1, lambda _value: 1)
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object", "supercategory": ""}],
    }
