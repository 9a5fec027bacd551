"""The RoIAlign op's contract in code: its attributes, its input checks, the level mapper's epsilon.

Shared by every implementation: the torch op (model/ops/roi_align.py), the Triton kernel
(kernel.py, whose launcher checks inputs as the op does) and the TensorRT plugin
(registration.py). It imports torch only, so the kernel module depends on nothing of the model.

The attributes travel as one `RoIAlignAttrs` through the Python APIs. Where an API can only take
flat values (the torch.library schema, TensorRT's plugin fields, Triton's constexprs), they are
converted here or beside the kernel, field for field in this order, which is the schema's and
spec.json's order.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

OP_NAME = "maskstream::multiscale_roi_align"
NUM_LEVELS = 4  # P2..P5
SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.float64)
# torchvision's LevelMapper epsilon, added after log2 so exact powers of two land on their level.
LEVEL_EPS = 1e-6
# What torch.library infers from the annotations `int` and `bool`, so the schema is the one it always was.
_SCHEMA_TYPES = {int: "SymInt", bool: "bool"}


@dataclass(frozen=True)
class RoIAlignAttrs:
    """The op's non-tensor arguments; defaults are torchvision's MultiScaleRoIAlign + LevelMapper."""

    output_size: int  # S: pooled bins per side
    sampling_ratio: int = 2  # samples per bin and axis; <= 0: ceil(roi_size / S) per box and axis
    aligned: bool = False  # shift boxes by -0.5 px (torchvision's aligned=True)
    canonical_level: int = 4  # k0 of the FPN level mapper
    canonical_scale: int = 224  # s0 of the FPN level mapper
    first_level: int = 2  # level number of the first feature map (k_min; k_max is first_level + 3)

    def __post_init__(self) -> None:
        if self.output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {self.output_size}")

    @property
    def last_level(self) -> int:
        return self.first_level + NUM_LEVELS - 1

    def spatial_scale(self, level: int) -> float:
        """Scale of level index `level` (0 = P{first_level}): 1 / 2**(first_level + level), exact."""
        return 1.0 / 2 ** (self.first_level + level)

    def op_args(self) -> tuple[Any, ...]:
        """The flat values in schema order: `torch.ops.maskstream.multiscale_roi_align(*tensors, *op_args())`."""
        return dataclasses.astuple(self)

    @classmethod
    def from_op_args(cls, values: Sequence[Any]) -> RoIAlignAttrs:
        """The attributes of a call's flat values in schema order; trailing ones left out take their
        defaults, as torch.library passes them (a graph omits arguments equal to their defaults)."""
        return cls(*values)

    @classmethod
    def schema(cls) -> str:
        """The attributes as torch.library schema arguments: `SymInt output_size, SymInt sampling_ratio=2, ...`."""
        hints = typing.get_type_hints(cls)
        return ", ".join(
            f"{_SCHEMA_TYPES[hints[f.name]]} {f.name}" + ("" if f.default is dataclasses.MISSING else f"={f.default}")
            for f in dataclasses.fields(cls)
        )

def check_inputs(
    features: Sequence[Tensor], boxes: Tensor, output_size: int, num_levels: int = NUM_LEVELS
) -> None:
    """Raise a clear error for anything the kernels would silently misread."""
    if len(features) != num_levels:
        raise ValueError(f"expected {num_levels} feature levels (P2..P5), got {len(features)}")
    first = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, Tensor) or f.dim() != 4:
            what = f"a {f.dim()}-d tensor" if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"features[{i}] must be a [B, C, H, W] tensor, got {what}")
        if f.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"features[{i}] must be float16, float32 or float64, got {f.dtype}")
        if f.dtype != first.dtype:
            raise TypeError(f"all feature levels must share one dtype: features[0] is {first.dtype}, "
                            f"features[{i}] is {f.dtype}")
        if f.device != first.device:
            raise ValueError(f"all feature levels must be on one device: features[0] is on {first.device}, "
                             f"features[{i}] is on {f.device}")
        if f.shape[0] != first.shape[0] or f.shape[1] != first.shape[1]:
            raise ValueError(f"all feature levels must share batch and channels: features[0] is "
                             f"{tuple(first.shape)}, features[{i}] is {tuple(f.shape)}")
        if f.shape[2] < 1 or f.shape[3] < 1:
            raise ValueError(f"features[{i}] has an empty spatial size {tuple(f.shape)}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be [B, R, 4] (x1, y1, x2, y2), got {got}")
    if boxes.shape[0] != first.shape[0]:
        raise ValueError(f"boxes batch {boxes.shape[0]} does not match features batch {first.shape[0]}")
    if boxes.dtype != first.dtype:
        raise TypeError(f"boxes must have the features' dtype {first.dtype}, got {boxes.dtype}")
    if boxes.device != first.device:
        raise ValueError(f"boxes are on {boxes.device} but features are on {first.device}")
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
