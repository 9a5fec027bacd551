"""Built-in synthetic scenes: seeded RGB images of simple shapes with instance masks.

The project ships only data it makes itself, so the demo, the tests and a first training
run use these scenes. Everything is drawn with numpy alone, with hard edges, so a mask
is exactly the set of pixels painted for its object, and the same seed gives the same
scene on any machine.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.postprocess import encode_rle

__all__ = [
    "CLASS_NAMES",
    "Scene",
    "encode_png",
    "make_scene",
    "scene_file_name",
    "to_coco",
    "write_png",
    "write_sample_images",
]

CLASS_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle", "ellipse")


@dataclass(frozen=True, eq=False)
class Scene:
    """One generated image and its ground truth; the arrays are read-only."""

    seed: int
    image: np.ndarray  # uint8 [H, W, 3] RGB
    masks: np.ndarray  # bool [N, H, W], the visible part of each object, disjoint
    boxes: np.ndarray  # float32 [N, 4] x0, y0, x1, y1 pixel edges: tight, ends exclusive
    labels: np.ndarray  # int64 [N], 1..len(class_names); 0 is background
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def make_scene(
    seed: int, height: int = 480, width: int = 640, max_objects: int = 6, *, min_area: int = 64
) -> Scene:
    """A scene of 1..max_objects shapes over a textured gradient, drawn back to front.

    Later objects occlude earlier ones; an object left with fewer than `min_area` visible
    pixels, or thinner than 3 pixels, is dropped and its pixels returned to background
    (so a scene may hold fewer objects, even none).
    """
    for name, value, low in (
        ("height", height, 16),
        ("width", width, 16),
        ("max_objects", max_objects, 0),
        ("min_area", min_area, 1),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")

    rng = np.random.default_rng(seed)
    # Pixel centres, so a shape covers a pixel when it covers the pixel's middle.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # each [H, W]
    background = _background(rng, xs, ys)  # float [H, W, 3]
    image = background.copy()

    drawn_masks: list[np.ndarray] = []
    drawn_labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1)) if max_objects else 0):
        label = int(rng.integers(len(CLASS_NAMES))) + 1
        mask = _shape_mask(rng, CLASS_NAMES[label - 1], xs, ys)
        if not mask.any():
            continue
        image[mask] = _object_pixels(rng, image, mask, xs, ys)
        for earlier in drawn_masks:
            earlier &= ~mask  # only what stays visible belongs to the earlier object
        drawn_masks.append(mask)
        drawn_labels.append(label)

    keep_masks, keep_boxes, keep_labels = [], [], []
    for mask, label in zip(drawn_masks, drawn_labels):
        box = _tight_box(mask)
        if mask.sum() < min_area or box[2] - box[0] < 3 or box[3] - box[1] < 3:
            # Paint the remnant over with background: every object pixel in the image
            # then belongs to an annotated object, so nothing unlabelled is learned.
            image[mask] = background[mask]
            continue
        keep_masks.append(mask)
        keep_boxes.append(box)
        keep_labels.append(label)

    noise = rng.normal(0.0, 3.0, image.shape)  # sensor-like grain over everything
    pixels = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
    masks = np.stack(keep_masks) if keep_masks else np.zeros((0, height, width), bool)
    boxes = np.asarray(keep_boxes, np.float32).reshape(-1, 4)  # [N, 4]
    labels = np.asarray(keep_labels, np.int64)
    for array in (pixels, masks, boxes, labels):
        array.setflags(write=False)
    return Scene(seed=int(seed), image=pixels, masks=masks, boxes=boxes, labels=labels)


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    h, w = xs.shape
    start, end = rng.uniform(30, 225, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)  # [H, W] in 0..1 along the gradient
    image = start + (end - start) * t[..., None]  # [H, W, 3]
    # Low-frequency blotches: a coarse random grid, smoothly upsampled.
    coarse = rng.normal(0.0, 14.0, size=(6, 8, 3))
    image += np.einsum(
        "hy,yxc,wx->hwc", _lerp_matrix(h, 6), coarse, _lerp_matrix(w, 8), optimize=True
    )
    return image


def _lerp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of a 1-D linear upsampling with the grid ends on the image ends."""
    src = np.linspace(0, in_size - 1, out_size)
    lo = np.minimum(np.floor(src).astype(int), in_size - 2)
    frac = src - lo
    weights = np.zeros((out_size, in_size))
    weights[np.arange(out_size), lo] = 1 - frac
    weights[np.arange(out_size), lo + 1] = frac
    return weights


