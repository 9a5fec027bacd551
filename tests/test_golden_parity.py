"""Parity with torchvision's maskrcnn_resnet50_fpn on its own goldens.

The goldens in ../shared/reference were made by torchvision 0.28 on weights rebuilt here by
`golden_weights.make_state_dict` (deterministic, no file shipped). Tolerances, and why:
  * FPN features: sampled values within 1e-4 absolute (values reach ~10; float32 conv
    accumulation order is the only difference), channel means within 1e-5.
  * RPN proposals and detections: boxes within 1e-3 px of the golden (relative to a pixel,
    for coordinates up to 1333), scores within 1e-5, labels equal. Proposals whose scores tie
    exactly (sigmoid saturates at 1.0) may swap places, as torch's unstable sort orders them;
    the proposal *set* must match, and the order everywhere else.
  * Mask probabilities (28x28, before pasting) within 1e-4; pasted binary masks (> 0.5) as
    COCO RLE: IoU >= 0.99 per instance against the golden RLE.
"""
from __future__ import annotations

import json

import maskstream.model as model
import numpy as np
import pytest
import torch
from maskstream.model.config import StaticGraphConfig
from maskstream.model.postprocess import paste_masks_in_image
from maskstream.model.rle import decode_rle, encode_rle, mask_iou_rle
from maskstream.model.static import OUTPUT_NAMES, StaticMaskRCNN, export, pad_value
from maskstream.pipeline.media.images import read_rgb

from tests.shared_data import REFERENCE, require

IMAGES = ["astronaut", "coffee"]
BOX_ATOL = 1e-3
SCORE_ATOL = 1e-5
FEATURE_ATOL = 1e-4
MASK_PROB_ATOL = 1e-4
MIN_MASK_IOU = 0.99


@pytest.fixture(scope="module")
def v1(golden_weights):
    manifest = golden_weights.load_manifest(require(REFERENCE / "torchvision_maskrcnn_resnet50_fpn.json"))
    state = golden_weights.make_state_dict(manifest, seed=0)
    # torchvision built its golden model without pretrained weights, hence plain BatchNorm2d.
    return model.build("v1", backbone_norm="batch", checkpoint=state).eval(), golden_weights.checksum(state)


@pytest.fixture(scope="module", params=IMAGES)
def run(request, v1):
    """One eager forward per golden image, with every intermediate the goldens hold."""
    m, checksum = v1
    golden = torch.load(require(REFERENCE / f"golden_v1_{request.param}.pt"), weights_only=False)
    assert golden["seed"] == 0
    image = read_rgb(REFERENCE / golden["image"])
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    seen: dict = {}
    hooks = [
        m.backbone.register_forward_hook(lambda mod, args, out: seen.__setitem__("features", out)),
        m.rpn.register_forward_hook(lambda mod, args, out: seen.__setitem__("rpn", out)),
    ]
    detect, mask_probs = m.roi_heads.detect, m.roi_heads.mask_probs
    m.roi_heads.detect = lambda *a: seen.setdefault("detect", detect(*a))
    m.roi_heads.mask_probs = lambda *a: seen.setdefault("mask_probs", mask_probs(*a))
    try:
        with torch.no_grad():
            [out] = m([x])
    finally:
        for h in hooks:
            h.remove()
        del m.roi_heads.detect, m.roi_heads.mask_probs
    return golden, seen, out, checksum, image


def test_weights_are_the_goldens(run):
    golden, _, _, checksum, _ = run
    assert checksum == pytest.approx(golden["weights_checksum"], rel=1e-12)


def test_fpn_features(run):
    golden, seen, *_ = run
    for level, name in enumerate(["0", "1", "2", "3", "pool"]):
        ours, ref = seen["features"][level], golden["features"][name]
        assert list(ours.shape) == ref["shape"].tolist(), name
        torch.testing.assert_close(ours.flatten()[ref["sample_index"]], ref["sample_value"], atol=FEATURE_ATOL, rtol=0)
        torch.testing.assert_close(ours[0].double().mean((1, 2)), ref["channel_mean"], atol=1e-5, rtol=0)


def test_rpn_proposals(run):
    golden, seen, *_ = run
    proposals, num, _ = seen["rpn"]
    ours, ref = proposals[0, : int(num[0])], golden["proposals"]
    assert ours.shape == ref.shape
    # Same set: pair them up by sorting rows lexicographically.
    def lex(t: torch.Tensor) -> torch.Tensor:
        return t[np.lexsort(t.numpy().round(2).T[::-1])]

    torch.testing.assert_close(lex(ours), lex(ref), atol=BOX_ATOL, rtol=0)
    # Same order, except where rows merely swapped places with an equal-scored neighbour.
    differs = (ours - ref).abs().amax(1) > BOX_ATOL
    assert differs.float().mean() < 0.02, f"{int(differs.sum())} of {len(ref)} proposals out of order"


