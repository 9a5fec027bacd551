"""multiscale_roi_align: the op against the float64 loop reference, with the spec's tolerances."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from maskstream.model.ops import (
    RoIAlignAttrs,
    assign_levels,
    multiscale_roi_align,
    multiscale_roi_align_per_level_loop,
    roi_align,
    roi_align_reference,
)
from maskstream.model.ops.roi_align import _roi_align_one_box

from tests.op_cases import pyramid, random_boxes

SPEC = json.loads((Path(__file__).resolve().parents[1] / "plugins" / "roi_align" / "spec.json").read_text())
TOL = SPEC["tolerances"]
DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype_name: str) -> None:
    tol = TOL[dtype_name]
    torch.testing.assert_close(out.to(torch.float64), ref, atol=tol["atol"], rtol=tol["rtol"])


CASES = 32


@pytest.mark.parametrize("seed", range(CASES))
def test_float32_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    b, c = 1 + seed % 2, int(torch.randint(1, 9, (), generator=gen))
    h, w = (32 * int(torch.randint(2, 9, (), generator=gen)) for _ in range(2))
    r = 0 if seed == 0 else int(torch.randint(1, 10, (), generator=gen))
    size = (2, 3, 5, 7)[seed % 4]
    sampling_ratio = (2, 1)[(seed // 4) % 2]
    aligned = bool((seed // 8) % 2)
    features, boxes = pyramid(gen, b, c, h, w), random_boxes(gen, b, r, h, w)

    attrs = RoIAlignAttrs(size, sampling_ratio, aligned)
    out = multiscale_roi_align(features, boxes, attrs)
    assert out.shape == (b, r, c, size, size) and out.dtype == torch.float32
    assert_matches(out, roi_align_reference(features, boxes, attrs), "float32")


def test_random_cases_cover_every_level_and_the_no_level_case():
    seen = set()
    for seed in range(CASES):
        gen = torch.Generator().manual_seed(seed)
        seen |= set(assign_levels(random_boxes(gen, 2, 9, 128, 128)).flatten().tolist())
    assert seen == {-1, 0, 1, 2, 3}


@pytest.mark.parametrize("sampling_ratio", [0, -1, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_other_sampling_ratios_match_reference(sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(100 + sampling_ratio)
    features, boxes = pyramid(gen, 2, 3, 96, 128), random_boxes(gen, 2, 6, 96, 128)
    attrs = RoIAlignAttrs(4, sampling_ratio, aligned)
    out = multiscale_roi_align(features, boxes, attrs)
    assert_matches(out, roi_align_reference(features, boxes, attrs), "float32")


@pytest.mark.parametrize("dtype_name", ["float64", "float16"])
def test_other_dtypes_match_reference(dtype_name):
    dtype = DTYPES[dtype_name]
    for seed in range(4):
        gen = torch.Generator().manual_seed(200 + seed)
        features = pyramid(gen, 2, 4, 128, 96, dtype)
        boxes = random_boxes(gen, 2, 8, 128, 96).to(dtype)
        attrs = RoIAlignAttrs(7, aligned=bool(seed % 2))
        out = multiscale_roi_align(features, boxes, attrs)
        assert out.dtype == dtype
        # The reference reads the same (float16-rounded) inputs, converted exactly to float64.
        assert_matches(out, roi_align_reference(features, boxes, attrs), dtype_name)


def test_level_mapping_boundaries():
    def box(side):
        return [0.0, 0.0, side, side]

    boxes = torch.tensor([box(0.0), box(50.0), box(111.9), box(112.0), box(224.0), box(447.0), box(448.0),
                          box(5000.0), [0, 0, -10, 10], [0, float("nan"), 10, 10]])
    assert assign_levels(boxes).tolist() == [0, 0, 0, 1, 2, 2, 3, 3, -1, -1]
    # first_level shifts the clamp range, not the mapping.
    assert assign_levels(boxes, RoIAlignAttrs(7, first_level=3)).tolist() == [0, 0, 0, 0, 1, 1, 2, 3, -1, -1]
    # The 1e-6 after log2 lifts sizes a hair under a boundary (visible in float64) to the level above.
    near = torch.tensor([box(112 * (1 - 1e-9)), box(112 * (1 - 1e-5))], dtype=torch.float64)
    assert assign_levels(near).tolist() == [1, 0]


def test_samples_exactly_on_the_valid_border_count():
    # aligned zero-size boxes put every sample on start = x*k - 0.5: -1 and W (or H) exactly,
    # the inclusive ends of the kernel's valid range.
    gen = torch.Generator().manual_seed(12)
    features = pyramid(gen, 1, 2, 64, 64)
    h2 = features[0].shape[2]
    boxes = torch.tensor([[[-2.0, 4, -2, 20], [4, 4 * h2 + 2, 20, 4 * h2 + 2], [-2, -2, -2, -2]]])
    attrs = RoIAlignAttrs(3, 2, True)
    out = multiscale_roi_align(features, boxes, attrs)
    assert torch.count_nonzero(out) == out.numel()
    assert_matches(out, roi_align_reference(features, boxes, attrs), "float32")


def test_empty_boxes():
    gen = torch.Generator().manual_seed(0)
    features = pyramid(gen, 2, 3, 64, 64)
    out = multiscale_roi_align(features, torch.zeros(2, 0, 4), RoIAlignAttrs(7))
    assert out.shape == (2, 0, 3, 7, 7)


def test_boxes_pooling_nothing_give_zeros():
    gen = torch.Generator().manual_seed(0)
    features = pyramid(gen, 1, 3, 64, 64)
    boxes = torch.tensor([[[100, 100, 140, 150], [-90, -80, -60, -50], [40, 10, 20, 50], [0, 0, float("nan"), 5]]])
    out = multiscale_roi_align(features, boxes.float(), RoIAlignAttrs(5))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("aligned", [False, True])
def test_single_level_roi_align_matches_reference_loop(aligned):
    gen = torch.Generator().manual_seed(3)
    feature = torch.randn(2, 3, 20, 24, generator=gen)
    boxes = random_boxes(gen, 2, 6, 160, 192)
    out = roi_align(feature, boxes, 0.125, 5, 2, aligned)
    f64 = feature.double().numpy()
    ref = torch.stack([
        torch.stack([
            torch.from_numpy(_roi_align_one_box(f64[i], box.double().tolist(), 0.125, 5, 2, aligned))
            for box in boxes[i]
        ])
        for i in range(2)
    ])
    assert_matches(out, ref, "float32")


def test_per_level_loop_equals_op():
    gen = torch.Generator().manual_seed(4)
    features, boxes = pyramid(gen, 2, 5, 160, 128), random_boxes(gen, 2, 40, 160, 128)
    for size, aligned in ((7, False), (14, True)):
        torch.testing.assert_close(
            multiscale_roi_align_per_level_loop(features, boxes, RoIAlignAttrs(size, 2, aligned)),
            multiscale_roi_align(features, boxes, RoIAlignAttrs(size, 2, aligned)),
            **{k: TOL["float32"][k] for k in ("atol", "rtol")},
        )


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (1, True), (0, False)])
def test_gradcheck(sampling_ratio, aligned):
    grad_spec = SPEC["gradient"]
    gen = torch.Generator().manual_seed(5)
    # Tiny on purpose: gradcheck runs the op twice per feature element.
    features = [f.requires_grad_() for f in pyramid(gen, 2, 1, 32, 32, torch.float64)]
    boxes = random_boxes(gen, 2, 5, 32, 32).double()

    def pool(*levels):
        return multiscale_roi_align(levels, boxes, RoIAlignAttrs(3, sampling_ratio, aligned))

    # The full Jacobian for the model's setting, random projections (fast_mode) for the others.
    fast = (sampling_ratio, aligned) != (2, False)
    assert torch.autograd.gradcheck(
        pool, features, eps=grad_spec["eps"], atol=grad_spec["atol"], rtol=grad_spec["rtol"], fast_mode=fast
    )


def test_float16_backward_follows_float32():
    gen = torch.Generator().manual_seed(6)
    features, boxes = pyramid(gen, 1, 3, 64, 64), random_boxes(gen, 1, 6, 64, 64)
    grads = {}
    for dtype in (torch.float32, torch.float16):
        levels = [f.detach().to(dtype).requires_grad_() for f in features]
        out = multiscale_roi_align(levels, boxes.to(dtype), RoIAlignAttrs(7))
        out.backward(torch.ones_like(out))
        grads[dtype] = [f.grad for f in levels]
    for g16, g32 in zip(grads[torch.float16], grads[torch.float32]):
        assert g16.dtype == torch.float16
        torch.testing.assert_close(g16.float(), g32, **{k: TOL["float16"][k] for k in ("atol", "rtol")})


def test_opcheck_schema_fake_and_autograd_registration():
    gen = torch.Generator().manual_seed(7)
    features = [f.requires_grad_() for f in pyramid(gen, 2, 2, 64, 64, torch.float64)]
    boxes = random_boxes(gen, 2, 3, 64, 64).double()
    torch.library.opcheck(torch.ops.maskstream.multiscale_roi_align.default, (*features, boxes, 3))


def test_torch_export_keeps_one_op_and_same_output():
    class Pool(torch.nn.Module):
        def forward(self, p2, p3, p4, p5, boxes):
            return torch.ops.maskstream.multiscale_roi_align(p2, p3, p4, p5, boxes, 7)

    gen = torch.Generator().manual_seed(8)
    features, boxes = pyramid(gen, 2, 4, 64, 96), random_boxes(gen, 2, 5, 64, 96)
    program = torch.export.export(Pool(), (*features, boxes))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.maskstream.multiscale_roi_align.default]
    torch.testing.assert_close(program.module()(*features, boxes), Pool()(*features, boxes), atol=0, rtol=0)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda f, b: (f[:3], b), ValueError, "expected 4 feature levels"),
        (lambda f, b: ([f[0][:1], *f[1:]], b), ValueError, "share batch and channels"),
        (lambda f, b: ([f[0][:, :1], *f[1:]], b), ValueError, "share batch and channels"),
        (lambda f, b: ([f[0].double(), *f[1:]], b), TypeError, "one dtype"),
        (lambda f, b: ([x.bfloat16() for x in f], b.bfloat16()), TypeError, "float16, float32 or float64"),
        (lambda f, b: ([f[0][0], *f[1:]], b), ValueError, r"features\[0\] must be a \[B, C, H, W\]"),
        (lambda f, b: (f, b[0]), ValueError, r"boxes must be \[B, R, 4\]"),
        (lambda f, b: (f, b[..., :3]), ValueError, r"boxes must be \[B, R, 4\]"),
        (lambda f, b: (f, b[:1]), ValueError, "boxes batch 1 does not match features batch 2"),
        (lambda f, b: (f, b.double()), TypeError, "boxes must have the features' dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, message):
    gen = torch.Generator().manual_seed(9)
    features, boxes = mutate(pyramid(gen, 2, 3, 64, 64), random_boxes(gen, 2, 4, 64, 64))
    with pytest.raises(error, match=message):
        multiscale_roi_align(features, boxes, RoIAlignAttrs(7))
    if len(features) == 4:  # the op itself checks too, for callers that skip the wrapper
        with pytest.raises(error, match=message):
            torch.ops.maskstream.multiscale_roi_align(*features, boxes, 7)


def test_output_size_must_be_positive():
    gen = torch.Generator().manual_seed(10)
    with pytest.raises(ValueError, match="output_size must be >= 1, got 0"):
        multiscale_roi_align(pyramid(gen, 1, 1, 64, 64), torch.zeros(1, 1, 4), RoIAlignAttrs(0))
    with pytest.raises(ValueError, match="output_size must be >= 1, got 0"):  # the op, called flat
        torch.ops.maskstream.multiscale_roi_align(*pyramid(gen, 1, 1, 64, 64), torch.zeros(1, 1, 4), 0)


def test_attributes_are_the_schema_and_the_spec():
    """RoIAlignAttrs is the one list of attributes: the op's schema is made from it, and spec.json
    (the plugin's contract, and TensorRT's plugin fields) names the same ones with the same defaults."""
    schema = torch.ops.maskstream.multiscale_roi_align.default._schema.arguments
    fields = dataclasses.fields(RoIAlignAttrs)
    assert [a.name for a in schema] == ["p2", "p3", "p4", "p5", "boxes", *(f.name for f in fields)]
    assert [a["name"] for a in SPEC["attributes"]] == [f.name for f in fields]
    for f, spec, arg in zip(fields, SPEC["attributes"], schema[5:]):
        if f.default is dataclasses.MISSING:
            assert spec.get("required") and not arg.has_default_value()
        else:
            assert spec["default"] == f.default == arg.default_value and type(spec["default"]) is type(f.default)
    attrs = RoIAlignAttrs(14, 0, True, 3, 112, 1)
    assert RoIAlignAttrs.from_op_args(attrs.op_args()) == attrs
    assert RoIAlignAttrs.from_op_args((7,)) == RoIAlignAttrs(7)  # left-out trailing arguments: defaults


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu():
    gen = torch.Generator().manual_seed(11)
    features, boxes = pyramid(gen, 2, 8, 128, 128), random_boxes(gen, 2, 30, 128, 128)
    out = multiscale_roi_align([f.cuda() for f in features], boxes.cuda(), RoIAlignAttrs(7))
    assert_matches(out.cpu(), multiscale_roi_align(features, boxes, RoIAlignAttrs(7)).double(), "float32")
