"""Built-in synthetic scenes: seeded RGB images of simple shapes with instance masks.

The project ships only data it makes itself, so the demo, the tests and a first training
run use these scenes. Everything is drawn with numpy alone, with hard edges, so a mask
is exactly the set of pixels painted for its object, and the same seed gives the same
scene on any machine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from maskstream.model.rle import encode_rle

__all__ = [
    "CLASS_NAMES",
    "Scene",
    "encode_png",
    "make_scene",
    "make_clip",
    "scene_file_name",
    "to_coco",
    "write_png",
    "write_sample_images",
    "write_synthetic_clip",
    "write_synthetic_dataset",
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


def scene_batch(batch: int, height: int, width: int) -> np.ndarray:
    """Scenes of seeds 0..batch-1 as one uint8 [B, 3, H, W] array: a runner's input batch."""
    return np.stack([make_scene(seed, height=height, width=width).image.transpose(2, 0, 1) for seed in range(batch)])


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


def write_synthetic_dataset(
    out_dir: str | Path, count: int, seed: int = 0, height: int = 320, width: int = 320, max_objects: int = 6
) -> Path:
    """A COCO-format dataset on disk: out_dir/images/scene_<seed>.png and out_dir/annotations.json."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected an int >= 1, got {count!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(count):
        scene = make_scene(seed + i, height, width, max_objects)
        write_png(out / "images" / scene_file_name(scene), scene.image)
        scenes.append(scene)
    path = out / "annotations.json"
    path.write_text(json.dumps(to_coco(scenes)), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class _MovingObject:
    label: int
    shape_seed: int  # replays make_scene's shape draw: the same shape in every frame
    colour: np.ndarray  # [3] RGB
    shade: float  # direction of the shading gradient
    velocity: tuple[float, float]  # pixels per frame


def make_clip(
    seed: int, frames: int, height: int = 320, width: int = 320, max_objects: int = 4, *, min_area: int = 64
) -> tuple[list[Scene], list[list[int]]]:
    """`frames` scenes of the same objects gliding in straight lines over one background,
    and per frame the track id (1..) of each annotated object.

    Each object is the shape `make_scene` would draw, translated by velocity * (t - middle):
    its mask is exact in every frame, and occlusion follows the drawing order as in a scene.
    An object with fewer than `min_area` visible pixels in a frame is not annotated there.
    """
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames: expected an int >= 1, got {frames!r}")
    rng = np.random.default_rng([seed, 7])  # its own stream: not make_scene(seed)'s objects
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # each [H, W]
    background = _background(rng, xs, ys)
    under = background.reshape(-1, 3).mean(axis=0)
    objects: list[_MovingObject] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        colour = rng.uniform(0, 255, 3)
        for _ in range(20):  # stand out from the background, as make_scene's objects do
            if np.abs(colour - under).sum() > 120:
                break
            colour = rng.uniform(0, 255, 3)
        speed = rng.uniform(0.2, 0.6) * min(height, width) / max(frames, 1)  # pixels per frame
        direction = rng.uniform(0, 2 * np.pi)
        objects.append(
            _MovingObject(
                label=int(rng.integers(len(CLASS_NAMES))) + 1,
                shape_seed=int(rng.integers(2**31)),
                colour=colour,
                shade=float(rng.uniform(0, 2 * np.pi)),
                velocity=(float(speed * np.cos(direction)), float(speed * np.sin(direction))),
            )
        )
    scenes, tracks = [], []
    for t in range(frames):
        image = background.copy()
        masks: list[np.ndarray] = []
        labels: list[int] = []
        ids: list[int] = []
        for track_id, obj in enumerate(objects, start=1):
            vx, vy = obj.velocity
            dx, dy = vx * (t - (frames - 1) / 2), vy * (t - (frames - 1) / 2)
            shape_rng = np.random.default_rng(obj.shape_seed)
            mask = _shape_mask(shape_rng, CLASS_NAMES[obj.label - 1], xs - dx, ys - dy)
            if not mask.any():
                continue
            u = xs[mask] * np.cos(obj.shade) + ys[mask] * np.sin(obj.shade)  # [K]
            u = (u - u.min()) / max(float(np.ptp(u)), 1e-9) - 0.5
            image[mask] = obj.colour[None, :] * (1.0 + 0.25 * u[:, None])
            for earlier in masks:
                earlier &= ~mask
            masks.append(mask)
            labels.append(obj.label)
            ids.append(track_id)
        keep = [
            i for i, m in enumerate(masks)
            if m.sum() >= min_area and (b := _tight_box(m))[2] - b[0] >= 3 and b[3] - b[1] >= 3
        ]
        for i in set(range(len(masks))) - set(keep):
            image[masks[i]] = background[masks[i]]
        noise = np.random.default_rng([seed, 8, t]).normal(0.0, 3.0, image.shape)
        pixels = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
        kept_masks = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, height, width), bool)
        boxes = np.asarray([_tight_box(masks[i]) for i in keep], np.float32).reshape(-1, 4)  # [N, 4]
        kept_labels = np.asarray([labels[i] for i in keep], np.int64)
        for array in (pixels, kept_masks, boxes, kept_labels):
            array.setflags(write=False)
        scenes.append(Scene(seed=int(seed), image=pixels, masks=kept_masks, boxes=boxes, labels=kept_labels))
        tracks.append([ids[i] for i in keep])
    return scenes, tracks


def write_synthetic_clip(
    path: str | Path,
    frames: int,
    seed: int = 0,
    height: int = 320,
    width: int = 320,
    fps: int = 25,
    max_objects: int = 4,
) -> tuple[Path, Path]:
    """An MP4 of `make_clip` (H.264 via libx264 where the PyAV wheel has it, else MPEG-4 Part 2)
    and PATH_annotations.json: its per-frame COCO ground truth (image id = frame index, as
    `maskstream run` numbers a stream's frames in its COCO results, so those score against it
    directly; `frame_index` on each image, `track_id` on each annotation)."""
    import av  # only clip writing needs FFmpeg

    if height % 2 or width % 2:
        raise ValueError(f"clip size: yuv420p needs an even height and width, got {height}x{width}")
    scenes, tracks = make_clip(seed, frames, height, width, max_objects)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream: Any = container.add_stream(codec, rate=fps)  # a VideoStream
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # Near-lossless, so the pixels stay close to what the ground truth describes.
        stream.options = {"crf": "12", "preset": "veryfast"} if codec == "libx264" else {"qscale": "2"}
        for scene in scenes:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene.image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    gt = to_coco(scenes)
    for t, image in enumerate(gt["images"]):
        image["id"], image["file_name"], image["frame_index"] = t, f"{path.stem}_{t:05d}.png", t
    for ann in gt["annotations"]:
        ann["image_id"] -= 1  # to_coco numbers images from 1
    track_ids = [tid for frame in tracks for tid in frame]  # to_coco's annotation order
    for ann, track_id in zip(gt["annotations"], track_ids):
        ann["track_id"] = track_id
    gt["info"] = {"description": f"maskstream synthetic clip {path.name}", "fps": fps, "codec": codec}
    json_path = path.with_name(f"{path.stem}_annotations.json")
    json_path.write_text(json.dumps(gt), encoding="utf-8")
    return path, json_path


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


# OpenCV stores colour as BGR(A): the channel order our RGB(A) arrays are converted to first.
_TO_OPENCV = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (OpenCV's encoder)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image: expected a uint8 numpy array, got {_kind(image)}")
    channels = 1 if image.ndim == 2 else (image.shape[2] if image.ndim == 3 else 0)
    if channels not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image: expected [H, W], [H, W, 3] or [H, W, 4], got {list(image.shape)}")
    pixels = image if channels == 1 else cv2.cvtColor(np.ascontiguousarray(image), _TO_OPENCV[channels])
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError(f"image: OpenCV could not encode {list(image.shape)} as PNG")
    return data.tobytes()


def _kind(x: Any) -> str:
    return f"{x.dtype} array" if isinstance(x, np.ndarray) else type(x).__name__
