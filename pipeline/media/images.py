"""Still-image I/O (RGB uint8 HWC), with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_rgb(path: str | Path) -> np.ndarray:
    """-> uint8 [H, W, 3] RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path}: no such file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"image {path}: not a readable image (expected one of {', '.join(IMAGE_SUFFIXES)})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_rgb(path: str | Path, image: np.ndarray) -> Path:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_rgb: expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"image {path}: could not be written")
    return path
