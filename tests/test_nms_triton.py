"""The Triton NMS walk (model/ops/nms_triton.py): the interpreter against the CPU op, index for
index; the compiled kernel's arithmetic for a real GPU target; and (GPU only) the CUDA op."""
from __future__ import annotations

import re

import pytest
import torch
from maskstream.model.ops import batched_nms_padded

from tests.op_cases import clustered

pytest.importorskip("triton")

from maskstream.model.ops.nms_triton import (  # noqa: E402  (after the skip: these import triton)
    CHUNK,
    ENABLE_FP_FUSION,
    KEPT_BLOCK,
    NUM_WARPS,
    nms_walk_kernel,
    triton_batched_nms_padded,
)

from tests.triton_interpreter import INTERPRETING, interpret  # noqa: E402

INF, NAN = float("inf"), float("nan")


# ----------------------------------------------------------------------------- cases
# Each case: boxes [B, N, 4], scores [B, N], classes [B, N], args (iou, score_threshold, max_output),
# and optionally a smaller chunk / kept block so their boundaries fall inside small inputs.


def random_case(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    boxes, scores, labels = zip(*(clustered(gen, 60 + 40 * (seed % 4), 1 + seed % 4) for _ in range(2)))
    iou = float(torch.rand((), generator=gen)) * 0.8 + 0.1
    return {"tensors": (torch.stack(boxes), torch.stack(scores), torch.stack(labels)),
            "args": (iou, (0.2, 0.0, float("-inf"))[seed % 3], (5, 40, 400)[seed % 3])}


def small_blocks_case(seed: int) -> dict:
    case = random_case(100 + seed)
    case["args"] = (0.4, 0.0, (30, 200)[seed % 2])
    return {**case, "chunk": 8, "kept_block": 4}


def spread_case(rows: int = 12, cols: int = 25) -> dict:
    """300 disjoint boxes: everything is kept, so the kept set spans several KEPT_BLOCKs."""
    y, x = torch.meshgrid(torch.arange(rows) * 20.0, torch.arange(cols) * 20.0, indexing="ij")
    corner = torch.stack([x.flatten(), y.flatten()], -1)
    boxes = torch.cat([corner, corner + 10], -1)[None]
    shuffle = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(3))
    scores = torch.linspace(1, 0.1, rows * cols)[shuffle]
    return {"tensors": (boxes, scores[None], torch.zeros(1, rows * cols, dtype=torch.int64)), "args": (0.5, 0.0, 290)}


def rpn_like_case() -> dict:
    """Invalid boxes carry a -inf score and the threshold is -inf, as the RPN calls the op."""
    gen = torch.Generator().manual_seed(7)
    boxes, scores, _ = clustered(gen, 200, 1)
    scores[torch.rand(200, generator=gen) < 0.3] = -INF
    levels = torch.randint(0, 5, (200,), generator=gen)
    return {"tensors": (boxes[None], scores[None], levels[None]), "args": (0.7, -INF, 150)}


def tiny(boxes, scores, classes, iou, score_threshold, max_output) -> dict:
    return {"tensors": (torch.tensor([boxes], dtype=torch.float32), torch.tensor([scores]),
                        torch.tensor([classes], dtype=torch.int64)), "args": (iou, score_threshold, max_output)}


