"""COCO evaluation (pycocotools COCOeval, bbox and segm) of a model on a dataset.

    report = evaluate(model, dataset)
    report.metrics["segm"]["AP"], report.results  # COCO results list (JSON-able)

Labels are mapped to the dataset's category ids by class name where the model has names
(so a person/car model scores on any dataset that has those two), else by position.
`class_agnostic` scores every detection against every ground-truth object (DAVIS-style
data with one "object" class).
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from maskstream.model.coco import class_names as model_class_names
from maskstream.model.datasets import Dataset, DatasetError
from maskstream.model.mask_rcnn import MaskRCNN
from maskstream.model.postprocess import paste_masks_in_image
from pycocotools import mask as _pycoco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# pycocotools' stubs type RLEs as TypedDicts; ours come from JSON as plain dicts.
mask_utils: Any = _pycoco_mask

# COCOeval.stats order
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100", "AR_small",
              "AR_medium", "AR_large")
MASK_THRESHOLD = 0.5
PASTE_CHUNK = 16  # detections pasted at a time: full-frame float masks are large


@dataclass(frozen=True)
class EvalReport:
    metrics: dict[str, dict[str, float]]  # "bbox"/"segm" -> STAT_NAMES -> value (-1: no ground truth)
    results: list[dict[str, Any]]  # COCO results: image_id, category_id, bbox xywh, score, segmentation
    summary: str  # COCOeval's printed summary, for the CLI to show
    images: int
    skipped_images: int
    seconds: float


def label_mapping(model_names: tuple[str, ...], dataset: Dataset, class_agnostic: bool) -> dict[int, int]:
    """Model label -> dataset category id."""
    gt_categories = dataset.coco_gt()["categories"]
    if class_agnostic:
        first = gt_categories[0]["id"] if gt_categories else 1
        return {label: first for label in range(1, len(model_names))}
    by_name = {c["name"]: c["id"] for c in gt_categories}
    named = [n for n in model_names[1:] if n in by_name]
    if named:
        return {label: by_name[n] for label, n in enumerate(model_names) if label > 0 and n in by_name}
    if len(model_names) != len(dataset.class_names):
        raise ValueError(
            f"the model's classes ({', '.join(model_names[1:])}) share no name with the dataset's "
            f"({', '.join(dataset.class_names[1:])}) and their numbers differ; evaluate class-agnostic instead"
        )
    return dict(dataset.label_to_category)


@torch.no_grad()
def predict_coco(
    model: MaskRCNN,
    dataset: Dataset,
    mapping: dict[int, int],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """COCO results for every image (labels without a category in `mapping` are dropped),
    and how many images could not be read (skipped, not fatal)."""
    model.eval()
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    skipped = 0
    for index in range(len(dataset)):
        try:
            sample = dataset[index]
        except DatasetError:
            skipped += 1
            continue
        h, w = sample.image.shape[:2]
        image = torch.from_numpy(np.array(sample.image)).to(device).permute(2, 0, 1).float() / 255
        [det] = model.predict([image])
        for start in range(0, len(det["scores"]), PASTE_CHUNK):
            part = slice(start, start + PASTE_CHUNK)
            boxes = det["boxes"][part]
            masks = paste_masks_in_image(det["mask_probs"][part][:, None], boxes, (h, w))[:, 0]  # [n, H, W]
            binary = (masks >= MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # one per detection
            labels, scores = det["labels"][part].tolist(), det["scores"][part].tolist()
            for box, label, score, rle in zip(boxes.tolist(), labels, scores, rles):
                if label not in mapping:
                    continue
                x0, y0, x1, y1 = box
                results.append(
                    {
                        "image_id": sample.image_id,
                        "category_id": mapping[label],
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(score, 5),
                        "segmentation": {"size": [h, w], "counts": bytes(rle["counts"]).decode("ascii")},
                    }
                )
        if progress is not None:
            progress(index + 1, len(dataset))
    return results, skipped


def coco_metrics(
    gt: dict[str, Any], results: list[dict[str, Any]], class_agnostic: bool = False
) -> tuple[dict[str, dict[str, float]], str]:
    """COCOeval bbox and segm stats, and its printed summary (captured, not printed)."""
    captured = io.StringIO()
    metrics: dict[str, dict[str, float]] = {}
    with contextlib.redirect_stdout(captured):  # pycocotools prints; only the CLI may
        coco_gt: Any = COCO()
        coco_gt.dataset = {"info": {}, "licenses": [], **gt}
        coco_gt.createIndex()
        if not results:  # loadRes cannot take an empty list: no detection scores zero
            print("no detections: every AP and AR is 0")
            zeros = {name: 0.0 for name in STAT_NAMES}
            return {"bbox": dict(zeros), "segm": dict(zeros)}, captured.getvalue()
        for iou_type in ("bbox", "segm"):
            print(f"--- {iou_type}")
            # loadRes edits what it is given, and for segm its areas must come from the masks
            # (it takes them from the box when one is present), as detectron2 does it.
            drop = "bbox" if iou_type == "segm" else "segmentation"
            coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.useCats = 0 if class_agnostic else 1
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            metrics[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    return metrics, captured.getvalue()


def evaluate(
    model: MaskRCNN,
    dataset: Dataset,
    *,
    class_agnostic: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    start = time.perf_counter()
    names = model_class_names(model.cfg.num_classes, model.cfg.class_names)
    mapping = label_mapping(names, dataset, class_agnostic)
    results, skipped = predict_coco(model, dataset, mapping, progress)
    metrics, summary = coco_metrics(dataset.coco_gt(), results, class_agnostic)
    return EvalReport(metrics, results, summary, len(dataset), skipped, time.perf_counter() - start)


def write_results(path: str | Path, results: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table of AP, AP50, AP75 per IoU type."""
    lines = [f"{'':6}{'AP':>8}{'AP50':>8}{'AP75':>8}"]
    for iou_type, m in metrics.items():
        lines.append(f"{iou_type:6}{m['AP']:8.3f}{m['AP50']:8.3f}{m['AP75']:8.3f}")
    return "\n".join(lines)
