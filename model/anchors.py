"""Anchors over the pyramid levels, exactly as torchvision's AnchorGenerator lays them out."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """One anchor size per level, the same aspect ratios on every level.

    Anchors are ordered (level, y, x, anchor) to match the flattened RPN head outputs. Strides are
    the integer quotient of the padded image size by the feature size, as in torchvision (so P6 of
    an 800-pixel side has stride 61, not 64); that quirk is kept for checkpoint parity.
    """

    cell_anchors: Tensor

    def __init__(self, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...]):
        super().__init__()
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        # A buffer [L, A, 4], not a list of CPU tensors: it moves with the model, so a CUDA forward
        # copies nothing from the host (which would break CUDA graph capture). Not persistent:
        # computed from the config, never part of a checkpoint.
        cells = torch.stack([self._cell_anchors(s, aspect_ratios) for s in sizes])
        self.register_buffer("cell_anchors", cells, persistent=False)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    @staticmethod
    def _cell_anchors(size: int, aspect_ratios: tuple[float, ...]) -> Tensor:
        scales = torch.as_tensor([size], dtype=torch.float32)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [A, 4]

    def forward(self, image_hw: tuple[int, int], feature_hws: list[tuple[int, int]], device: torch.device) -> Tensor:
        """Anchors of one (padded) image: [sum_l H_l * W_l * A, 4]."""
        if len(feature_hws) != len(self.sizes):
            raise ValueError(f"anchor generator has {len(self.sizes)} sizes but got {len(feature_hws)} feature maps")
        out = []
        for (fh, fw), base in zip(feature_hws, self.cell_anchors):
            stride_h, stride_w = image_hw[0] // fh, image_hw[1] // fw
            shifts_x = torch.arange(0, fw, dtype=torch.int32, device=device) * stride_w
            shifts_y = torch.arange(0, fh, dtype=torch.int32, device=device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # [H*W, 4]
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(out)
