"""Ahead-of-time PTX of the RoIAlign Triton kernel, for TensorRT's AOT plugin; no GPU needed.

TensorRT launches an AOT kernel with exactly (input pointers, int32 extras, output pointers). Triton
appends hidden trailing pointer parameters to every kernel (`global_scratch`, and `profile_scratch`
from about 3.5); nothing would pass them, so they are removed from the `.entry` here, after checking
that the kernel needs no scratch memory and that the PTX body never reads them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import triton
from maskstream.plugins.roi_align.contract import RoIAlignAttrs
from maskstream.plugins.roi_align.kernel import ENABLE_FP_FUSION, EXTRA_ARGS, NUM_WARPS, constexprs, roi_align_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INPUTS = ("p2", "p3", "p4", "p5", "boxes")
OUTPUTS = ("out",)
_POINTER = {"float32": "*fp32", "float16": "*fp16"}
_ENTRY = re.compile(r"\.visible\s+\.entry\s+(\w+)\s*\((.*?)\)", re.DOTALL)
_PARAM = re.compile(r"\.param\s+(.+?)\s+(\w+)\s*$")


@dataclass(frozen=True)
class AotKernel:
    """One compiled kernel: what TensorRT's `aot_impl` returns, plus facts for checks and manifests."""

    name: str  # the PTX `.entry` symbol
    ptx: str  # parameters: INPUTS pointers, EXTRA_ARGS int32, OUTPUTS pointers, nothing else
    num_warps: int  # block = (num_warps * 32, 1, 1)
    shared_mem: int  # dynamic shared memory bytes for the launch
    param_count: int  # len(INPUTS) + len(EXTRA_ARGS) + len(OUTPUTS)
    target: str  # PTX `.target`, e.g. "sm_90a"
    ptx_version: str  # PTX `.version`, e.g. "9.0"; the driver must support it

    @property
    def block(self) -> tuple[int, int, int]:
        return self.num_warps * 32, 1, 1


def parse_ptx_entry(ptx: str) -> tuple[str, list[str]]:
    """PTX text -> (entry name, parameter types in order, e.g. ".u64 .ptr .global .align 1" or ".u32")."""
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1:
        raise ValueError(f"expected exactly one .visible .entry in the PTX, found {len(entries)}")
    name, params = entries[0]
    types = []
    for line in (p.strip() for p in params.split(",")):
        match = _PARAM.match(line)
        if match is None:
            raise ValueError(f"cannot parse PTX parameter {line!r} of entry {name}")
        types.append(match.group(1))
    return name, types


def _ptx_field(ptx: str, field: str) -> str:
    match = re.search(rf"^\s*\.{field}\s+(\S+)", ptx, re.MULTILINE)
    if match is None:
        raise ValueError(f"the PTX has no .{field} line")
    return match.group(1)


def strip_trailing_params(ptx: str, keep: int) -> str:
    """Drop every `.entry` parameter after the first `keep`; refuse if the body uses a dropped one."""
    match = _ENTRY.search(ptx)
    if match is None:
        raise ValueError("the PTX has no .visible .entry")
    name, params = match.group(1), match.group(2)
    lines = [p.strip() for p in params.split(",")]
    if len(lines) < keep:
        raise ValueError(f"entry {name} has {len(lines)} parameters, fewer than the {keep} of the kernel ABI")
    dropped = [_PARAM.match(line) for line in lines[keep:]]
    if any(d is None for d in dropped):
        raise ValueError(f"cannot parse the trailing parameters {lines[keep:]} of entry {name}")
    body = ptx[match.end():]
    for d in dropped:
        assert d is not None
        if re.search(rf"\b{re.escape(d.group(2))}\b", body):
            raise ValueError(f"entry {name} reads its hidden parameter {d.group(2)}; it cannot run without scratch")
    kept = ",\n".join(f"\t{line}" for line in lines[:keep])
    return ptx[:match.start(2)] + "\n" + kept + "\n" + ptx[match.end(2):]


def ptx_version_for_driver(driver_version: int) -> int:
    """cuDriverGetVersion's number (13000 = CUDA 13.0) -> the newest PTX ISA it loads, as Triton's
    `ptx_version` option counts it (90 = PTX 9.0)."""
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{driver_version // 1000}.{driver_version % 1000 // 10}")


def ptx_version_for_toolchain(arch: int) -> int:
    """The newest PTX ISA that the ptxas Triton compiles `arch` with accepts (Triton's own default).

    A driver may be newer than that ptxas: Triton 3.6 bundles CUDA 12.8's (PTX 8.7) while the lent
    GPUs' driver is CUDA 13.0 (PTX 9.0), and ptxas refuses a `.version` it does not know."""
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    return ptx_get_version(get_ptxas(arch).version)


def compile_ptx(
    dtype: Literal["float32", "float16"], attrs: RoIAlignAttrs, arch: int = 90, ptx_version: int | None = None
) -> AotKernel:
    """PTX of `roi_align_kernel` for one attribute set and dtype, for GPU architecture `arch` (90 = sm_90).

    `ptx_version` (e.g. 87 for PTX 8.7) caps the ISA version for older drivers, which refuse a
    newer `.version` (CUDA_ERROR_UNSUPPORTED_PTX_VERSION); None takes Triton's bundled ptxas version,
    which also caps any `ptx_version` asked for (`ptx_version_for_toolchain`).
    Boxes must have the features' dtype, as the op requires.
    """
    if dtype not in _POINTER:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    pointer = _POINTER[dtype]
    signature = {name: pointer for name in INPUTS}
    signature.update({name: "i32" for name in EXTRA_ARGS})
    signature.update({name: pointer for name in OUTPUTS})
    constants = constexprs(attrs)
    signature.update({name: "constexpr" for name in constants})
    options: dict[str, object] = {"num_warps": NUM_WARPS, "enable_fp_fusion": ENABLE_FP_FUSION}
    if ptx_version is not None:
        options["ptx_version"] = min(ptx_version, ptx_version_for_toolchain(arch))
    source = ASTSource(fn=roi_align_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError("the RoIAlign kernel asks for Triton scratch memory, which a TensorRT launch cannot give")

    param_count = len(INPUTS) + len(EXTRA_ARGS) + len(OUTPUTS)
    ptx = strip_trailing_params(compiled.asm["ptx"], param_count)
    name, params = parse_ptx_entry(ptx)
    if name != meta.name:
        raise RuntimeError(f"PTX entry {name} differs from Triton's kernel name {meta.name}")
    return AotKernel(
        name=name,
        ptx=ptx,
        num_warps=meta.num_warps,
        shared_mem=meta.shared,
        param_count=len(params),
        target=_ptx_field(ptx, "target"),
        ptx_version=_ptx_field(ptx, "version"),
    )