SQUARES = [[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
CASES = {f"random{seed}": (random_case, (seed,)) for seed in range(6)}
CASES.update({f"small-blocks{seed}": (small_blocks_case, (seed,)) for seed in range(2)})
CASES.update({
    "spread": (spread_case, ()),
    "rpn-like": (rpn_like_case, ()),
    "nan-scores": (tiny, (SQUARES, [NAN, 0.5, NAN], [0, 0, 0], 0.5, -INF, 3)),
    "identical-empty": (tiny, ([[5.0, 5, 5, 5]] * 3, [0.9, 0.8, 0.7], [0, 0, 0], 0.0, 0.0, 3)),
    "iou-at-threshold": (tiny, ([[0.0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 1, 1]], [0.9, 0.8, 0.7], [0, 0, 0], 0.5, 0.0, 3)),
    "iou-above-threshold": (tiny, ([[0.0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 1, 1]], [0.9, 0.8, 0.7], [0, 0, 0], 0.49,
                                   0.0, 3)),
    "classes-apart": (tiny, ([[0.0, 0, 1, 1]] * 3, [0.9, 0.8, 0.7], [0, 1, 2], 0.0, 0.0, 3)),
    "ties": (tiny, (SQUARES + [[20.0, 20, 30, 30]], [0.5] * 4, [0, 0, 1, 1], 0.5, 0.0, 4)),
    "nan-and-inf-coordinates": (tiny, ([[NAN, 0, 10, 10], [0, 0, INF, 10], [0, 0, 10, 10], [1, 1, 9, 9]],
                                       [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0], 0.5, 0.0, 4)),
    "no-candidates": (tiny, (SQUARES, [0.1, 0.1, 0.1], [0, 0, 0], 0.5, 0.5, 3)),
    "max-output-0": (tiny, (SQUARES, [0.9, 0.8, 0.7], [0, 0, 0], 0.5, 0.0, 0)),
    "empty": (lambda: {"tensors": (torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.int64)),
                       "args": (0.5, 0.0, 4)}, ()),
})


def _run(case: dict, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    from maskstream.model.ops import nms_triton

    nms_triton.CHUNK, nms_triton.KEPT_BLOCK = case.get("chunk", CHUNK), case.get("kept_block", KEPT_BLOCK)
    try:
        return triton_batched_nms_padded(*(t.to(device) for t in case["tensors"]), *case["args"])
    finally:
        nms_triton.CHUNK, nms_triton.KEPT_BLOCK = CHUNK, KEPT_BLOCK


def _expected(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return batched_nms_padded(*case["tensors"], *case["args"])  # the CPU op, itself checked in test_nms.py


@pytest.fixture(scope="module")
def nms_interpreted(tmp_path_factory) -> dict:
    """Every case through the kernel under TRITON_INTERPRET=1, in one subprocess."""
    cases = {name: make(*args) for name, (make, args) in CASES.items()}
    return interpret(_run, cases, tmp_path_factory.mktemp("nms_interpret"))


# ----------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("name", CASES)
def test_interpreter_matches_the_cpu_op(nms_interpreted, name):
    make, args = CASES[name]
    keep, num = nms_interpreted[name]
    expected_keep, expected_num = _expected(make(*args))
    assert keep.dtype == num.dtype == torch.int64
    assert torch.equal(num, expected_num), (num.tolist(), expected_num.tolist())
    assert torch.equal(keep, expected_keep)


def test_cases_exercise_what_they_name():
    # The kept set outgrows one KEPT_BLOCK, and the small-block cases cross chunk boundaries.
    spread = _expected(spread_case())
    assert int(spread[1][0]) > 2 * KEPT_BLOCK
    small = small_blocks_case(1)
    assert int(_expected(small)[1].max()) > 4 * small["kept_block"]


def test_only_float32_boxes():
    boxes = torch.zeros(1, 2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="the Triton NMS takes float32 boxes, got torch.float64"):
        triton_batched_nms_padded(boxes, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int64), 0.5, 0.0, 2)


# ----------------------------------------------------------------------------- compiled


@pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET is set: the kernel is not compiled in this process")
def test_compiled_for_hopper_keeps_the_cpu_arithmetic():
    """Compiled for sm_90 without a GPU: no fused multiply-add, round-to-nearest division and
    NaN-propagating min/max, which is what makes the GPU's indices equal the CPU op's."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        "boxes_ptr": "*fp32", "areas_ptr": "*fp32", "classes_ptr": "*i64", "order_ptr": "*i64", "count_ptr": "*i64",
        "n": "i32", "max_output": "i32", "threshold": "fp32", "keep_ptr": "*i64", "num_ptr": "*i64",
        "kept_ptr": "*fp32", "kept_class_ptr": "*i64", "CHUNK": "constexpr", "KEPT_BLOCK": "constexpr",
    }
    source = ASTSource(fn=nms_walk_kernel, signature=signature, constexprs={"CHUNK": CHUNK, "KEPT_BLOCK": KEPT_BLOCK})
    options = {"num_warps": NUM_WARPS, "enable_fp_fusion": ENABLE_FP_FUSION}
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert ".target sm_90" in ptx
    assert not re.search(r"\bfma\.rn\.f32", ptx)
    assert set(re.findall(r"\bdiv\.[a-z]+\.f32", ptx)) == {"div.rn.f32"}
    float_minmax = re.findall(r"\b(?:min|max)(?:\.[A-Za-z]+)*\.f32", ptx)
    assert float_minmax and all(".NaN" in op for op in float_minmax), float_minmax


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_op_matches_the_cpu_op(name):
    make, args = CASES[name]
    case = make(*args)
    keep, num = _run(case, "cuda")
    expected_keep, expected_num = _expected(case)
    assert torch.equal(num.cpu(), expected_num) and torch.equal(keep.cpu(), expected_keep)
    # Through the op's CUDA dispatch as well (default chunk sizes).
    via_op = batched_nms_padded(*(t.cuda() for t in case["tensors"]), *case["args"])
    assert torch.equal(via_op[0].cpu(), expected_keep) and torch.equal(via_op[1].cpu(), expected_num)


@pytest.mark.gpu
@gpu
def test_cuda_op_is_capturable_in_a_cuda_graph():
    case = random_case(4)
    tensors = [t.cuda() for t in case["tensors"]]
    batched_nms_padded(*tensors, *case["args"])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep, num = batched_nms_padded(*tensors, *case["args"])
    graph.replay()
    expected_keep, expected_num = _expected(case)
    assert torch.equal(keep.cpu(), expected_keep) and torch.equal(num.cpu(), expected_num)
