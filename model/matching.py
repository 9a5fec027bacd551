"""Training-time target assignment: IoU matching and balanced sampling (torchvision's rules)."""
from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """Assigns each prediction the index of its best ground truth, or a negative code.

    -1: best IoU below `low`; -2: between `low` and `high` (ignored in training). With
    `allow_low_quality_matches`, every ground truth keeps the predictions that overlap it best
    even when that IoU is under `high` (Faster R-CNN paper, section 3.1.2).
    """

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool):
        if low > high:
            raise ValueError(f"Matcher low threshold {low} is above high threshold {high}")
        self.high, self.low = high, low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> Tensor:
        """quality: IoU [num_gt, num_pred] -> matched gt index per prediction [num_pred]."""
        if quality.shape[0] == 0:
            return torch.full((quality.shape[1],), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=quality.device)
        matched_vals, matches = quality.max(dim=0)
        all_matches = matches.clone()
        matches[matched_vals < self.low] = BELOW_LOW_THRESHOLD
        matches[(matched_vals >= self.low) & (matched_vals < self.high)] = BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            best_per_gt = quality.max(dim=1).values
            _, pred_idx = torch.where(quality == best_per_gt[:, None])
            matches[pred_idx] = all_matches[pred_idx]
        return matches


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """labels [N] (1+ positive, 0 negative, -1 ignore) -> (positive mask, negative mask) [N].

    At most batch_size * positive_fraction positives, negatives fill the rest; random choice.
    """
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos_idx = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
    neg_idx = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)
    neg_mask = torch.zeros_like(labels, dtype=torch.bool)
    pos_mask[pos_idx] = True
    neg_mask[neg_idx] = True
    return pos_mask, neg_mask
