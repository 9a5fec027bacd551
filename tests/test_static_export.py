"""The static inference graph: fixed shapes, exports with torch.export, same outputs as eager."""
from __future__ import annotations

import maskstream.model as model
import pytest
import torch
from maskstream.model.config import StaticGraphConfig
from maskstream.model.static import OUTPUT_NAMES, PRECISIONS, StaticMaskRCNN, export, pad_value, with_precision

SHAPE = StaticGraphConfig(batch=2, height=192, width=256, detections=20)


@pytest.fixture(scope="module", params=PRECISIONS)
def static(request):
    """The graph in each precision: fp16's casts (model.static.with_precision) are graph nodes too."""
    torch.manual_seed(0)
    # Untrained heads score every class about 1/91; a zero threshold keeps detections flowing.
    m = model.build("lite", box_score_thresh=0.0, box_detections_per_img=SHAPE.detections).eval()
    return StaticMaskRCNN(with_precision(m, request.param), SHAPE).eval()


@pytest.fixture(scope="module")
def padded_frames(static):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (SHAPE.batch, 3, SHAPE.height, SHAPE.width), dtype=torch.uint8, generator=g)
    # second frame letterboxed: only its top-left 160x224 is picture
    pad = torch.tensor(pad_value(static.model), dtype=torch.uint8)[:, None, None]
    images[1, :, 160:] = pad
    images[1, :, :, 224:] = pad
    sizes = torch.tensor([[SHAPE.height, SHAPE.width], [160, 224]])
    return images, sizes


def test_output_contract(static, padded_frames):
    with torch.no_grad():
        out = static(*padded_frames)
    assert tuple(out) == OUTPUT_NAMES
    b, k = SHAPE.batch, SHAPE.detections
    assert out["num_detections"].shape == (b,) and out["num_detections"].dtype == torch.int64
    assert out["boxes"].shape == (b, k, 4) and out["boxes"].dtype == torch.float32
    assert out["scores"].shape == (b, k) and out["labels"].shape == (b, k)
    assert out["mask_probs"].shape == (b, k, 28, 28) and out["mask_probs"].dtype == torch.float32
    assert (out["num_detections"] == k).all()
    # boxes are clipped to each frame's valid region
    assert out["boxes"][1, :, 2].max() <= 224 and out["boxes"][1, :, 3].max() <= 160
    assert ((out["mask_probs"] >= 0) & (out["mask_probs"] <= 1)).all()


def test_export_has_no_graph_break_and_matches_eager(static, padded_frames):
    program = export(static)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "maskstream.multiscale_roi_align.default" in targets
    assert "maskstream.batched_nms_padded.default" in targets
    with torch.no_grad():
        eager = static(*padded_frames)
        exported = program.module()(*padded_frames)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(exported[name], eager[name], atol=1e-5, rtol=1e-5, msg=name)


# What would make a CUDA forward wait for the host or copy from it, breaking CUDA graph capture:
# scalars read back, data-dependent shapes, and tensors made on the CPU then moved (constants
# must be buffers, which move with the model).
HOST_BOUND = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
              "aten.masked_select.default", "aten._to_copy.default", "aten.to.device", "aten.to.dtype_layout"}


def test_export_stays_on_the_device(static):
    program = export(static)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not targets & HOST_BOUND, sorted(targets & HOST_BOUND)
    moved = [n for n in program.graph.nodes if n.op == "call_function" and "device" in n.kwargs
             and str(n.target).startswith("aten.to")]
    assert not moved, moved


def test_bad_input_names_what_was_expected(static, padded_frames):
    images, sizes = padded_frames
    with pytest.raises(ValueError, match=r"images: expected uint8 \[2, 3, 192, 256\].*torch.float32"):
        static(images.float(), sizes)
    with pytest.raises(ValueError, match=r"images: expected uint8 \[2, 3, 192, 256\].*\[1, 3, 192, 256\]"):
        static(images[:1], sizes)
    with pytest.raises(ValueError, match=r"image_sizes: expected \[2, 2\]"):
        static(images, sizes[:1])


def test_shape_must_suit_the_model():
    m = model.build("lite")
    with pytest.raises(ValueError, match="multiples of transform.size_divisible=32"):
        StaticMaskRCNN(m, StaticGraphConfig(height=200, width=256))
    with pytest.raises(ValueError, match="static.detections=50 must equal roi_heads.detections_per_img=100"):
        StaticMaskRCNN(m, StaticGraphConfig(detections=50))