def _shape_mask(rng: np.random.Generator, kind: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    h, w = xs.shape
    size = rng.uniform(0.06, 0.22) * min(h, w)  # roughly the radius
    cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
    dx, dy = xs - cx, ys - cy
    angle = rng.uniform(0, np.pi)
    u = dx * np.cos(angle) + dy * np.sin(angle)  # coordinates in the shape's own frame
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "circle":
        return dx * dx + dy * dy <= size * size
    if kind == "ellipse":
        # An aspect ratio well away from 1 keeps ellipses distinguishable from circles.
        minor = size * rng.uniform(0.35, 0.65)
        return (u / size) ** 2 + (v / minor) ** 2 <= 1.0
    if kind == "rectangle":
        half_w, half_h = size * rng.uniform(0.6, 1.0), size * rng.uniform(0.4, 1.0)
        return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
    if kind == "triangle":
        corners = angle + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        px, py = cx + size * np.cos(corners), cy + size * np.sin(corners)
        # Inside when on the same side of all three edges (either winding order).
        sides = [
            (px[(i + 1) % 3] - px[i]) * (ys - py[i]) - (py[(i + 1) % 3] - py[i]) * (xs - px[i])
            for i in range(3)
        ]
        return ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
            (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)
        )
    raise ValueError(f"kind: expected one of {CLASS_NAMES}, got {kind!r}")


def _object_pixels(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Colours [K, 3] for the K masked pixels: a random colour that stands out from what
    it covers, with a soft linear shading so objects are not flat stickers."""
    under = image[mask].mean(axis=0)
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - under).sum() > 120:
            break
    angle = rng.uniform(0, 2 * np.pi)
    t = xs[mask] * np.cos(angle) + ys[mask] * np.sin(angle)  # [K]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-9) - 0.5
    return np.asarray(colour[None, :] * (1.0 + 0.25 * t[:, None]))  # [K, 3]


def _tight_box(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


# --------------------------------------------------------------------------- COCO


def scene_file_name(scene: Scene) -> str:
    """The PNG name used by `write_sample_images` and `to_coco` for this scene."""
    return f"scene_{scene.seed:06d}.png"


def to_coco(scenes: Sequence[Scene]) -> dict[str, Any]:
    """COCO instances dict of the scenes: RLE segmentations, xywh boxes, iscrowd 0.

    Image ids are 1..len(scenes) in order; file names follow `scene_file_name`.
    """
    if not scenes:
        raise ValueError("scenes: expected at least one Scene, got none")
    class_names = scenes[0].class_names
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, scene in enumerate(scenes, start=1):
        if scene.class_names != class_names:
            raise ValueError(
                f"scenes[{image_id - 1}]: expected class_names {class_names}, "
                f"got {scene.class_names}"
            )
        images.append(
            {
                "id": image_id,
                "file_name": scene_file_name(scene),
                "height": scene.height,
                "width": scene.width,
            }
        )
        for mask, box, label in zip(scene.masks, scene.boxes, scene.labels):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": encode_rle(mask),
                    "area": float(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "maskstream synthetic scenes"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "shape"}
            for i, name in enumerate(class_names, start=1)
        ],
    }


# --------------------------------------------------------------------------- PNG


def write_sample_images(out_dir: str | Path, count: int = 4, seed: int = 0) -> list[Path]:
    """Write `count` default-size scenes (seeds seed, seed+1, ...) as PNGs into out_dir."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"count: expected a non-negative int, got {count!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        scene = make_scene(seed + i)
        path = out / scene_file_name(scene)
        write_png(path, scene.image)
        paths.append(path)
    return paths


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Save a uint8 [H,W] grey, [H,W,3] RGB or [H,W,4] RGBA image as PNG."""
    Path(path).write_bytes(encode_png(image))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image, using only zlib (no imaging library needed)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image: expected a uint8 numpy array, got {_kind(image)}")
    channels = 1 if image.ndim == 2 else (image.shape[2] if image.ndim == 3 else 0)
    colour_type = {1: 0, 3: 2, 4: 6}.get(channels)
    if colour_type is None or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image: expected [H, W], [H, W, 3] or [H, W, 4], got {list(image.shape)}")
    h, w = image.shape[:2]
    rows = image.reshape(h, w * channels)  # [H, W*C]
    # Filter type 2 ("Up", each row minus the one above, mod 256) compresses smooth
    # images far better than raw rows and is a single vectorised subtraction.
    up = np.diff(rows, axis=0, prepend=np.zeros((1, w * channels), np.uint8))
    filtered = np.hstack([np.full((h, 1), 2, np.uint8), up])  # [H, 1 + W*C]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)  # 8-bit, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _kind(x: Any) -> str:
    return f"{x.dtype} array" if isinstance(x, np.ndarray) else type(x).__name__
