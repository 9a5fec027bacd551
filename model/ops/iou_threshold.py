"""The IoU threshold as both NMS implementations compare it (model/ops/nms.py, model/ops/nms_triton.py).

Its own module so that the Triton kernel's module imports nothing of the CPU op that dispatches
to it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def largest_not_above(threshold: float, dtype: torch.dtype) -> Tensor:
    """The largest `dtype` value t with t <= threshold, as a 0-d tensor.

    torchvision's kernel compares a float IoU with a double threshold. For an IoU value v of
    `dtype`, `v > threshold` holds exactly when `v > t`, so the comparison can stay in `dtype`
    without converting whole IoU blocks to float64.
    """
    exact = torch.tensor(threshold, dtype=torch.float64)
    t = exact.to(dtype)
    if t.to(torch.float64) > exact:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return t
