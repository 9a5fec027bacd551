"""TensorRT registration of `maskstream::multiscale_roi_align` as a Quickly Deployable Plugin (QDP).

    register_plugin()        # explicit, idempotent; needs TensorRT >= 10.9 (`tensorrt.plugin.aot_impl`)

Only an ahead-of-time implementation is defined, no JIT `@trtp.impl`: the Triton kernel is compiled
to PTX at engine build time and baked into the engine, so the engine runs without Python (C++,
trtexec). TensorRT launches it with the kernel arguments in a fixed order: input pointers
(p2, p3, p4, p5, boxes), then the int32 extras (`aot.EXTRA_ARGS`), then the output pointer.
Float constants (spatial scales) cannot be extras; the kernel bakes them in as constexprs.

The plugin id equals the torch op's qualified name, and the attributes are the op's non-tensor
arguments in its schema order (`contract.RoIAlignAttrs`'s fields: TensorRT reads them from the
functions' signatures, so they are spelled out here and converted to one `RoIAlignAttrs` at once);
`model.engine._roi_align_converter` adds the plugin to the network. TensorRT itself is detected by
plugins/tensorrt_env.py.

No `from __future__ import annotations` here: `tensorrt.plugin` inspects the decorated functions'
annotations at registration and needs real classes, not strings.
"""
import ctypes
import json
from pathlib import Path
from typing import Literal

from maskstream.plugins.roi_align.contract import OP_NAME, RoIAlignAttrs
from maskstream.plugins.tensorrt_env import INSTALL_HINT, TensorRTUnavailable, tensorrt_version

PLUGIN_ID = OP_NAME
SPEC_PATH = Path(__file__).resolve().parent / "spec.json"
_registered = False


def plugin_version() -> int:
    """The contract version in spec.json; engines record it and runners compare it."""
    return int(json.loads(SPEC_PATH.read_text(encoding="utf-8"))["version"])


def _build_gpu() -> tuple[int, int | None]:
    """(arch, PTX ISA cap) for the GPU the engine is built on: arch 90 = sm_90; the cap keeps
    Triton's bundled ptxas from emitting a `.version` this driver refuses (None: no cap known)."""
    import torch
    from maskstream.plugins.roi_align import aot

    major, minor = torch.cuda.get_device_capability()
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return major * 10 + minor, None
    except OSError:
        return major * 10 + minor, None
    return major * 10 + minor, aot.ptx_version_for_driver(version.value)


def _require_tensorrt() -> None:
    version = tensorrt_version()
    if version is None:
        raise TensorRTUnavailable(f"TensorRT is not installed: {INSTALL_HINT}")
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT {version} has no `tensorrt.plugin` module (needs >= 10.9)") from exc
    if not hasattr(trtp, "aot_impl"):
        raise TensorRTUnavailable(f"TensorRT {version} has no `tensorrt.plugin.aot_impl` (AOT plugins need >= 10.9)")


def register_plugin() -> None:
    """Register the plugin's shape/dtype descriptor and AOT implementation with TensorRT (once)."""
    global _registered
    if _registered:
        return
    _require_tensorrt()
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _descriptor(
        p2: trtp.TensorDesc,
        p3: trtp.TensorDesc,
        p4: trtp.TensorDesc,
        p5: trtp.TensorDesc,
        boxes: trtp.TensorDesc,
        output_size: int,
        sampling_ratio: int,
        aligned: bool,
        canonical_level: int,
        canonical_scale: int,
        first_level: int,
    ) -> trtp.TensorDesc:
        # [B, R, C, S, S] in the features' dtype
        b, r, c = boxes.shape_expr[0], boxes.shape_expr[1], p2.shape_expr[1]
        return trtp.from_shape_expr((b, r, c, output_size, output_size), dtype=p2.dtype)

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(
        p2: trtp.TensorDesc,
        p3: trtp.TensorDesc,
        p4: trtp.TensorDesc,
        p5: trtp.TensorDesc,
        boxes: trtp.TensorDesc,
        output_size: int,
        sampling_ratio: int,
        aligned: bool,
        canonical_level: int,
        canonical_scale: int,
        first_level: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        from maskstream.plugins.roi_align import aot, kernel

        dtype: Literal["float32", "float16"]
        if p2.dtype == trt.float32:
            dtype = "float32"
        elif p2.dtype == trt.float16:
            dtype = "float16"
        else:
            raise TypeError(f"{PLUGIN_ID}: features must be float32 or float16, got {p2.dtype}")
        arch, ptx_version = _build_gpu()
        attrs = RoIAlignAttrs.from_op_args(
            (output_size, sampling_ratio, aligned, canonical_level, canonical_scale, first_level))
        compiled = aot.compile_ptx(dtype, attrs, arch=arch, ptx_version=ptx_version)
        # Symbolic sizes, resolved by TensorRT from the actual shapes at run time.
        sizes = {
            "B": boxes.shape_expr[0],
            "R": boxes.shape_expr[1],
            "C": p2.shape_expr[1],
            **{f"{dim}{lvl}": f.shape_expr[axis] for lvl, f in zip((2, 3, 4, 5), (p2, p3, p4, p5))
               for dim, axis in (("H", 2), ("W", 3))},
        }
        unknown = [name for name in aot.EXTRA_ARGS if name not in sizes]
        if unknown:
            raise ValueError(f"{PLUGIN_ID}: aot.EXTRA_ARGS names {unknown}, which the plugin cannot derive")
        gx, gy, gz = kernel.launch_grid(sizes["B"], sizes["R"], sizes["C"], output_size)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = gx, gy, gz
        launch.block_x = compiled.num_warps * 32
        launch.shared_mem = compiled.shared_mem
        extras = trtp.SymIntExprs.from_tuple([trtp.SymInt32(sizes[name]) for name in aot.EXTRA_ARGS])
        return compiled.name, compiled.ptx, launch, extras

    _registered = True
