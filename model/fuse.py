"""Inference-only rewrite: fold every frozen batch norm into the convolution before it.

A norm layer in eval mode is an affine map per channel, so conv -> norm equals one conv with
scaled weights and a bias. Folding removes one full pass over each activation (53 norm
layers in R50-FPN, ~9% of CPU inference time at 800x1344). The result is a separate copy:
its state_dict no longer has the norm keys, so checkpoints are always saved unfolded.
"""
from __future__ import annotations

import copy
from typing import TypeVar

import torch
from maskstream.model.backbone import FrozenBatchNorm2d
from torch import nn

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
M = TypeVar("M", bound=nn.Module)


@torch.no_grad()
def fold_batch_norms(module: M) -> M:
    """Eval-mode copy of `module` with each Conv2d directly followed by a norm merged into one conv.

    "Directly followed" means consecutive children of one parent, which is how every conv/norm
    pair in our modules (and torchvision's) is laid out.
    """
    folded = copy.deepcopy(module).eval()
    for parent in folded.modules():
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, NORMS):
                _fold(conv, norm)
                setattr(parent, norm_name, nn.Identity())
    return folded


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d | FrozenBatchNorm2d) -> None:
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"cannot fold {norm}: it keeps no running statistics")
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(norm.bias + (bias - norm.running_mean) * scale)
