"""Drawings a person can read: outlined masks, labels that hide no other label, sizes that scale."""
from __future__ import annotations

import numpy as np
import pytest
from maskstream.pipeline.media.annotate import draw_detections, drawing_scale, label_color, place_labels


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_boxes_at_one_place_do_not_hide_each_other():
    boxes = np.array([[100, 100, 200, 200]] * 6, dtype=np.float32)  # a crowd: six boxes on one spot
    rects = place_labels([(80, 16)] * 6, boxes, (480, 640))
    assert len(rects) == 6
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 640 and 0 <= a[1] and a[3] <= 480, a
        for b in rects[i + 1:]:
            assert not _overlap(a, b), (a, b)


def test_a_label_at_the_frame_edge_stays_inside():
    rects = place_labels([(120, 20)], np.array([[600, 0, 640, 30]], dtype=np.float32), (480, 640))
    x0, y0, x1, y1 = rects[0]
    assert x1 <= 640 and y0 >= 0


def test_lines_and_text_grow_with_the_frame():
    thin, small = drawing_scale((480, 640))
    thick, large = drawing_scale((1080, 1920))
    assert thick > thin and large > small


def test_a_mask_is_outlined_with_a_dark_rim_and_its_class_colour():
    image = np.full((240, 320, 3), 90, dtype=np.uint8)  # mid grey: a fill alone barely shows
    mask = np.zeros((240, 320), dtype=bool)
    mask[60:180, 80:240] = True
    out = draw_detections(image, np.array([[20, 20, 300, 220]], np.float32), np.array([1]), np.array([0.9]), [mask])
    row = out[120]
    color = np.array(label_color(1))
    edge = row[76:86]  # across the mask's left edge at x = 80
    assert (edge.sum(axis=1) < 60).any(), "no dark rim at the mask's edge"
    assert (np.abs(edge.astype(int) - color).sum(axis=1) < 40).any(), "no outline in the class colour"
    inside = row[160].astype(int)
    assert np.abs(inside - (0.6 * 90 + 0.4 * color)).max() <= 1  # the fill stays translucent
    assert (out[10, 10] == 90).all()  # outside untouched


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920)])
def test_every_label_is_drawn_in_its_class_colour(hw):
    image = np.zeros((*hw, 3), dtype=np.uint8)
    boxes = np.array([[50, 60, 150, 160], [55, 65, 150, 160]], dtype=np.float32)
    out = draw_detections(image, boxes, np.array([1, 2]), np.array([0.9, 0.8]), np.zeros((2, *hw), bool),
                          ("bg", "person", "car"))
    for label in (1, 2):
        assert (out.reshape(-1, 3) == label_color(label)).all(axis=1).sum() > 100  # a label background each
