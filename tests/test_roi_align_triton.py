"""The Triton RoIAlign kernel: interpreter vs the float64 reference, the AOT PTX TensorRT embeds,
and (GPU only) the CUDA launch and a TensorRT-style launch of that PTX."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from maskstream.model.ops import RoIAlignAttrs, assign_levels, multiscale_roi_align, roi_align_reference

from tests.op_cases import pyramid, random_boxes, special_boxes

pytest.importorskip("triton")

from maskstream.plugins.roi_align.aot import (  # noqa: E402  (after the skip: these import triton)
    INPUTS,
    OUTPUTS,
    compile_ptx,
    parse_ptx_entry,
    ptx_version_for_driver,
    ptx_version_for_toolchain,
    strip_trailing_params,
)
from maskstream.plugins.roi_align.kernel import (  # noqa: E402
    BLOCK,
    EXTRA_ARGS,
    NUM_WARPS,
    launch_grid,
    roi_align_kernel,
    triton_multiscale_roi_align,
)

from tests.triton_interpreter import INTERPRETING, interpret  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = json.loads((ROOT / "plugins" / "roi_align" / "spec.json").read_text())
TOL = SPEC["tolerances"]
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype_name: str) -> None:
    tol = TOL[dtype_name]
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol["atol"], rtol=tol["rtol"])


# ----------------------------------------------------------------------------- cases


def random_case(seed: int, dtype_name: str) -> dict:
    """Small pyramids of H, W multiples of 32 up to 256, boxes of every level plus border,
    outside and degenerate ones; every attribute combination over the seeds."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_name]
    b, c = 1 + seed % 2, int(torch.randint(1, 4, (), generator=gen))
    h, w = (32 * int(torch.randint(2, 9, (), generator=gen)) for _ in range(2))
    r = 0 if seed == 0 else int(torch.randint(3, 9, (), generator=gen))
    attrs = {"output_size": (7, 2, 5, 14, 3)[seed % 5], "sampling_ratio": (2, 1, 0)[seed % 3],
             "aligned": bool((seed // 3) % 2)}
    return {"features": pyramid(gen, b, c, h, w, dtype), "boxes": random_boxes(gen, b, r, h, w).to(dtype),
            "attrs": attrs}


def boundary_case(dtype_name: str) -> dict:
    """Boxes on and around the 112/224/448 px level boundaries, float16's area overflow (a 300 px
    square has an area of inf in float16: level 5) and infinite coordinates; each level's map is
    the constant level index, so a pooled value inside the image reads back the box's level."""
    dtype = DTYPES[dtype_name]
    h = w = 256
    sides = [111.9, 112.0, 112.1, 223.9, 224.0, 224.1, 447.9, 448.0, 448.1, 255.0, 300.0, 56.0, 0.5]
    boxes = [[0.0, 0.0, s, s] for s in sides] + [[0.0, 0.0, float("inf"), 10.0], [3.0, 4.0, 3.0, 4.0]]
    features = [torch.full((1, 2, h >> (2 + k), w >> (2 + k)), float(k)).to(dtype) for k in range(4)]
    return {"features": features, "boxes": torch.tensor([boxes]).to(dtype),
            "attrs": {"output_size": 2, "sampling_ratio": 2, "aligned": False}}


def special_case(dtype_name: str, aligned: bool) -> dict:
    gen = torch.Generator().manual_seed(99)
    h, w = 96, 128
    return {"features": pyramid(gen, 1, 3, h, w, DTYPES[dtype_name]),
            "boxes": special_boxes(h, w)[None].to(DTYPES[dtype_name]),
            "attrs": {"output_size": 7, "sampling_ratio": 0 if aligned else 2, "aligned": aligned}}


CASES = {f"random{seed}-{d}": (random_case, (seed, d)) for seed in range(10) for d in DTYPES}
CASES.update({f"boundary-{d}": (boundary_case, (d,)) for d in DTYPES})
CASES.update({f"special-{d}-aligned{a}": (special_case, (d, a)) for d in DTYPES for a in (False, True)})


def _dtype_name(case: dict) -> str:
    return str(case["features"][0].dtype).removeprefix("torch.")


def reference(case: dict) -> torch.Tensor:
    return roi_align_reference(case["features"], case["boxes"], RoIAlignAttrs(**case["attrs"]))


def _run(case: dict, device: str = "cpu") -> torch.Tensor:
    features = [f.to(device) for f in case["features"]]
    return triton_multiscale_roi_align(features, case["boxes"].to(device), RoIAlignAttrs(**case["attrs"]))


@pytest.fixture(scope="module")
def roi_align_interpreted(tmp_path_factory) -> dict:
    """Every case through the kernel under TRITON_INTERPRET=1, in one subprocess."""
    cases = {name: make(*args) for name, (make, args) in CASES.items()}
    return interpret(_run, cases, tmp_path_factory.mktemp("triton_interpret"))


# ----------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("name", CASES)
def test_interpreter_matches_reference(roi_align_interpreted, name):
    make, args = CASES[name]
    case = make(*args)
    out = roi_align_interpreted[name]
    b, r = case["boxes"].shape[:2]
    c, s = case["features"][0].shape[1], case["attrs"]["output_size"]
    assert out.shape == (b, r, c, s, s) and out.dtype == case["features"][0].dtype
    assert_matches(out, reference(case), _dtype_name(case))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_interpreter_levels_match_assign_levels(roi_align_interpreted, dtype_name):
    case = boundary_case(dtype_name)
    pooled = roi_align_interpreted[f"boundary-{dtype_name}"][0, :, 0, 0, 0].float()  # the top-left bin reads the level
    level = assign_levels(case["boxes"])[0]
    finite = torch.isfinite(case["boxes"][0]).all(-1)
    # The weights of a sample sum to 1 up to rounding; a wrong level is off by 1.
    torch.testing.assert_close(pooled[finite], level[finite].float(), atol=1e-3, rtol=0)
    assert pooled[~finite].eq(0).all()  # samples of an infinite box are NaN/inf: outside, zeros


def test_launcher_rejects_float64():
    features = [torch.zeros(1, 1, 8 >> k, 8 >> k, dtype=torch.float64) for k in range(4)]
    with pytest.raises(TypeError, match="float16 or float32"):
        triton_multiscale_roi_align(features, torch.zeros(1, 1, 4, dtype=torch.float64), RoIAlignAttrs(7))


# ----------------------------------------------------------------------------- ABI and AOT


def test_kernel_abi_order():
    constexprs = ["OUTPUT_SIZE", "SAMPLING_RATIO", "ALIGNED", "CANONICAL_LEVEL", "CANONICAL_SCALE", "FIRST_LEVEL",
                  "BLOCK"]
    assert list(roi_align_kernel.arg_names) == [*INPUTS, *EXTRA_ARGS, *OUTPUTS, *constexprs]


def test_launch_grid_realistic_shapes():
    assert launch_grid(2, 1000, 256, 7) == (2000, -(-256 * 49 // BLOCK), 1) == (2000, 49, 1)
    assert launch_grid(2, 100, 256, 14) == (200, 196, 1)
    assert launch_grid(1, 0, 256, 7)[0] == 0


aot = pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET is set: the kernel is not compiled in this process")
PTR, I32 = ".u64 .ptr .global .align 1", ".u32"


@aot
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_aot_ptx_has_the_tensorrt_abi(dtype_name, arch):
    kernel = compile_ptx(dtype_name, RoIAlignAttrs(7), arch=arch)
    name, params = parse_ptx_entry(kernel.ptx)
    assert name == kernel.name == "roi_align_kernel"
    assert params == [PTR] * len(INPUTS) + [I32] * len(EXTRA_ARGS) + [PTR] * len(OUTPUTS)
    assert kernel.param_count == len(INPUTS) + len(EXTRA_ARGS) + len(OUTPUTS) == 16
    # The hidden scratch parameters are gone from the entry and never referenced anywhere.
    indices = {int(i) for i in re.findall(rf"{name}_param_(\d+)", kernel.ptx)}
    assert max(indices) == kernel.param_count - 1
    assert kernel.target == ("sm_90a" if arch == 90 else f"sm_{arch}")
    assert re.fullmatch(r"\d+\.\d+", kernel.ptx_version)
    assert kernel.num_warps == NUM_WARPS and kernel.block == (NUM_WARPS * 32, 1, 1)
    assert f".reqntid {NUM_WARPS * 32}" in kernel.ptx  # the PTX itself pins the block size
    assert kernel.shared_mem == 0


@aot
def test_aot_other_attributes_and_ptx_cap():
    kernel = compile_ptx("float16", RoIAlignAttrs(14, sampling_ratio=0, aligned=True),
                         ptx_version=ptx_version_for_driver(12080))
    assert kernel.ptx_version == "8.7" and kernel.param_count == 16
    assert ptx_version_for_driver(13000) == 90
    # A driver newer than Triton's ptxas (CUDA 13.0 beside Triton 3.6's 12.8): the toolchain's ISA caps it.
    newest = ptx_version_for_toolchain(90)
    capped = compile_ptx("float32", RoIAlignAttrs(7), ptx_version=ptx_version_for_driver(99000))
    assert capped.ptx_version == f"{newest // 10}.{newest % 10}" == compile_ptx("float32", RoIAlignAttrs(7)).ptx_version


def test_strip_refuses_a_used_hidden_param():
    ptx = (".version 8.7\n.target sm_90a\n.visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 k_param_2\n)\n{\n\tld.param.b64 %rd1, [k_param_2];\n}\n")
    with pytest.raises(ValueError, match="k_param_2"):
        strip_trailing_params(ptx, 2)
    unused = ptx.replace("k_param_2];", "k_param_0];")
    assert parse_ptx_entry(strip_trailing_params(unused, 2)) == ("k", [".u64", ".u32"])
    with pytest.raises(ValueError, match="fewer"):
        strip_trailing_params(unused, 4)


# ----------------------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_launcher_matches_reference(name):
    make, args = CASES[name]
    case = make(*args)
    out = _run(case, "cuda")
    assert_matches(out, reference(case), _dtype_name(case))
    # The op on CUDA dispatches to this kernel.
    features = [f.cuda() for f in case["features"]]
    via_op = multiscale_roi_align(features, case["boxes"].cuda(), RoIAlignAttrs(**case["attrs"]))
    torch.testing.assert_close(via_op, out, atol=0, rtol=0)


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError:
            pytest.skip("cuda-python (cuda.bindings) is not installed")
    return driver


def _check(result):
    err, *rest = result
    assert int(err) == 0, f"CUDA driver error {err}"
    return rest[0] if len(rest) == 1 else rest


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_aot_ptx_launched_like_tensorrt(dtype_name):
    """Load the stripped PTX with the driver API and launch it with exactly TensorRT's arguments."""
    import numpy as np

    driver = _driver()
    case = random_case(3, dtype_name)
    features = [f.cuda().contiguous() for f in case["features"]]
    boxes = case["boxes"].cuda().contiguous()
    attrs = RoIAlignAttrs(**case["attrs"])
    b, r = boxes.shape[:2]
    c, s = features[0].shape[1], attrs.output_size
    out = torch.full((b, r, c, s, s), float("nan"), device="cuda", dtype=features[0].dtype)

    major, minor = torch.cuda.get_device_capability()
    ptx_cap = ptx_version_for_driver(_check(driver.cuDriverGetVersion()))
    kernel = compile_ptx(dtype_name, attrs, arch=10 * major + minor, ptx_version=ptx_cap)
    torch.cuda.synchronize()  # the primary context is current from here on
    image = kernel.ptx.encode() + b"\0"
    module = _check(driver.cuModuleLoadData(image))
    function = _check(driver.cuModuleGetFunction(module, kernel.name.encode()))

    sizes = [size for f in features for size in f.shape[2:]]
    values = [np.array([t.data_ptr()], dtype=np.uint64) for t in (*features, boxes)]
    values += [np.array([v], dtype=np.int32) for v in (r, c, *sizes)]
    values += [np.array([out.data_ptr()], dtype=np.uint64)]
    assert len(values) == kernel.param_count
    params = np.array([v.ctypes.data for v in values], dtype=np.uint64)
    grid = launch_grid(b, r, c, s)
    stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
    _check(driver.cuLaunchKernel(function, *grid, *kernel.block, kernel.shared_mem, stream, params.ctypes.data, 0))
    torch.cuda.synchronize()
    _check(driver.cuModuleUnload(module))

    assert_matches(out, reference(case), dtype_name)
    torch.testing.assert_close(out, _run(case, "cuda"), atol=0, rtol=0)
