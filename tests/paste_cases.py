"""Masks and boxes for the paste tests (test_postprocess, test_mask_crops): boxes inside the frame,
over each edge, tiny down to zero size, and larger than the frame."""
from __future__ import annotations

import numpy as np


def random_cases(seed: int, n: int, im_h: int, im_w: int):
    g = np.random.default_rng(seed)
    masks = g.random((n, 1, 28, 28)).astype(np.float32)
    boxes = []
    for i in range(n):
        kind = i % 5
        if kind == 0:  # inside
            x0, y0 = g.uniform(0, max(im_w - 20, 1)), g.uniform(0, max(im_h - 20, 1))
            w, h = g.uniform(2, 40), g.uniform(2, 40)
        elif kind == 1:  # hanging over the left/top edge
            x0, y0 = g.uniform(-15, 2), g.uniform(-15, 2)
            w, h = g.uniform(5, 30), g.uniform(5, 30)
        elif kind == 2:  # hanging over the right/bottom edge
            x0, y0 = g.uniform(im_w - 10, im_w), g.uniform(im_h - 10, im_h)
            w, h = g.uniform(5, 30), g.uniform(5, 30)
        elif kind == 3:  # tiny, down to zero size
            x0, y0 = g.uniform(0, im_w - 3), g.uniform(0, im_h - 3)
            w, h = g.choice([0.0, 0.3, 0.9, 1.7]), g.choice([0.0, 0.5, 1.2])
        else:  # bigger than the frame
            x0, y0 = g.uniform(-20, 0), g.uniform(-20, 0)
            w, h = im_w + g.uniform(0, 40), im_h + g.uniform(0, 40)
        boxes.append([x0, y0, x0 + w, y0 + h])
    return masks, np.asarray(boxes, dtype=np.float32)


def threshold_cases(seeds: int):
    """(seed, masks, boxes, im_h, im_w) over frames from tiny to 1344 wide; every other seed's probabilities
    are quarter steps around 0.5, so that many blends land exactly on the threshold."""
    for seed in range(seeds):
        for im_h, im_w in [(37, 53), (16, 16), (480, 640), (800, 1344)]:
            masks, boxes = random_cases(seed, 25, im_h, im_w)
            if seed % 2:
                masks = (masks * 4).round().astype(np.float32) / 8 + np.float32(0.25)
            yield seed, masks, boxes, im_h, im_w