def test_detections(run):
    golden, seen, out, *_ = run
    det = seen["detect"]
    n = int(det["num_detections"][0])
    assert n == len(golden["roi_boxes"])
    torch.testing.assert_close(det["boxes"][0, :n], golden["roi_boxes"], atol=BOX_ATOL, rtol=0)
    torch.testing.assert_close(det["scores"][0, :n], golden["roi_scores"], atol=SCORE_ATOL, rtol=0)
    assert torch.equal(det["labels"][0, :n], golden["roi_labels"])
    # ...and mapped back to the original image size
    torch.testing.assert_close(out["boxes"], golden["boxes"], atol=BOX_ATOL, rtol=0)
    torch.testing.assert_close(out["scores"], golden["scores"], atol=SCORE_ATOL, rtol=0)
    assert torch.equal(out["labels"], golden["labels"])


def test_mask_probs_and_pasted_rle(run):
    golden, seen, out, _, image = run
    n = len(golden["roi_mask_probs"])
    torch.testing.assert_close(seen["mask_probs"][0, :n], golden["roi_mask_probs"], atol=MASK_PROB_ATOL, rtol=0)
    assert out["masks"].shape == (n, 1, *image.shape[:2])
    golden_rles = json.loads(golden["mask_rle"])
    ious = [mask_iou_rle(encode_rle(mask[0] > 0.5), ref) for mask, ref in zip(out["masks"], golden_rles)]
    worst = int(np.argmin(ious))
    assert min(ious) >= MIN_MASK_IOU, f"instance {worst}: mask IoU {ious[worst]:.4f}"
    assert decode_rle(golden_rles[0]).shape == image.shape[:2]


@pytest.mark.slow
def test_static_graph_equals_eager(v1):
    """Same uint8 frame, already 800x800 (so the eager resize is the identity): same detections."""
    m, _ = v1
    golden = torch.load(require(REFERENCE / "golden_v1_astronaut.pt"), weights_only=False)
    image = read_rgb(REFERENCE / golden["image"])
    frame = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(800, 800), mode="bilinear", align_corners=False
    ).round().clamp(0, 255).to(torch.uint8)
    static = StaticMaskRCNN(m, StaticGraphConfig(batch=1, height=800, width=800)).eval()
    with torch.no_grad():
        [eager] = m([frame[0].float() / 255])
        graph = static(frame, torch.tensor([[800, 800]]))
    n = int(graph["num_detections"][0])
    assert n == len(eager["boxes"]) > 0
    torch.testing.assert_close(graph["boxes"][0, :n], eager["boxes"], atol=BOX_ATOL, rtol=0)
    torch.testing.assert_close(graph["scores"][0, :n], eager["scores"], atol=SCORE_ATOL, rtol=0)
    assert torch.equal(graph["labels"][0, :n], eager["labels"])
    assert graph["mask_probs"].shape == (1, m.roi_heads.detections_per_img, 28, 28)
    pasted = paste_masks_in_image(graph["mask_probs"][0, :n, None], eager["boxes"], (800, 800))
    torch.testing.assert_close(pasted, eager["masks"], atol=MASK_PROB_ATOL, rtol=0)


@pytest.mark.slow
def test_exported_full_model_equals_eager(v1):
    """torch.export of the full R50-FPN static graph: no graph break, same outputs."""
    m, _ = v1
    static = StaticMaskRCNN(m, StaticGraphConfig(batch=1, height=800, width=800)).eval()
    golden = torch.load(require(REFERENCE / "golden_v1_coffee.pt"), weights_only=False)
    image = read_rgb(REFERENCE / golden["image"])  # 400x600: letterboxed into the 800x800 frame
    frame = torch.tensor(pad_value(m), dtype=torch.uint8).view(1, 3, 1, 1).repeat(1, 1, 800, 800)
    frame[0, :, :400, :600] = torch.from_numpy(image).permute(2, 0, 1)
    sizes = torch.tensor([[400, 600]])
    program = export(static)
    with torch.no_grad():
        eager = static(frame, sizes)
        exported = program.module()(frame, sizes)
    assert int(eager["num_detections"][0]) == 100
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(exported[name], eager[name], atol=1e-4, rtol=1e-4, msg=name)
